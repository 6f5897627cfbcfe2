"""Bench rows of ``based`` (issue 29), forward and backward, beside flash-linear-attention's
``parallel_based`` on the same inputs: q and k with 16 features a head, v with the bench's head dim
(the bar's shape: B=8 T=4096 H=16, values 64)."""

from __future__ import annotations

import functools

import torch

from tilemix import ops
from tilemix.ops.based import FEATURES

from .calls import backward_of

__all__ = ["BASED_CASES"]


def _fwd_flops(B, T, H, V, F=FEATURES):
    """The chunk's own weights and their mix, then the 1 + F + F² features read and added to the state."""
    return B * T * H * (2 * 64 * (F + V) + 4 * (1 + F + F * F) * V)


def _based_case(B, T, H, D, dtype, device="cuda", backward=False):
    def seq(width):
        return torch.randn(B, T, H, width, device=device, dtype=dtype)
    q, k, v = seq(FEATURES), seq(FEATURES), seq(D)
    sequence_bytes = B * T * H * torch.finfo(dtype).bits // 8

    def ours():
        return ops.based(q, k, v)

    def peer():
        from fla.ops.based import parallel_based  # imported when timed: the CPU tests run without fla

        return parallel_based(q, k, v)

    shape = dict(B=B, T=T, H=H, K=FEATURES, V=D)
    if not backward:
        return ours, peer, "fla-parallel_based", sequence_bytes * (2 * FEATURES + 2 * D), _fwd_flops(B, T, H, D), shape
    leaves = tuple(t.requires_grad_() for t in (q, k, v))
    do = seq(D)
    # each matmul's two gradients and its recomputation; reads q, k, v, do, writes dq, dk, dv
    nbytes = sequence_bytes * (4 * FEATURES + 3 * D)
    return (backward_of(ours, leaves, do), backward_of(peer, leaves, do), "fla-parallel_based", nbytes,
            3 * _fwd_flops(B, T, H, D), shape)


BASED_CASES = {"based": _based_case, "based-bwd": functools.partial(_based_case, backward=True)}
