"""Causal scores under a per-dimension decay, exact for log decays of any size: the in-chunk term of
GLA and RWKV-6, written with the language's ops (no primitive of its own, so it lowers and
differentiates like any program).

``q @ k.T`` weighted by ``exp(b_i - b_j)`` per key dim (``b`` the cumulative log decay) is usually
factorised as ``(q · exp(b)) @ (k · exp(-b)).T``, which overflows once ``-b`` passes the exponent
range within a chunk. Here the pairs ``(i, j)``, ``j < i``, are split by the highest bit in which
``i`` and ``j`` differ: at level ``h`` (1, 2, ..., 32) ``i`` lies in the second half and ``j`` in
the first half of one ``2h``-row block, and the factor splits at the end of that first half:
``exp(b_i - b_ref) · exp(b_ref - b_j)``, both at most 1 (flash-linear-attention's secondary
chunking, carried down to single rows). Each level is one matmul: the queries of second halves, the keys
of first halves, and a sliding window of ``2h`` rows, which keeps a pair exactly when both lie in one
``2h``-row block (a key of an earlier block is more than ``2h`` rows back). The exponents are
segment sums of the log decays (``linrec`` restarting at each ``h``-row block), never differences
of large cumulative sums."""

from __future__ import annotations

from tilemix.tiles import exp, eye, floor, iota, linrec, rowsum, where, window, zeros

__all__ = ["decayed_scores"]


def decayed_scores(q, k, g, strict: bool = False):
    """``out[i, j] = Σ_d q[i, d] k[j, d] exp(g[j+1, d] + ... + g[i, d])`` for ``j <= i``, 0 above
    the diagonal: ``causal((q · exp(b)) @ (k · exp(-b)).T)`` with ``b = cumsum(g)``, without its
    overflow. ``strict``: ``j < i`` and the decay sum stops at ``g[i-1]`` (RWKV-6: a query reads
    the state before its own token's decay). ``q``, ``k``, ``g``: ``n x d`` tiles of one chunk
    (``n`` a power of two), ``g`` the log decays (<= 0)."""
    n, d = q.shape
    if n & (n - 1):
        raise ValueError(f"decayed_scores: q has {n} rows; the levels halve a power-of-two chunk")
    row, none = iota(n), zeros(1, d)
    scores = 0.0 if strict else eye(n) * rowsum(q * k)
    h = 1
    while h < n:  # upwards: a window of 2h rows keeps the pairs of the levels below (fewer than h rows apart)
        block = floor(row * (1.0 / h))  # row's h-row block
        offset = row - block * h  # row's place in it
        not_first, not_last = where(offset > 0.0, 1.0, 0.0), where(offset < h - 1.0, 1.0, 0.0)
        second_half = block - 2.0 * floor(row * (0.5 / h))  # 1 in the second h rows of a 2h-row block
        from_key = not_last * linrec(not_last, g, none, reverse=True, exclusive=True)  # g after j, in j's block
        keys = k * (exp(from_key) * (1.0 - second_half))
        if strict:  # g over the block's rows before i
            to_query = not_first * linrec(not_first, g, none, exclusive=True)
        else:  # g over the block's rows through i
            to_query = linrec(not_first, g, none)
        # queries of second halves, keys of first halves; fewer than 2h rows apart: the same 2h-row block
        scores = window(scores + (q * (exp(to_query) * second_half)) @ keys.T, 2 * h)
        h *= 2
    return scores
