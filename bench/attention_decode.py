"""Bench rows of attention against a KV cache (issue 24, direction "decode"): a few queries per
sequence against ``T`` cached keys and values of ``H / 4`` heads (grouped queries), beside torch SDPA
(cuDNN) on the same tensors. ``attention()`` takes its decode path (split over the keys,
``ops/attention_decode.py``) where the shape calls for it. The roofline is the cache's: k and v read
once."""

from __future__ import annotations

import functools

import torch

from tilemix import ops

__all__ = ["ATTENTION_DECODE_CASES", "ATTENTION_DECODE_SHAPES"]

KV_GROUP = 4  # query heads per kv head (H = 32, H_kv = 8 at the row's shape)


def _attention_step(B, T, H, D, dtype, device="cuda", queries=1):
    """``queries`` new tokens per sequence against ``T`` cached ones, one query sees them all (no
    mask: at one query causal attention is the same, and SDPA's causal mask aligns to the start)."""
    q = torch.randn(B, queries, H, D, device=device, dtype=dtype)
    k, v = (torch.randn(B, T, H // KV_GROUP, D, device=device, dtype=dtype) for _ in range(2))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def ours():
        return ops.attention(q, k, v)

    def peer():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    nbytes = (2 * k.numel() + 2 * q.numel()) * q.element_size()  # read the cache and q, write o
    flops = 4 * B * H * queries * T * D
    return ours, peer, "sdpa-cudnn", nbytes, flops, dict(B=B, Tq=queries, T=T, H=H, H_kv=H // KV_GROUP, gqa=True,
                                                         D=D)


ATTENTION_DECODE_CASES = {"attention-step": _attention_step,
                          "attention-step-q16": functools.partial(_attention_step, queries=16)}
# B = 8 sequences, a 32k cache, H = 32 query heads on 8 kv heads of 128
ATTENTION_DECODE_SHAPES = {name: (8, 32768, 32, 128) for name in ATTENTION_DECODE_CASES}
