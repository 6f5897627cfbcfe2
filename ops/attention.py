"""Softmax attention with an online softmax over key chunks (FlashAttention-style).

The backward is FlashAttention-2's, as two more tile programs that recompute the probabilities of
each tile from q, k and the row log-sum-exp the training forward saves (``attention_fwd_lse``):
``attention_bwd_dq`` (per query block, over the key chunks: dq, and the rows' ``delta = Σ do·o``)
and ``attention_bwd_dkdv`` (per key block, over the query chunks, on transposed scores ``k qᵀ``:
dk, dv). Two programs because the language has no atomics: each gradient has one writer.

Grouped-query attention (GQA/MQA: k and v with ``G`` heads, ``H % G == 0``, query head h reading kv
head ``h // (H // G)``) runs the same four programs with k and v declared ``GroupSeq`` (``*_gqa``,
made by ``variant``). Its dk/dv program writes each query head's share of the gradients, per
query head ``[B, T, H, D]``, and torch sums the heads of each group, as SSD's backward does for its
group tensors: the language has no loop over the heads of a program instance.

Cross-attention (Tq != Tk) runs them once more with k and v (and dk, dv) along a sequence of their
own (``Seq.along("S")``, ``*_cross`` and ``*_cross_gqa``): loop bounds and masks between the two
align their ends (FlashAttention's causal rule), and a query that sees no key outputs 0."""

from __future__ import annotations

import torch

from tilemix.codegen.schedule import declare
from tilemix.tiles import Const, GroupSeq, Kernel, Out, Scalar, Seq, blocks, chunks, exp, kernel, log, rowsum, zeros

from ._library import tile_op
from .attention_decode import attention_decode, decode_split
from .attention_tiles import KEYS, LOG2E, cross_keys, key_chunk, nonzero_denominator, online_softmax, variant, visible
from .fastpath import fast_path
from .runtime import call_with_target, check_call, current_target, default_scale, use_target
from .varlen import ARGUMENT as VARLEN
from .varlen import Packed, check_cu_seqlens, check_longest

__all__ = ["attention", "attention_fwd", "attention_fwd_lse", "attention_bwd_dq", "attention_bwd_dkdv",
           "attention_fwd_gqa", "attention_fwd_lse_gqa", "attention_bwd_dq_gqa", "attention_bwd_dkdv_gqa",
           "attention_fwd_cross", "attention_fwd_lse_cross", "attention_bwd_dq_cross", "attention_bwd_dkdv_cross",
           "attention_fwd_cross_gqa", "attention_fwd_lse_cross_gqa", "attention_bwd_dq_cross_gqa",
           "attention_bwd_dkdv_cross_gqa"]

# mma.sync (the generic target): a warp holds 16 rows of each 64-row block of a tile, so 128-query
# blocks load each key/value fragment once for two row blocks (bench/history/NOTES-2026-11.md, "Generic target").
# Measured on sm_90 only: sm_80's 163 KiB holds one such block per CTA, not two.
GENERIC_BLOCKS = {"sm_90": dict(block=128, chunk=64)}


@kernel(target_consts=GENERIC_BLOCKS)
def attention_fwd(q: Seq["D"], k: Seq["D"], v: Seq["V"], scale: Scalar, o: Out[Seq["V"]],
                  is_causal: Const = False, window: Const = None, block: Const = 64, chunk: Const = 128):
    """Softmax attention per query block; ``window=W`` (with ``is_causal``): each query sees its last
    ``W`` keys (itself included), and only the key chunks holding them are visited."""
    for i in blocks(block):  # one program instance per query block
        cross = cross_keys(q, k)
        acc, _, denom = online_softmax(q[i], k, v, i, scale, is_causal, window, block, chunk, cross)
        o[i] = acc / nonzero_denominator(denom, cross)


