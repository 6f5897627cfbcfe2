"""Inputs the bench's rows share: the SSD rows' x, dt, A, B, C, and the same recurrence as
flash-linear-attention's simple GLA takes it (its SSD peer)."""

from __future__ import annotations

import torch

__all__ = ["ssd_inputs", "as_simple_gla"]


def ssd_inputs(B, T, H, D, dtype, device="cuda"):
    """x, dt, A, B, C of the SSD rows: one group, dt in [0.01, 0.51], A in [-4.1, -0.1]."""
    x = torch.randn(B, T, H, D, device=device, dtype=dtype)
    dt = torch.rand(B, T, H, device=device) * 0.5 + 0.01
    A = -(torch.rand(H, device=device) * 4 + 0.1)
    Bm, Cm = (torch.randn(B, T, 1, D, device=device, dtype=dtype) for _ in range(2))
    return x, dt, A, Bm, Cm


def as_simple_gla(x, dt, A, Bm, Cm):
    """The same recurrence as fla's simple GLA: q = C, k = B (per head), v = x * dt, g = dt * A."""
    B, T, H, D = x.shape
    return (Cm.expand(B, T, H, D).contiguous(), Bm.expand(B, T, H, D).contiguous(),
            (x * dt[..., None]).to(x.dtype), (dt * A).contiguous())
