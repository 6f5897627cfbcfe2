"""Bench cases of bidirectional and prefix linear attention (issue 29): no peer. Bytes are what the op must
move at least, read q, k, v and write o (backward: read q, k, v, do and write dq, dk, dv), so the roofline
column is the fraction of the HBM floor reached. In [B, T, H, D] tensors moved, against that floor of 4 (7):
the bidirectional forward moves 4, its backward 8 (the sum of q doᵀ reads q and do, then three reads of
the states each read one tensor and write one); the prefix forward 4 + 2P/T (the prefix's k and v twice),
its backward 14 + 8P/T (dq as a forward pass, causal linear attention's dk and dv, then their prefix rows
read from the prefix state's gradient and copied in).

A case returns what ``bench.CASES`` entries return: ``(ours, peer, peer name, bytes, flops, shape)``."""

from __future__ import annotations

import functools

import torch

from tilemix import ops

from .calls import backward_of, leaves

__all__ = ["BIDIRECTIONAL_CASES"]


def _case(form: str, B, T, H, D, dtype, device="cuda", backward=False):
    q, k, v = leaves(*(torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3)))
    prefix_len = T // 4  # a prompt of a quarter of the sequence

    def forward():
        if form == "prefix":
            return ops.prefix_linear_attention(q, k, v, prefix_len)
        return ops.linear_attention(q, k, v, causal=False)[0]

    matmul = 2 * B * T * H * D * D  # one T x D x D matmul
    if form == "prefix":  # the causal pass (as linear attention's rows count it) and the prefix's state
        flops = 2 * B * T * H * D * (6 * 64 + 5 * D) + 2 * matmul // 4 if backward else \
            4 * B * T * H * D * (64 + D) + matmul // 4
        shape = dict(B=B, T=T, H=H, K=D, V=D, prefix_len=prefix_len)
    else:  # the state sum and its read; backward: the sum of q doᵀ and three reads
        flops, shape = (4 if backward else 2) * matmul, dict(B=B, T=T, H=H, K=D, V=D, causal=False)
    nbytes = (7 if backward else 4) * q.numel() * q.element_size()
    ours = backward_of(forward, (q, k, v), torch.randn_like(q)) if backward else forward
    return ours, None, "-", nbytes, flops, shape


BIDIRECTIONAL_CASES = {"linear_attention-bidir": functools.partial(_case, "bidirectional"),
                       "linear_attention-bidir-bwd": functools.partial(_case, "bidirectional", backward=True),
                       "prefix_linear_attention": functools.partial(_case, "prefix"),
                       "prefix_linear_attention-bwd": functools.partial(_case, "prefix", backward=True)}
