"""Softmax attention with an online softmax over key chunks (FlashAttention-style).

The backward is FlashAttention-2's, as two more tile programs that recompute the probabilities of
each tile from q, k and the row log-sum-exp the training forward saves (``attention_fwd_lse``):
``attention_bwd_dq`` (per query block, over the key chunks: dq, and the rows' ``delta = Σ do·o``)
and ``attention_bwd_dkdv`` (per key block, over the query chunks, on transposed scores ``k qᵀ``:
dk, dv). Two programs because the language has no atomics: each gradient has one writer."""

from __future__ import annotations

import torch

from tilemix.codegen.schedule import declare
from tilemix.tiles import (
    Const,
    Out,
    Scalar,
    Seq,
    blocks,
    causal,
    chunks,
    exp,
    exp2,
    full,
    in_seq,
    kernel,
    log,
    maximum,
    rowmax,
    rowsum,
    zeros,
)

from ._library import tile_op
from .runtime import call_with_target, check_call, current_target, default_scale, use_target

__all__ = ["attention", "attention_fwd", "attention_fwd_lse", "attention_bwd_dq", "attention_bwd_dkdv"]

NEG_INF = float("-inf")
LOG2E = 1.4426950408889634


def _online_softmax(qi, k, v, i, scale, is_causal, block, chunk):
    """One query block's unnormalised output, running row max (of the scores in base-2 units:
    ``scale · log2(e) · q·k``, so each probability is one ``exp2`` of a difference) and denominator
    over its key chunks (the flash-attention recurrence), shared by the two forward programs."""
    m, denom, acc = full(block, 1, NEG_INF), zeros(block, 1), zeros(block, v.cols)
    scale2 = scale * LOG2E
    for j in chunks(chunk, through=i if is_causal else None):
        s = (qi @ k[j].T) * scale2  # scaled in fp32: q * scale in bf16 would round q again
        s = causal(s, fill=NEG_INF) if is_causal else in_seq(s, fill=NEG_INF)
        m_new = maximum(m, rowmax(s))
        p, alpha = exp2(s - m_new), exp2(m - m_new)
        denom = denom * alpha + rowsum(p)
        acc = acc * alpha + p @ v[j]
        m = m_new
    return acc, m, denom


# mma.sync (the generic target): a warp holds 16 rows of each 64-row block of a tile, so 128-query
# blocks load each key/value fragment once for two row blocks (bench/NOTES.md, "Generic target").
# Measured on sm_90 only: sm_80's 163 KiB holds one such block per CTA, not two.
GENERIC_BLOCKS = {"sm_90": dict(block=128, chunk=64)}


@kernel(target_consts=GENERIC_BLOCKS)
def attention_fwd(q: Seq["D"], k: Seq["D"], v: Seq["V"], scale: Scalar, o: Out[Seq["V"]],
                  is_causal: Const = False, block: Const = 64, chunk: Const = 128):
    for i in blocks(block):  # one program instance per query block
        acc, _, denom = _online_softmax(q[i], k, v, i, scale, is_causal, block, chunk)
        o[i] = acc / denom


@kernel(target_consts=GENERIC_BLOCKS)
def attention_fwd_lse(q: Seq["D"], k: Seq["D"], v: Seq["V"], scale: Scalar, o: Out[Seq["V"]], lse: Out[Seq[1]],
                      is_causal: Const = False, block: Const = 64, chunk: Const = 128):
    """``attention_fwd`` that also writes each query's log-sum-exp of its scaled scores (float32): what
    the backward programs need to recompute the probabilities. Run only when gradients are wanted."""
    for i in blocks(block):
        acc, m, denom = _online_softmax(q[i], k, v, i, scale, is_causal, block, chunk)
        o[i] = acc / denom
        lse[i] = m * (1 / LOG2E) + log(denom)  # natural-log units, what the backward programs read


@kernel
def attention_bwd_dq(q: Seq["D"], k: Seq["D"], v: Seq["V"], o: Seq["V"], do: Seq["V"], lse: Seq[1], scale: Scalar,
                     dq: Out[Seq["D"]], delta: Out[Seq[1]],
                     is_causal: Const = False, block: Const = 64, chunk: Const = 64):
    """Per query block: ``dq = scale · Σ_j ds_j k_j`` with ``ds = p · (do vᵀ - delta)``, p recomputed
    from the saved log-sum-exp; also writes ``delta = rowsum(do · o)`` for the dk/dv program."""
    for i in blocks(block):
        qi, doi, li = q[i], do[i], lse[i]
        di = rowsum(doi * o[i])
        delta[i] = di
        acc = zeros(block, q.cols)
        for j in chunks(chunk, through=i if is_causal else None):
            kj = k[j]
            s, dp = qi @ kj.T, doi @ v[j].T  # both products in flight before either is read
            s = causal(s * scale, fill=NEG_INF) if is_causal else in_seq(s * scale, fill=NEG_INF)
            p = exp(s - li)
            acc = acc + (p * (dp - di)) @ kj
        dq[i] = acc * scale


@kernel
def attention_bwd_dkdv(q: Seq["D"], k: Seq["D"], v: Seq["V"], do: Seq["V"], lse: Seq[1], delta: Seq[1],
                       scale: Scalar, dk: Out[Seq["D"]], dv: Out[Seq["V"]],
                       is_causal: Const = False, block: Const = 64, chunk: Const = 64):
    """Per key block, over the query chunks that see it (causal: from the block's own chunk on), on
    transposed tiles (keys on rows): ``dv = Σ_i pᵀ_i do_i``, ``dk = scale · Σ_i dsᵀ_i q_i``."""
    for j in blocks(block):
        kj, vj = k[j], v[j]
        dkj, dvj = zeros(block, k.cols), zeros(block, v.cols)
        for i in chunks(chunk, start=j if is_causal else None):
            qi, doi = q[i], do[i]
            st, dpt = kj @ qi.T, vj @ doi.T  # scoresᵀ (a key per row, a query per column) and dpᵀ
            li, di = lse[i].T, delta[i].T
            st = st * scale
            st = causal(st, fill=NEG_INF, transposed=True) if is_causal else in_seq(st, fill=NEG_INF)
            pt = exp(st - li)
            dvj = dvj + pt @ doi
            dkj = dkj + (pt * (dpt - di)) @ qi
        dk[j] = dkj * scale
        dv[j] = dvj