@kernel(target_consts=GENERIC_BLOCKS)
def attention_fwd_lse(q: Seq["D"], k: Seq["D"], v: Seq["V"], scale: Scalar, o: Out[Seq["V"]], lse: Out[Seq[1]],
                      is_causal: Const = False, window: Const = None, block: Const = 64, chunk: Const = 128):
    """``attention_fwd`` that also writes each query's log-sum-exp of its scaled scores (float32): what
    the backward programs need to recompute the probabilities. Run only when gradients are wanted."""
    for i in blocks(block):
        cross = cross_keys(q, k)
        acc, m, denom = online_softmax(q[i], k, v, i, scale, is_causal, window, block, chunk, cross)
        denom = nonzero_denominator(denom, cross)
        o[i] = acc / denom
        lse[i] = m * (1 / LOG2E) + log(denom)  # natural-log units, what the backward programs read


@kernel
def attention_bwd_dq(q: Seq["D"], k: Seq["D"], v: Seq["V"], o: Seq["V"], do: Seq["V"], lse: Seq[1], scale: Scalar,
                     dq: Out[Seq["D"]], delta: Out[Seq[1]],
                     is_causal: Const = False, window: Const = None, block: Const = 64, chunk: Const = 64):
    """Per query block: ``dq = scale · Σ_j ds_j k_j`` with ``ds = p · (do vᵀ - delta)``, p recomputed
    from the saved log-sum-exp; also writes ``delta = rowsum(do · o)`` for the dk/dv program."""
    for i in blocks(block):
        qi, doi, li = q[i], do[i], lse[i]
        di = rowsum(doi * o[i])
        delta[i] = di
        acc = zeros(block, q.cols)
        for j in chunks(chunk, dim=k.seq_dim, through=i if is_causal else None, window=window):
            kj = k[j]
            s, dp = qi @ kj.T, doi @ v[j].T  # both products in flight before either is read
            s = visible(s * scale, is_causal, window)
            p = exp(s - li)
            acc = acc + (p * (dp - di)) @ kj
        dq[i] = acc * scale


@kernel
def attention_bwd_dkdv(q: Seq["D"], k: Seq["D"], v: Seq["V"], do: Seq["V"], lse: Seq[1], delta: Seq[1],
                       scale: Scalar, dk: Out[Seq["D"]], dv: Out[Seq["V"]],
                       is_causal: Const = False, window: Const = None, block: Const = 64, chunk: Const = 64):
    """Per key block, over the query chunks that see it (causal: from the block's own chunk on; with
    a window, up to the chunk of its last key's last query), on transposed tiles (keys on rows):
    ``dv = Σ_i pᵀ_i do_i``, ``dk = scale · Σ_i dsᵀ_i q_i``."""
    for j in blocks(block, dim=k.seq_dim):
        kj, vj = k[j], v[j]
        dkj, dvj = zeros(block, k.cols), zeros(block, v.cols)
        for i in chunks(chunk, start=j if is_causal else None, window=window):
            qi, doi = q[i], do[i]
            st, dpt = kj @ qi.T, vj @ doi.T  # scoresᵀ (a key per row, a query per column) and dpᵀ
            li, di = lse[i].T, delta[i].T
            st = st * scale
            st = visible(st, is_causal, window, transposed=True)
            pt = exp(st - li)
            dvj = dvj + pt @ doi
            dkj = dkj + (pt * (dpt - di)) @ qi
        dk[j] = dkj * scale
        dv[j] = dvj


# Grouped-query attention: k and v with G heads (query head h reads kv head h // (H // G)).
_GROUPED = dict(k=GroupSeq["D"], v=GroupSeq["V"])
# Cross-attention: k and v (and their gradients) along a sequence of their own, aligned to its end.
_CROSS = dict(k=Seq.along(KEYS)["D"], v=Seq.along(KEYS)["V"], dk=Out[Seq.along(KEYS)["D"]],
              dv=Out[Seq.along(KEYS)["V"]])
_CROSS_GROUPED = {**_CROSS, "k": GroupSeq.along(KEYS)["D"], "v": GroupSeq.along(KEYS)["V"]}

attention_fwd_gqa, attention_fwd_lse_gqa, attention_bwd_dq_gqa, attention_bwd_dkdv_gqa = (
    variant(p, "gqa", _GROUPED) for p in (attention_fwd, attention_fwd_lse, attention_bwd_dq, attention_bwd_dkdv))
