"""Rounding to the GPU's narrow float types, emulated on fp32 NumPy arrays."""

from __future__ import annotations

import numpy as np

from .types import DType

__all__ = ["round_to"]


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to bfloat16 (the top 16 bits of an fp32)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(x), x, rounded.view(np.float32))


def round_to(x: np.ndarray, dtype: DType) -> np.ndarray:
    """``x`` (fp32) rounded to ``dtype`` and widened back to fp32; float64 stays float64."""
    if dtype is DType.f64:
        return np.asarray(x, dtype=np.float64)
    x = np.asarray(x, dtype=np.float32)
    if dtype is DType.bf16:
        return _round_bf16(x)
    if dtype is DType.f16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    return x
