"""Softmax attention with an online softmax over key chunks (FlashAttention-style)."""

from __future__ import annotations

import torch

from tilemix.tiles import (
    Const,
    Out,
    Scalar,
    Seq,
    blocks,
    causal,
    chunks,
    exp,
    full,
    in_seq,
    kernel,
    maximum,
    rowmax,
    rowsum,
    zeros,
)

from ._dispatch import check_call, default_scale
from ._library import tile_op

__all__ = ["attention", "attention_fwd"]

NEG_INF = float("-inf")


@kernel
def attention_fwd(q: Seq["D"], k: Seq["D"], v: Seq["V"], scale: Scalar, o: Out[Seq["V"]],
                  is_causal: Const = False, block: Const = 64, chunk: Const = 128):
    for i in blocks(block):  # one program instance per query block
        qi = q[i]
        m, denom, acc = full(block, 1, NEG_INF), zeros(block, 1), zeros(block, v.cols)
        for j in chunks(chunk, through=i if is_causal else None):
            s = (qi @ k[j].T) * scale  # scaled in fp32: q * scale in bf16 would round q again
            s = causal(s, fill=NEG_INF) if is_causal else in_seq(s, fill=NEG_INF)
            m_new = maximum(m, rowmax(s))
            p, alpha = exp(s - m_new), exp(m - m_new)
            denom = denom * alpha + rowsum(p)
            acc = acc * alpha + p @ v[j]
            m = m_new
        o[i] = acc / denom


attention_op = tile_op("attention", "(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> Tensor",
                       attention_fwd,
                       lambda q, k, v, causal, scale: (dict(q=q, k=k, v=v, scale=scale, is_causal=causal), {}, None),
                       lambda out: out["o"])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """Multi-head softmax attention. q, k: ``[B, T, H, D]``; v: ``[B, T, H, V]``;
    scale defaults to ``D ** -0.5``; ``causal`` masks keys after each query.
    Returns ``[B, T, H, V]``."""
    check_call("attention", q=q, k=k, v=v)
    return attention_op(q, k, v, bool(causal), default_scale(q, scale))
