"""The tile pieces the attention programs share (``attention``'s and ``attention_decode``'s): the
online softmax over key chunks, the masks of visible keys, the denominator of rows that see no key,
the key chunk declared per head dim, and program variants with other parameter kinds."""

from __future__ import annotations

import types

from tilemix.tiles import Kernel, causal, chunks, exp2, full, in_seq, maximum, rowmax, rowsum, zeros
from tilemix.tiles import window as sliding_window

__all__ = ["NEG_INF", "LOG2E", "NO_SCORE_YET", "EMPTY_ROW", "KEYS", "visible", "cross_keys", "online_softmax",
           "nonzero_denominator", "key_chunk", "variant"]

NEG_INF = float("-inf")
LOG2E = 1.4426950408889634
# A sliding window's first key chunk may hold no key some rows of the query block see: a running max
# that starts finite keeps those rows' exp2(s - m) at 0 where -inf - -inf would make it NaN.
NO_SCORE_YET = -1e30
EMPTY_ROW = 1e-30  # the denominator of a cross-attention row that sees no key (``nonzero_denominator``)


def visible(s, is_causal, window, transposed=False):
    """Scores ``s`` with the keys a query does not see at -inf: those outside its sliding window of
    ``window`` keys (itself and the ones before), after it (``is_causal``), or past the end.
    ``transposed``: keys on the rows, queries on the columns."""
    if window:
        return sliding_window(s, window, fill=NEG_INF, transposed=transposed)
    if is_causal:
        return causal(s, fill=NEG_INF, transposed=transposed)
    return in_seq(s, fill=NEG_INF)


def cross_keys(q, k) -> bool:
    """Whether the keys run along a sequence of their own (``Seq.along("S")``: cross-attention,
    Tq != Tk), where under a causal mask aligned to the ends a query may see no key at all."""
    return k.seq_dim != q.seq_dim


def online_softmax(qi, k, v, i, scale, is_causal, window, block, chunk, cross, keys=None):
    """One query block's unnormalised output, running row max (of the scores in base-2 units:
    ``scale · log2(e) · q·k``, so each probability is one ``exp2`` of a difference) and denominator
    over its key chunks (the flash-attention recurrence; with a ``window`` only the chunks inside
    it), shared by the forward programs. ``cross``: keys along their own dim (``cross_keys``);
    ``keys``: the loop over the key chunks, if not those the query block sees (a decode split's)."""
    m = full(block, 1, NO_SCORE_YET if window or cross else NEG_INF)
    denom, acc = zeros(block, 1), zeros(block, v.cols)
    scale2 = scale * LOG2E
    keys = keys or chunks(chunk, dim=k.seq_dim, through=i if is_causal else None, window=window)
    for j in keys:
        s = (qi @ k[j].T) * scale2  # scaled in fp32: q * scale in bf16 would round q again
        s = visible(s, is_causal, window)
        m_new = maximum(m, rowmax(s))
        p, alpha = exp2(s - m_new), exp2(m - m_new)
        denom = denom * alpha + rowsum(p)
        acc = acc * alpha + p @ v[j]
        m = m_new
    return acc, m, denom


def nonzero_denominator(denom, cross):
    """The softmax denominator to divide by: as it is, or, for cross-attention, at least
    ``EMPTY_ROW``, so a row that sees no key (0 of them summed) outputs 0, as FlashAttention 2.1+
    does, and its log-sum-exp stays finite (about ``NO_SCORE_YET``), so the backward programs'
    ``exp(-inf - lse)`` is 0 there, not NaN. A row that sees a key sums at least 1 (its top score's
    ``exp2(0)``), so the floor changes no other row."""
    return maximum(denom, EMPTY_ROW) if cross else denom


KEYS = "S"  # the keys' sequence dim in the cross-attention programs (Tk; the queries' is T)


def key_chunk(args: dict) -> dict:
    """The forward programs' key chunk for these q and v (tensors or TensorSpecs): their default (128
    keys; 64 on the generic target forced on a Hopper) up to head dim 128; 64 beyond, where two ring
    stages of 128-key k and v chunks and two query blocks do not fit shared memory: at D = 256 128-key
    chunks run one consumer warpgroup on a one-stage ring, 64-key chunks two on two stages, about twice
    as fast (bench/NOTES.md). Declared beside the programs; the ops and ``ops.examples`` (what ``tilemix tune``
    tunes, and caches under) apply it through ``schedule.call_consts``."""
    return {} if max(args["q"].shape[-1], args["v"].shape[-1]) <= 128 else dict(chunk=64)


def variant(program: Kernel, suffix: str, specs: dict) -> Kernel:
    """``program`` with the parameters ``specs`` names declared as given (those it has), named
    ``<name>_<suffix>``: the same function, traced with other parameter kinds. A program of its own,
    not a flag, because the kinds change the generated code that reads and writes those tensors."""
    fn = program.fn
    name = f"{fn.__name__}_{suffix}"
    variant = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    variant.__qualname__, variant.__kwdefaults__, variant.__doc__ = name, fn.__kwdefaults__, fn.__doc__
    variant.__annotations__ = {**fn.__annotations__,
                               **{n: spec for n, spec in specs.items() if n in fn.__annotations__}}
    return Kernel(variant, program.target_consts)
