"""Bench rows of ``lolcats_attention`` (issue 29), forward and derived backward, at ``LOLCATS_SHAPE``
(head dim 64, Hedgehog's 2 x 64 features, window 64), beside the same math in plain torch, compiled:
``lolcats_torch``, blocked by 64-token chunks: the quadratic form LoLCATs trains with would hold
several B·H·T² fp32 score matrices (8.6 GB each) at this shape. flex_attention and fla's linear
attention do not compose into it: the window's weights are taken relative to its largest score,
which flex_attention does not return (only the log-sum-exp)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tilemix import ops

from .calls import backward_of

__all__ = ["LOLCATS_CASES", "LOLCATS_DERIVED_BACKWARD", "LOLCATS_SHAPE", "lolcats_torch"]

LOLCATS_SHAPE = (8, 4096, 16, 64)  # B, T, H, D; the features are 2·D wide
WINDOW = 64
CHUNK = 64


def lolcats_torch(q, k, v, q_features, k_features, window: int = WINDOW, scale: float | None = None):
    """``ops.lolcats_attention`` in torch, in fp32: each chunk's queries against its own keys and the
    previous chunk's (the window and the linear part inside those two chunks), then the chunks before
    them through exclusive cumulative sums of the per-chunk states ``φkᵀ v`` and ``Σ φk``."""
    B, T, H, D = q.shape
    n = -(-T // CHUNK)
    scale = D ** -0.5 if scale is None else scale

    def chunked(x):  # [B, T, H, X] -> [B, n, CHUNK, H, X], zeros past T
        return F.pad(x.float(), (0, 0, 0, 0, 0, n * CHUNK - T)).unflatten(1, (n, CHUNK))

    def with_previous(x):  # each chunk's keys after the previous chunk's: [B, n, 2·CHUNK, H, X]
        return torch.cat([F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1], x], dim=2)

    qc, kc, vc, fqc, fkc = map(chunked, (q, k, v, q_features, k_features))
    offset = torch.arange(-CHUNK, CHUNK, device=q.device)  # key position minus the chunk's first
    gap = torch.arange(CHUNK, device=q.device)[:, None] - offset  # query minus key position
    exists = (torch.arange(n, device=q.device)[:, None, None, None] > 0) | (offset >= 0)  # no chunk before the first
    in_window = (gap >= 0) & (gap < window) & exists  # [n, 1, CHUNK, 2·CHUNK]
    older = (gap >= window) & exists
    scores = torch.einsum("bnihd,bnjhd->bnhij", qc, with_previous(kc)) * scale
    scores = scores.masked_fill(~in_window, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights + torch.einsum("bnihf,bnjhf->bnhij", fqc, with_previous(fkc)) * older
    states = torch.einsum("bnjhf,bnjhv->bnhfv", fkc, vc).cumsum(1)
    sums = fkc.sum(2).cumsum(1)
    before = lambda x: F.pad(x, (0, 0) * (x.dim() - 2) + (2, 0))[:, :n]  # noqa: E731  chunks up to the one before
    numerator = torch.einsum("bnhij,bnjhv->bnihv", weights, with_previous(vc))
    numerator = numerator + torch.einsum("bnihf,bnhfv->bnihv", fqc, before(states))
    denominator = weights.sum(-1).transpose(2, 3) + torch.einsum("bnihf,bnhf->bnih", fqc, before(sums))
    o = (numerator / denominator[..., None]).flatten(1, 2)[:, :T]
    return o.to(q.dtype)


@functools.cache
def _compiled_peer():
    return torch.compile(lolcats_torch)


def _lolcats_case(B, T, H, D, dtype, device="cuda", backward=False):
    """q, k, v standard normal; the features softmaxes of normal projections (Hedgehog's halves).
    Bytes: the op's inputs and output once (the backward: the inputs and do read, five gradients written)."""
    def seq(width):
        return torch.randn(B, T, H, width, device=device, dtype=dtype)
    def features():
        x = seq(D)
        return torch.cat([x.softmax(-1), (-x).softmax(-1)], dim=-1)
    inputs = (seq(D), seq(D), seq(D), features(), features())
    peer_fn = lolcats_torch if device == "cpu" else _compiled_peer()  # the CPU tests run it eagerly

    def ours():
        return ops.lolcats_attention(*inputs, window=WINDOW)

    def peer():
        return peer_fn(*inputs, window=WINDOW)

    sequence_bytes = B * T * H * D * torch.finfo(dtype).bits // 8
    # per token: scores, weights and linear weights against two chunks of keys; the state read and updated
    flops = B * T * H * (2 * 2 * CHUNK * (2 * D + 2 * D) + 4 * 2 * D * D)
    shape = dict(B=B, T=T, H=H, D=D, F=2 * D, window=WINDOW)
    if not backward:
        return ours, peer, "torch-compiled", sequence_bytes * 8, flops, shape
    leaves = tuple(t.requires_grad_() for t in inputs)
    do = seq(D)
    return (backward_of(ours, leaves, do), backward_of(peer, leaves, do), "torch-compiled", sequence_bytes * 15,
            3 * flops, shape)


LOLCATS_CASES = {"lolcats_attention": _lolcats_case,
                 "lolcats_attention-bwd": functools.partial(_lolcats_case, backward=True)}
LOLCATS_DERIVED_BACKWARD = {"lolcats_attention-bwd"}