attention_fwd_cross, attention_fwd_lse_cross, attention_bwd_dq_cross, attention_bwd_dkdv_cross = (
    variant(p, "cross", _CROSS) for p in (attention_fwd, attention_fwd_lse, attention_bwd_dq, attention_bwd_dkdv))
attention_fwd_cross_gqa, attention_fwd_lse_cross_gqa, attention_bwd_dq_cross_gqa, attention_bwd_dkdv_cross_gqa = (
    variant(p, "cross_gqa", _CROSS_GROUPED)
    for p in (attention_fwd, attention_fwd_lse, attention_bwd_dq, attention_bwd_dkdv))

declare(attention_fwd, attention_fwd_lse, attention_fwd_gqa, attention_fwd_lse_gqa, attention_fwd_cross,
        attention_fwd_lse_cross, attention_fwd_cross_gqa, attention_fwd_lse_cross_gqa, consts=key_chunk)


# a packed batch: the queries' offsets, the keys' where they differ, the longest lengths where given (-1: none)
_PACKING = "Tensor? cu_seqlens=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=-1, int max_seqlen_k=-1"


def _packing(cu_seqlens=None, cu_seqlens_k=None, max_seqlen_q=-1, max_seqlen_k=-1):
    """The programs' ``cu_seqlens`` argument (``ops/varlen.py``) from the ops' packing arguments:
    None, the offsets (queries and keys alike, no length given), or a ``Packed`` (keys along ``S``)."""
    if cu_seqlens is None:
        return None
    longest = {d: n for d, n in (("T", max_seqlen_q), ("S", max_seqlen_k)) if n >= 0}
    if cu_seqlens_k is None and not longest:
        return cu_seqlens
    return Packed({"T": cu_seqlens, **({} if cu_seqlens_k is None else {KEYS: cu_seqlens_k})}, longest)


def _forward_args(q, k, v, causal, scale, window=0, *packing):
    return dict(q=q, k=k, v=v, scale=scale, is_causal=causal, window=window or None,
                **{VARLEN: _packing(*packing)}), {}, None


def _backward_args(saved: str):
    """The ``to_args`` of a backward op whose schema takes ``saved`` (the forward's ``o``, or the
    dq program's ``delta``) after the shared arguments."""
    def to_args(q, k, v, do, lse, causal, scale, value, window=0, *packing):
        return dict(q=q, k=k, v=v, do=do, lse=lse, scale=scale, is_causal=causal, window=window or None,
                    **{saved: value, VARLEN: _packing(*packing)}), {}, None
    return to_args


_BWD_ARGS = "Tensor q, Tensor k, Tensor v, Tensor do, Tensor lse, bool causal, float scale"
_FWD_SCHEMA = f"(Tensor q, Tensor k, Tensor v, bool causal, float scale, int window=0, {_PACKING})"


