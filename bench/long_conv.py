"""Bench rows of the long convolution (Hyena/H3), forward and backward, at ``C = H·D`` channels, beside
torch's FFT as Hyena's ``fftconv`` runs it: ``irfft(rfft(u) · rfft(k))`` in fp32 at length 2L, u in
its channels-first layout (its transposes are not timed).

A case returns what ``bench.CASES`` entries return: ``(ours, peer, peer name, bytes, flops, shape)``."""

from __future__ import annotations

import functools
import math

import torch

from tilemix import ops

from .calls import backward_of, leaves

__all__ = ["LONG_CONV_CASES", "LONG_CONV_SHAPES"]

# issue 29's bars: B = 8, C = 768 (12 heads of 64), L = 4096 and 16384
LONG_CONV_SHAPES = {"long_conv": (8, 4096, 12, 64), "long_conv-bwd": (8, 4096, 12, 64),
                    "long_conv-16k": (8, 16384, 12, 64), "long_conv-bwd-16k": (8, 16384, 12, 64)}


def _torch_fft(u_channels_first: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Hyena's ``fftconv`` (bias-free): u ``[B, C, L]``, kernel ``[C, L]``, fp32 FFTs of length 2L."""
    length = u_channels_first.shape[-1]
    n = 2 * length
    k_f = torch.fft.rfft(kernel.float(), n=n) / n
    u_f = torch.fft.rfft(u_channels_first.float(), n=n)
    return torch.fft.irfft(u_f * k_f, n=n, norm="forward")[..., :length].to(u_channels_first.dtype)


def _case(B, T, H, D, dtype, device="cuda", backward=False):
    C = H * D
    u = torch.randn(B, T, C, device=device, dtype=dtype)
    kernel = (torch.randn(C, T, device=device) * torch.exp(-torch.arange(T, device=device) / (T / 8))).to(dtype)
    u_first = u.transpose(1, 2).contiguous()
    size = torch.finfo(dtype).bits // 8
    n = 2 * T
    transform = 2.5 * n * math.log2(n)  # real FFT of length n, the usual count
    if backward:  # read dy, u, kernel; write du, dkernel (two correlations: five transforms)
        nbytes, flops = (3 * B * T * C + 2 * C * T) * size, B * C * (5 * transform + 12 * n)
    else:  # read u, kernel; write y (three transforms, one product)
        nbytes, flops = (2 * B * T * C + C * T) * size, B * C * (3 * transform + 6 * n)

    def ours():
        return ops.long_conv(u, kernel)

    def peer():
        return _torch_fft(u_first, kernel)

    if backward:
        dy = torch.randn(B, T, C, device=device, dtype=dtype)
        graded = leaves(u, kernel)
        ours = backward_of(lambda: ops.long_conv(*graded), graded, dy)
        peer_graded = leaves(u_first, kernel)
        peer = backward_of(lambda: _torch_fft(*peer_graded), peer_graded, dy.transpose(1, 2).contiguous())
    return ours, peer, "torch-fft", nbytes, flops, dict(B=B, T=T, C=C)


LONG_CONV_CASES = {name: functools.partial(_case, backward="bwd" in name.split("-")) for name in LONG_CONV_SHAPES}
