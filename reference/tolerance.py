"""How close to the float64 reference counts as right, per input dtype."""

from __future__ import annotations

import numpy as np

__all__ = ["BOUNDS", "MAX_CONDITION", "bound", "rel_err"]

# relative Frobenius error bounds (README.md, "Guarantees"): fp32 accumulation throughout,
# inputs and matmul operands rounded to the dtype
BOUNDS = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1e-2}


def bound(dtype) -> float:
    """The bound for a torch/NumPy dtype or its name."""
    return BOUNDS[str(dtype).replace("torch.", "")]


# Conditioning up to which each bound holds as a plain relative error: about bound / (3 · unit
# roundoff), three roundings of the dtype. An output that is a small difference of large terms
# (q·k ≈ 0 at T = 1, say) cannot be computed to that relative accuracy by any algorithm in the
# dtype; past this conditioning the error is measured against the size of the terms instead.
MAX_CONDITION = {"float32": 50.0, "float16": 2.0, "bfloat16": 1.0}


def rel_err(actual, expected, magnitude=None, max_condition: float = 1.0) -> float:
    """``|actual - expected|_F / |expected|_F`` in float64 (absolute error if
    ``expected`` is zero). ``inf`` when ``actual`` is NaN or infinite where
    ``expected`` is finite: NaN never passes.

    ``magnitude``: the same computation on absolute values (``|a| @ |b|``),
    the size of the terms summed; the denominator becomes
    ``max(|expected|, |magnitude| / max_condition)`` (see ``MAX_CONDITION``),
    so badly cancelling outputs are judged against their terms."""
    if hasattr(actual, "detach"):
        actual = actual.detach().cpu().double().numpy()
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {a.shape} vs expected {e.shape}")
    if not np.isfinite(a[np.isfinite(e)]).all():
        return float("inf")
    scale = np.linalg.norm(e)
    if magnitude is not None:
        scale = max(scale, np.linalg.norm(np.asarray(magnitude, np.float64)) / max_condition)
    return float(np.linalg.norm(a - e) / scale) if scale else float(np.linalg.norm(a))