def _attention_ops(name: str, fwd: Kernel, fwd_lse: Kernel, bwd_dq: Kernel, bwd_dkdv: Kernel):
    """The custom ops ``tilemix::<name>`` (forward) and ``<name>_lse`` (the training forward: also the
    rows' log-sum-exp ``[B, T, H]``, float32, saved for the backward), both differentiable, on the
    four programs given; the backward programs are ops too (``<name>_bwd_dq``, ``<name>_bwd_dkdv``),
    so a compiled training step (AOT autograd traces the backward with fake tensors) sees them as ops,
    not as Python. ``window``: the sliding window of causal attention (0: none); ``_PACKING``: a
    packed batch (``ops/varlen.py``). Returns the four ops ``(plain, lse, bwd_dq, bwd_dkdv)``."""
    plain = tile_op(name, f"{_FWD_SCHEMA} -> Tensor", fwd, _forward_args, lambda out: out["o"])
    lse_op = tile_op(f"{name}_lse", f"{_FWD_SCHEMA} -> (Tensor, Tensor)",
                     fwd_lse, _forward_args, lambda out: (out["o"], out["lse"]))
    dq_op = tile_op(f"{name}_bwd_dq", f"({_BWD_ARGS}, Tensor o, int window=0, {_PACKING}) -> (Tensor, Tensor)",
                    bwd_dq, _backward_args("o"), lambda out: (out["dq"], out["delta"]))
    dkdv_op = tile_op(f"{name}_bwd_dkdv", f"({_BWD_ARGS}, Tensor delta, int window=0, {_PACKING}) -> (Tensor, Tensor)",
                      bwd_dkdv, _backward_args("delta"), lambda out: (out["dk"], out["dv"]))

    def gradients(ctx, q, k, v, o, lse, do, offsets):
        """dq (and delta) from one program, dk and dv from the other (skipped if neither is wanted);
        grouped k and v: the query heads' shares summed over each group."""
        args = (q, k, v, do.contiguous(), lse, ctx.causal, ctx.scale)
        packing = (*offsets, *ctx.longest)
        dk = dv = None
        with use_target(ctx.target):  # the backward programs run on the forward's target
            dq, delta = dq_op(*args, o, ctx.window, *packing)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                dk, dv = (_group_sum(t, k.shape[2]) for t in dkdv_op(*args, delta, ctx.window, *packing))
        return dq, dk, dv, None, None, None, None, None, None, None

    def setup_lse(ctx, inputs, output):
        q, k, v, causal, scale, window, *packing = inputs
        ctx.causal, ctx.scale, ctx.window, ctx.target = causal, scale, window, current_target()
        ctx.longest = tuple(packing[2:])
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(q, k, v, *output, *packing[:2])

    def backward_lse(ctx, do, _dlse):
        *saved, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
        return gradients(ctx, *saved, do, (cu_seqlens, cu_seqlens_k))

    def setup(ctx, inputs, output):
        q, k, v, causal, scale, window, *packing = inputs
        ctx.causal, ctx.scale, ctx.window, ctx.target = causal, scale, window, current_target()
        ctx.longest = tuple(packing[2:])
        ctx.save_for_backward(q, k, v, output, *packing[:2])

    def backward(ctx, do):
        """The plain op called directly saved no log-sum-exp: recompute it (one more forward pass;
        ``attention()`` runs the ``_lse`` op instead when gradients are wanted)."""
        q, k, v, o, *offsets = ctx.saved_tensors
        with use_target(ctx.target):
            _, lse = lse_op(q, k, v, ctx.causal, ctx.scale, ctx.window, *offsets, *ctx.longest)
        return gradients(ctx, q, k, v, o, lse, do, offsets)

    lse_op.register_autograd(backward_lse, setup_context=setup_lse)
    plain.register_autograd(backward, setup_context=setup)
    return plain, lse_op, dq_op, dkdv_op


