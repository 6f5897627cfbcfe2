"""Float64 Based (Taylor-feature linear attention) in its quadratic form, sharing nothing with the
chunked tile program it checks."""

from __future__ import annotations

import numpy as np

from .mixers import _qkv

__all__ = ["based"]


def based(q, k, v, scale: float | None = None, normalize: bool = True) -> np.ndarray:
    """``o_t = Σ_{s≤t} w_ts v_s`` with ``w_ts = 1 + x + x²/2``, ``x = scale · q_t·k_s`` (the
    2nd-order Taylor expansion of ``exp``), divided by ``Σ_{s≤t} w_ts + 1e-6`` when ``normalize``
    (flash-linear-attention's ``parallel_based``). q, k ``[B, T, H, F]``, v ``[B, T, H, V]``;
    scale defaults to ``F ** -0.5``."""
    q, k, v = _qkv(q, k, v, "F", "V")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    x = scale * np.einsum("bthf,bshf->bhts", q, k)
    weights = np.tril(1 + x + x * x / 2)
    o = np.einsum("bhts,bshv->bthv", weights, v)
    if normalize:
        o = o / (weights.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
    return o