def key_chunk(args: dict) -> dict:
    """The forward programs' key chunk for these q and v (tensors or TensorSpecs): their default (128
    keys; 64 on the generic target forced on a Hopper) up to head dim 128; 64 beyond, where two ring
    stages of 128-key k and v chunks and two query blocks do not fit shared memory: at D = 256 128-key
    chunks run one consumer warpgroup on a one-stage ring, 64-key chunks two on two stages, about twice
    as fast (bench/NOTES.md). Declared below; the ops and ``ops.examples`` (what ``tilemix tune``
    tunes, and caches under) apply it through ``schedule.call_consts``."""
    return {} if max(args["q"].shape[-1], args["v"].shape[-1]) <= 128 else dict(chunk=64)


declare(attention_fwd, attention_fwd_lse, consts=key_chunk)

attention_op = tile_op("attention", "(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> Tensor",
                       attention_fwd,
                       lambda q, k, v, causal, scale: (dict(q=q, k=k, v=v, scale=scale, is_causal=causal), {}, None),
                       lambda out: out["o"])

# the training forward: also returns the rows' log-sum-exp [B, T, H] (float32), saved for the backward
attention_lse_op = tile_op("attention_lse",
                           "(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)",
                           attention_fwd_lse,
                           lambda q, k, v, causal, scale: (dict(q=q, k=k, v=v, scale=scale, is_causal=causal),
                                                           {}, None),
                           lambda out: (out["o"], out["lse"]))


# the backward programs as custom ops too, so a compiled training step (AOT autograd traces the
# backward with fake tensors) sees them as ops, not as Python
_BWD_ARGS = "Tensor q, Tensor k, Tensor v, Tensor do, Tensor lse, bool causal, float scale"
attention_bwd_dq_op = tile_op(
    "attention_bwd_dq", f"({_BWD_ARGS}, Tensor o) -> (Tensor, Tensor)", attention_bwd_dq,
    lambda q, k, v, do, lse, causal, scale, o: (dict(q=q, k=k, v=v, o=o, do=do, lse=lse, scale=scale,
                                                     is_causal=causal), {}, None),
    lambda out: (out["dq"], out["delta"]))
attention_bwd_dkdv_op = tile_op(
    "attention_bwd_dkdv", f"({_BWD_ARGS}, Tensor delta) -> (Tensor, Tensor)", attention_bwd_dkdv,
    lambda q, k, v, do, lse, causal, scale, delta: (dict(q=q, k=k, v=v, do=do, lse=lse, delta=delta, scale=scale,
                                                         is_causal=causal), {}, None),
    lambda out: (out["dk"], out["dv"]))


def _gradients(ctx, q, k, v, o, lse, do):
    """dq (and delta) from one program, dk and dv from the other (skipped if neither is wanted)."""
    args = (q, k, v, do.contiguous(), lse, ctx.causal, ctx.scale)
    dk = dv = None
    with use_target(ctx.target):  # the backward programs run on the forward's target
        dq, delta = attention_bwd_dq_op(*args, o)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dk, dv = attention_bwd_dkdv_op(*args, delta)
    return dq, dk, dv, None, None


def _setup_lse(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    ctx.causal, ctx.scale, ctx.target = causal, scale, current_target()
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, *output)


def _backward_lse(ctx, do, _dlse):
    return _gradients(ctx, *ctx.saved_tensors, do)


def _setup(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    ctx.causal, ctx.scale, ctx.target = causal, scale, current_target()
    ctx.save_for_backward(q, k, v, output)


def _backward(ctx, do):
    """``torch.ops.tilemix.attention`` called directly saved no log-sum-exp: recompute it (one more
    forward pass; ``attention()`` runs ``attention_lse`` instead when gradients are wanted)."""
    q, k, v, o = ctx.saved_tensors
    with use_target(ctx.target):
        _, lse = attention_lse_op(q, k, v, ctx.causal, ctx.scale)
    return _gradients(ctx, q, k, v, o, lse, do)


attention_lse_op.register_autograd(_backward_lse, setup_context=_setup_lse)
attention_op.register_autograd(_backward, setup_context=_setup)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None, *, target: str | None = None) -> torch.Tensor:
    """Multi-head softmax attention. q, k: ``[B, T, H, D]``; v: ``[B, T, H, V]``;
    scale defaults to ``D ** -0.5``; ``causal`` masks keys after each query.
    Returns ``[B, T, H, V]``. Differentiable: when a gradient is wanted the forward also saves the
    rows' log-sum-exp (``attention_fwd_lse``) and the backward runs ``attention_bwd_dq`` and
    ``attention_bwd_dkdv``; otherwise it runs ``attention_fwd`` alone.
    ``target``: "auto" (default: $TILEMIX_TARGET, else by the GPU), "hopper" or "generic" (the mma.sync
    kernels, also on an H100)."""
    check_call("attention", differentiable=True, target=target, flags=dict(causal=causal), q=q, k=k, v=v)
    scale = default_scale(q, scale)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v)):
        return call_with_target(target, attention_lse_op, q, k, v, bool(causal), scale)[0]
    return call_with_target(target, attention_op, q, k, v, bool(causal), scale)