def _group_sum(per_head: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, T, H, D]`` per-query-head gradients summed over each group's heads: ``[B, T, G, D]`` in
    ``per_head``'s dtype (torch accumulates 16-bit sums in float32 and rounds once)."""
    b, t, h, d = per_head.shape
    return per_head if h == groups else per_head.view(b, t, groups, h // groups, d).sum(3)


attention_op, attention_lse_op, attention_bwd_dq_op, attention_bwd_dkdv_op = _attention_ops(
    "attention", attention_fwd, attention_fwd_lse, attention_bwd_dq, attention_bwd_dkdv)
attention_gqa_op, attention_gqa_lse_op, attention_gqa_bwd_dq_op, attention_gqa_bwd_dkdv_op = _attention_ops(
    "attention_gqa", attention_fwd_gqa, attention_fwd_lse_gqa, attention_bwd_dq_gqa, attention_bwd_dkdv_gqa)
attention_cross_op, attention_cross_lse_op, attention_cross_bwd_dq_op, attention_cross_bwd_dkdv_op = _attention_ops(
    "attention_cross", attention_fwd_cross, attention_fwd_lse_cross, attention_bwd_dq_cross, attention_bwd_dkdv_cross)
(attention_cross_gqa_op, attention_cross_gqa_lse_op, attention_cross_gqa_bwd_dq_op,
 attention_cross_gqa_bwd_dkdv_op) = _attention_ops(
    "attention_cross_gqa", attention_fwd_cross_gqa, attention_fwd_lse_cross_gqa, attention_bwd_dq_cross_gqa,
    attention_bwd_dkdv_cross_gqa)
# (plain, training forward) ops by (keys along their own sequence, grouped k and v)
_OPS = {(False, False): (attention_op, attention_lse_op), (False, True): (attention_gqa_op, attention_gqa_lse_op),
        (True, False): (attention_cross_op, attention_cross_lse_op),
        (True, True): (attention_cross_gqa_op, attention_cross_gqa_lse_op)}


@fast_path
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None, *, window: int | None = None, cu_seqlens: torch.Tensor | None = None,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
              target: str | None = None) -> torch.Tensor:
    """Multi-head softmax attention. q: ``[B, Tq, H, D]``; k: ``[B, Tk, H_kv, D]``; v: ``[B, Tk, H_kv, V]``
    with ``H % H_kv == 0``: grouped-query attention where ``H_kv < H`` (query head h reads kv head
    ``h // (H // H_kv)``, torch SDPA's ``enable_gqa``; ``H_kv = 1``: multi-query); ``Tq != Tk``:
    cross-attention (the ``*_cross`` programs, keys along ``Seq.along("S")``), causal aligned to the
    end as FlashAttention does (query i sees keys ``j <= i + Tk - Tq``; a query that sees no key,
    ``i < Tq - Tk``, outputs 0: a KV-cache decode step is ``causal=True`` with the cache as k, v;
    without gradients, a few queries against many keys run split over the keys, flash-decoding,
    ``ops/attention_decode.py``);
    scale defaults to ``D ** -0.5``; ``causal`` masks keys after each query; ``window=W`` (a positive
    int, with ``causal=True``): sliding-window attention, each query sees keys ``t - W + 1 … t``, and
    the programs visit only the key (query) chunks inside the window, O(T·W) work (``W >= T``: plain
    causal attention).
    Returns ``[B, T, H, V]``. Differentiable: when a gradient is wanted the forward also saves the
    rows' log-sum-exp (``attention_fwd_lse``) and the backward runs ``attention_bwd_dq`` and
    ``attention_bwd_dkdv`` (``*_gqa`` programs for grouped k and v); otherwise it runs ``attention_fwd``
    alone. ``target``: "auto" (default: $TILEMIX_TARGET, else by the GPU), "hopper" or "generic" (the
    mma.sync kernels, also on an H100).
    ``cu_seqlens``: int32 ``[N + 1]``, N sequences packed into one row (B = 1) for queries and keys
    alike: each attends within itself (``ops/varlen.py``). FlashAttention's varlen: ``cu_seqlens_q``
    and ``cu_seqlens_k`` (both, the same N), query sequence i against key sequence i, causal aligned
    to the end of each pair as in cross-attention (the ``*_cross`` programs, keys packed by offsets
    of their own). On a GPU a host read of the longest length sizes the grid, unless ``max_seqlen_q``
    (and for the backward ``max_seqlen_k``) give it: then the offsets are not read and, as in
    FlashAttention, are trusted, a length below the longest drops rows (on the CPU both are checked)."""
    check_call("attention", differentiable=True, target=target, flags=dict(causal=causal), q=q, k=k, v=v)
    cu_seqlens, cu_seqlens_k = _offsets(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    cross = cu_seqlens_k is not None or _cross_lengths(q, k, window, cu_seqlens)
    packing = ()
    if cu_seqlens is not None:
        packing = _checked_packing(q, k, window, cu_seqlens, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    window = _op_window(window, causal, q)
    scale = default_scale(q, scale)
    plain, with_lse = _OPS[cross, _grouped(q, k)]
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v)):
        return call_with_target(target, with_lse, q, k, v, bool(causal), scale, window, *packing)[0]
    split = decode_split(q, k) if cu_seqlens is None and not window else None
    if split is not None:
        return call_with_target(target, attention_decode, q, k, v, bool(causal), scale, split)
    return call_with_target(target, plain, q, k, v, bool(causal), scale, window, *packing)


