"""Bench rows of packed variable-length batches (issue 24: ``cu_seqlens``), forward and backward,
beside flash-linear-attention's kernels given the same offsets (attention: cuDNN SDPA on the same
tokens padded to a batch of the longest sequence, issue 24's bar). A row's B x T tokens are B
sequences of random lengths about T (a fixed seed) packed into one row; records carry ``varlen:
true``. The default shape is issue 24's bar: 64 sequences of 64 to 8128 tokens, H = 16, D = 128."""

from __future__ import annotations

import functools

import torch

from tilemix import ops

from .calls import backward_of, leaves
from .inputs import as_simple_gla, ssd_inputs

__all__ = ["VARLEN_CASES", "VARLEN_SHAPE", "packed_lengths"]

SEED = 0
SHORTEST = 64
VARLEN_SHAPE = (64, 4096, 16, 128)  # sequences, their mean length, H, D


def packed_lengths(count: int, mean: int, seed: int = SEED) -> list[int]:
    """``count`` lengths drawn uniformly from 64 to ``2·mean - 64`` tokens (fewer where ``mean`` is
    under 64), with a fixed seed: every run times the same batch."""
    g = torch.Generator().manual_seed(seed)
    shortest = min(SHORTEST, mean)
    return torch.randint(shortest, 2 * mean - shortest + 1, (count,), generator=g).tolist()


def _offsets(B, T, device) -> torch.Tensor:
    lengths = packed_lengths(B, T)
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _linear_attention_case(B, T, H, D, dtype, device="cuda", backward=False):
    cu = _offsets(B, T, device)
    cu_long = cu.long()  # fla's offsets are int64
    tokens = int(cu[-1])
    q, k, v = leaves(*(torch.randn(1, tokens, H, D, device=device, dtype=dtype) for _ in range(3)))

    def ours():
        return ops.linear_attention(q, k, v, cu_seqlens=cu)[0]

    def peer():
        from fla.ops.linear_attn import chunk_linear_attn

        return chunk_linear_attn(q, k, v, normalize=False, cu_seqlens=cu_long)[0]

    shape = dict(B=1, T=tokens, H=H, K=D, V=D, sequences=B)
    if not backward:
        return ours, peer, "fla-chunk_linear_attn", 4 * q.numel() * q.element_size(), \
            4 * tokens * H * D * (64 + D), shape
    do = torch.randn_like(q)
    return (backward_of(ours, (q, k, v), do), backward_of(peer, (q, k, v), do), "fla-chunk_linear_attn",
            7 * q.numel() * q.element_size(), 2 * tokens * H * D * (6 * 64 + 5 * D), shape)


def _ssd_case(B, T, H, D, dtype, device="cuda", backward=False):
    cu = _offsets(B, T, device)
    cu_long = cu.long()
    tokens = int(cu[-1])
    x, dt, A, Bm, Cm = ssd_inputs(1, tokens, H, D, dtype, device)
    inputs = leaves(x, dt, A, Bm, Cm)
    gla_inputs = leaves(*as_simple_gla(x, dt, A, Bm, Cm))  # fla's simple GLA on the same recurrence

    def ours():
        return ops.ssd(*inputs, cu_seqlens=cu)[0]

    def peer():
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla(*gla_inputs[:3], g=gla_inputs[3], scale=1.0, cu_seqlens=cu_long)[0]

    shape = dict(B=1, T=tokens, H=H, N=D, P=D, G=1, sequences=B)
    if not backward:
        nbytes = 2 * x.numel() * x.element_size() + 2 * Bm.numel() * Bm.element_size() + dt.numel() * 4
        return ours, peer, "fla-chunk_simple_gla", nbytes, 4 * tokens * H * D * (64 + D), shape
    dy = torch.randn_like(x)
    nbytes = 3 * x.numel() * x.element_size() + 4 * Bm.numel() * Bm.element_size() + 2 * dt.numel() * 4
    return (backward_of(ours, inputs, dy), backward_of(peer, gla_inputs, dy), "fla-chunk_simple_gla", nbytes,
            2 * tokens * H * D * (6 * 64 + 5 * D), shape)


def _attention_case(B, T, H, D, dtype, device="cuda", backward=False):
    lengths = packed_lengths(B, T)
    cu = _offsets(B, T, device)
    q, k, v = leaves(*(torch.randn(1, sum(lengths), H, D, device=device, dtype=dtype) for _ in range(3)))
    longest = max(lengths)
    padded = [torch.zeros(B, H, longest, D, device=device, dtype=dtype) for _ in range(3)]  # SDPA's [B, H, T, D]
    for i, (start, length) in enumerate(zip(cu.tolist(), lengths)):
        for dense, packed in zip(padded, (q, k, v)):
            dense[i, :, :length] = packed[0, start:start + length].transpose(0, 1).detach()
    padded = leaves(*padded)

    def ours():
        return ops.attention(q, k, v, causal=True, cu_seqlens=cu)

    def peer():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(*padded, is_causal=True)

    tokens_squared = sum(length * length for length in lengths)
    shape = dict(B=1, T=sum(lengths), H=H, D=D, causal=True, sequences=B)
    if not backward:
        return ours, peer, "sdpa-cudnn-padded", 4 * q.numel() * q.element_size(), 2 * H * D * tokens_squared, shape
    do, do_padded = torch.randn_like(q), torch.randn_like(padded[0])
    return (backward_of(ours, (q, k, v), do), backward_of(peer, padded, do_padded), "sdpa-cudnn-padded",
            8 * q.numel() * q.element_size(), 5 * H * D * tokens_squared, shape)


VARLEN_CASES = {"linear_attention-varlen": _linear_attention_case, "ssd-varlen": _ssd_case,
                "linear_attention-bwd-varlen": functools.partial(_linear_attention_case, backward=True),
                "ssd-bwd-varlen": functools.partial(_ssd_case, backward=True),
                "attention-varlen": _attention_case,
                "attention-bwd-varlen": functools.partial(_attention_case, backward=True)}
