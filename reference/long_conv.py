"""Float64 NumPy definitions of the long convolutions, channel by channel with ``np.convolve``
(direct sums, no FFT: nothing shared with the DFT tile programs they check)."""

from __future__ import annotations

import numpy as np

from .mixers import _expect, _f64

__all__ = ["long_conv", "gated_long_conv"]


def long_conv(u, kernel) -> np.ndarray:
    """``y[b, t, c] = Σ_{s≤t} kernel[c, s] · u[b, t-s, c]`` for u ``[B, L, C]``, kernel ``[C, L]``."""
    u, kernel = _f64(u), _f64(kernel)
    if u.ndim != 3:
        raise ValueError(f"u: expected shape [B, L, C], got {list(u.shape)}")
    batch, length, channels = u.shape
    _expect("kernel", kernel, (channels, length), "C, L")
    y = np.empty(u.shape)
    for b in range(batch):
        for c in range(channels):
            y[b, :, c] = np.convolve(u[b, :, c], kernel[c])[:length]
    return y


def gated_long_conv(q, k, v, kernel) -> np.ndarray:
    """H3's ``q ⊙ long_conv(k ⊙ v, kernel)``."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    _expect("q", q, k.shape, "B, L, C")
    _expect("v", v, k.shape, "B, L, C")
    return q * long_conv(k * v, kernel)
