"""Bench rows of packed variable-length batches (issue 24: ``cu_seqlens``), forward and backward,
beside flash-linear-attention's kernels given the same offsets. A row's B x T tokens are B
sequences of random lengths (a fixed seed) packed into one row; records carry ``varlen: true``."""

from __future__ import annotations

import functools

import torch

from tilemix import ops

from .calls import backward_of, leaves

__all__ = ["VARLEN_CASES", "packed_lengths"]

SEED = 0


def packed_lengths(count: int, total: int, seed: int = SEED) -> list[int]:
    """``count`` random lengths of at least one token summing to ``total`` (cut points drawn
    uniformly without replacement)."""
    g = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(total - 1, generator=g)[:count - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _offsets(B, T, device) -> torch.Tensor:
    lengths = packed_lengths(B, B * T)
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _linear_attention_case(B, T, H, D, dtype, device="cuda", backward=False):
    cu = _offsets(B, T, device)
    cu_long = cu.long()  # fla's offsets are int64
    q, k, v = leaves(*(torch.randn(1, B * T, H, D, device=device, dtype=dtype) for _ in range(3)))

    def ours():
        return ops.linear_attention(q, k, v, cu_seqlens=cu)[0]

    def peer():
        from fla.ops.linear_attn import chunk_linear_attn

        return chunk_linear_attn(q, k, v, normalize=False, cu_seqlens=cu_long)[0]

    shape = dict(B=1, T=B * T, H=H, K=D, V=D, sequences=B)
    if not backward:
        return ours, peer, "fla-chunk_linear_attn", 4 * q.numel() * q.element_size(), \
            4 * B * T * H * D * (64 + D), shape
    do = torch.randn_like(q)
    return (backward_of(ours, (q, k, v), do), backward_of(peer, (q, k, v), do), "fla-chunk_linear_attn",
            7 * q.numel() * q.element_size(), 2 * B * T * H * D * (6 * 64 + 5 * D), shape)


def _ssd_case(B, T, H, D, dtype, device="cuda", backward=False):
    from .bench import _as_simple_gla, _ssd_inputs  # the SSD rows' inputs (bench imports this module)

    cu = _offsets(B, T, device)
    cu_long = cu.long()
    x, dt, A, Bm, Cm = _ssd_inputs(1, B * T, H, D, dtype, device)
    inputs = leaves(x, dt, A, Bm, Cm)
    gla_inputs = leaves(*_as_simple_gla(x, dt, A, Bm, Cm))  # fla's simple GLA on the same recurrence

    def ours():
        return ops.ssd(*inputs, cu_seqlens=cu)[0]

    def peer():
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla(*gla_inputs[:3], g=gla_inputs[3], scale=1.0, cu_seqlens=cu_long)[0]

    shape = dict(B=1, T=B * T, H=H, N=D, P=D, G=1, sequences=B)
    if not backward:
        nbytes = 2 * x.numel() * x.element_size() + 2 * Bm.numel() * Bm.element_size() + dt.numel() * 4
        return ours, peer, "fla-chunk_simple_gla", nbytes, 4 * B * T * H * D * (64 + D), shape
    dy = torch.randn_like(x)
    nbytes = 3 * x.numel() * x.element_size() + 4 * Bm.numel() * Bm.element_size() + 2 * dt.numel() * 4
    return (backward_of(ours, inputs, dy), backward_of(peer, gla_inputs, dy), "fla-chunk_simple_gla", nbytes,
            2 * B * T * H * D * (6 * 64 + 5 * D), shape)


VARLEN_CASES = {"linear_attention-varlen": _linear_attention_case, "ssd-varlen": _ssd_case,
                "linear_attention-bwd-varlen": functools.partial(_linear_attention_case, backward=True),
                "ssd-bwd-varlen": functools.partial(_ssd_case, backward=True)}
