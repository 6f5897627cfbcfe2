"""Bench rows of Mamba-1's selective scan, forward and backward (the derived backward), at
``Dm = H·D`` channels and N = 16 state entries. No peer: mamba_ssm's CUDA extension for this scan is
not installed beside the bench; the rows are judged against the memory roofline.

A case returns what ``bench.CASES`` entries return: ``(ours, peer, peer name, bytes, flops, shape)``."""

from __future__ import annotations

import functools
import math

import torch

from tilemix import ops

from .calls import backward_of, leaves

__all__ = ["SELECTIVE_SCAN_CASES", "DERIVED_BACKWARD"]

STATE = 16  # Mamba-1's N


def _inputs(B, T, Dm, dtype, device) -> dict[str, torch.Tensor]:
    """As a Mamba-1 block feeds the scan: raw Δ with a bias and softplus (steps about 0.001 to 0.1),
    S4D-real ``A[d, n] = -(n + 1)``, a skip D and a gate z."""
    def seq(*shape):
        return torch.randn(B, T, *shape, device=device, dtype=dtype)
    steps = torch.exp(torch.rand(Dm, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(u=seq(Dm), delta=seq(Dm) * 0.1, A=-torch.arange(1, STATE + 1, device=device).float().repeat(Dm, 1),
                B=seq(STATE), C=seq(STATE), D=torch.ones(Dm, device=device), z=seq(Dm),
                delta_bias=steps.expm1().log())  # softplus⁻¹ of the steps


def _case(B, T, H, D, dtype, device="cuda", backward=False):
    Dm = H * D
    inputs = _inputs(B, T, Dm, dtype, device)
    size = torch.finfo(dtype).bits // 8
    channels, entries = B * T * Dm * size, B * T * STATE * size
    if backward:  # read u, delta, z, B, C, dy; write du, ddelta, dz, dB, dC
        nbytes, flops = 7 * channels + 4 * entries, 21 * B * T * Dm * STATE
    else:  # read u, delta, z, B, C; write y
        nbytes, flops = 4 * channels + 2 * entries, 7 * B * T * Dm * STATE  # elementwise, per state entry

    def ours():
        return ops.selective_scan(**inputs, delta_softplus=True)[0]

    if backward:
        names = list(inputs)
        graded = dict(zip(names, leaves(*inputs.values())))

        def forward():
            return ops.selective_scan(**graded, delta_softplus=True)[0]
        ours = backward_of(forward, tuple(graded.values()), torch.randn(B, T, Dm, device=device, dtype=dtype))
    return ours, None, "-", nbytes, flops, dict(B=B, T=T, Dm=Dm, N=STATE)


SELECTIVE_SCAN_CASES = {"selective_scan": _case, "selective_scan-bwd": functools.partial(_case, backward=True)}
DERIVED_BACKWARD = {"selective_scan-bwd"}
