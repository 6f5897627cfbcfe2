"""Bench rows of ``mlstm`` (issue 28), forward and derived backward, alone: no other library ships
an mLSTM kernel beside which to time it, and its bar is a fraction of the HBM roofline. The
``-d256`` rows run at the bar's second shape (``bench.default_rows``: 8 heads of 256).

A case returns what ``bench.CASES`` entries return: ``(ours, peer, peer name, bytes, flops, shape)``."""

from __future__ import annotations

import functools

import torch

from tilemix import ops

from .calls import backward_of
from .mixers import _bwd_flops, _fwd_flops

__all__ = ["MLSTM_CASES", "MLSTM_DERIVED_BACKWARD"]


def _mlstm_case(B, T, H, D, dtype, device="cuda", backward=False):
    """Gates in float32 (they feed no matmul), forget gate pre-activations around 3 (xLSTM's forget
    bias). Bytes: the op's inputs and outputs once (the backward: q, k, v, i, f and dh read, their
    five gradients written)."""
    gen = functools.partial(torch.randn, B, T, H, device=device)
    q, k, v = (gen(D, dtype=dtype) for _ in range(3))
    i, f = gen(), gen() + 3.0
    inputs = (q, k, v, i, f)

    def ours():
        return ops.mlstm(*inputs)[0]

    sequences, gates = 4 * q.numel() * q.element_size(), 2 * i.numel() * i.element_size()
    nbytes, flops = sequences + gates, _fwd_flops(B, T, H, D)
    if backward:
        leaves = tuple(t.requires_grad_() for t in inputs)
        ours = backward_of(ours, leaves, torch.randn_like(q))
        nbytes, flops = sequences * 7 / 4 + gates * 2, _bwd_flops(B, T, H, D)
    return ours, None, "-", nbytes, flops, dict(B=B, T=T, H=H, K=D, V=D)


MLSTM_CASES = {"mlstm": _mlstm_case, "mlstm-bwd": functools.partial(_mlstm_case, backward=True),
               "mlstm-d256": _mlstm_case, "mlstm-bwd-d256": functools.partial(_mlstm_case, backward=True)}
MLSTM_DERIVED_BACKWARD = {"mlstm-bwd", "mlstm-bwd-d256"}