def _offsets(cu_seqlens, cu_seqlens_q, cu_seqlens_k):
    """``(queries' offsets, keys' offsets or None where they are the queries')``: ``cu_seqlens``, or
    ``cu_seqlens_q`` with ``cu_seqlens_k`` (both or neither; not with ``cu_seqlens``)."""
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return cu_seqlens, None
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens: pass it (queries and keys packed alike) or cu_seqlens_q and cu_seqlens_k, "
                         "not both")
    if cu_seqlens_q is None or cu_seqlens_k is None:
        missing = "cu_seqlens_q" if cu_seqlens_q is None else "cu_seqlens_k"
        raise ValueError(f"{missing}: cu_seqlens_q and cu_seqlens_k go together (or pass cu_seqlens alone)")
    return cu_seqlens_q, None if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k


def _checked_packing(q, k, window, cu_seqlens, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple:
    """The ops' packing arguments (``_PACKING``) after checking each against q and k."""
    separate = cu_seqlens_k is not None
    q_name = "cu_seqlens_q" if separate else "cu_seqlens"
    longest_q = check_longest(max_seqlen_q, cu_seqlens, "max_seqlen_q")
    n = check_cu_seqlens(cu_seqlens, q, "q", q_name, trusted=longest_q is not None)
    longest_k = None
    if separate:
        if window is not None:
            raise ValueError("cu_seqlens_k: a sliding window takes keys and queries of one length; pass cu_seqlens")
        longest_k = check_longest(max_seqlen_k, cu_seqlens_k, "max_seqlen_k")
        n_k = check_cu_seqlens(cu_seqlens_k, k, "k", "cu_seqlens_k", trusted=longest_q is not None)
        if n_k != n:
            raise ValueError(f"cu_seqlens_k: packs {n_k} sequences, cu_seqlens_q {n}; each query sequence "
                             "has its key sequence")
    elif max_seqlen_k is not None:
        longest_k = check_longest(max_seqlen_k, cu_seqlens, "max_seqlen_k")
    return (cu_seqlens, cu_seqlens_k, -1 if longest_q is None else longest_q, -1 if longest_k is None else longest_k)


def _op_window(window, causal, q) -> int:
    """The ops' ``window`` argument: 0 for none, or for one that holds the whole sequence (causal
    attention, one specialisation for any such W); else ``window``. It must be None or a positive
    int, and only with ``causal=True``: a ValueError (TypeError for a non-int) naming it."""
    if window is None:
        return 0
    if not isinstance(window, int) or isinstance(window, bool):
        raise TypeError(f"window: expected a positive int (keys each query sees) or None, got {window!r}")
    if window <= 0:
        raise ValueError(f"window: expected a positive int (keys each query sees), got {window}")
    if not causal:
        raise ValueError("window: a sliding window is causal (each query sees the W keys up to itself); "
                         "pass causal=True with it")
    return 0 if q.dim() == 4 and window >= q.shape[1] else window


def _cross_lengths(q: torch.Tensor, k: torch.Tensor, window, cu_seqlens) -> bool:
    """Whether k's length differs from q's (cross-attention); with a sliding window or packed
    sequences under one set of offsets (which take one length) that is a ValueError naming k."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] == k.shape[1]:
        return False  # a wrong rank: the programs' binding names the argument
    lengths = f"k has {k.shape[1]} tokens, q {q.shape[1]}"
    if cu_seqlens is not None:
        raise ValueError(f"k: with cu_seqlens q, k and v pack the same sequences (one set of offsets: pass "
                         f"cu_seqlens_q and cu_seqlens_k for others); {lengths}")
    if window is not None:
        raise ValueError(f"k: a sliding window takes keys and queries of one length; {lengths}")
    return True


def _grouped(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether k has fewer heads than q (the ``*_gqa`` programs); k's head count not dividing q's is
    a ValueError naming k."""
    if q.dim() != 4 or k.dim() != 4:
        return False  # the programs' binding names the argument of the wrong rank
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != heads and (kv_heads == 0 or heads % kv_heads):
        raise ValueError(f"k: its {kv_heads} heads must divide q's {heads} heads (grouped-query attention: "
                         f"k and v of shape [B, T, H_kv, D] with H % H_kv == 0)")
    return kv_heads != heads
