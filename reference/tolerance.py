"""How close to the float64 reference counts as right, per input dtype."""

from __future__ import annotations

import numpy as np

__all__ = ["BOUNDS", "bound", "rel_err"]

# relative Frobenius error bounds (DESIGN.md): fp32 accumulation throughout,
# inputs and matmul operands rounded to the dtype
BOUNDS = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1e-2}


def bound(dtype) -> float:
    """The bound for a torch/NumPy dtype or its name."""
    return BOUNDS[str(dtype).replace("torch.", "")]


def rel_err(actual, expected) -> float:
    """``|actual - expected|_F / |expected|_F`` in float64 (absolute error if
    ``expected`` is zero). ``inf`` when ``actual`` is NaN or infinite where
    ``expected`` is finite: NaN never passes."""
    if hasattr(actual, "detach"):
        actual = actual.detach().cpu().double().numpy()
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {a.shape} vs expected {e.shape}")
    if not np.isfinite(a[np.isfinite(e)]).all():
        return float("inf")
    scale = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / scale) if scale else float(np.linalg.norm(a))
