"""Float64 NumPy definitions of bidirectional and prefix linear attention: the explicit ``T x T`` product
``o = scale · (Q Kᵀ ⊙ M) V`` with M the keys each token sees, sharing no algorithm (state sums, chunks) with
the tile programs."""

from __future__ import annotations

import numpy as np

from .mixers import _qkv

__all__ = ["bidirectional_linear_attention", "prefix_linear_attention"]


def _masked(q, k, v, seen: np.ndarray, scale: float | None, normalize: bool) -> np.ndarray:
    """``scale · (Q Kᵀ ⊙ seen) V`` per batch and head (``seen [T, T]``: query by key), divided by
    ``scale · (Q Kᵀ ⊙ seen) 1 + 1e-10`` when ``normalize``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = scale * np.einsum("bthk,bshk->bhts", q, k) * seen
    o = np.einsum("bhts,bshv->bthv", scores, v)
    if normalize:
        o = o / (scores.sum(-1).transpose(0, 2, 1)[..., None] + 1e-10)
    return o


def bidirectional_linear_attention(q, k, v, scale: float | None = None, normalize: bool = False) -> np.ndarray:
    """``o_t = scale · Σ_s (q_t·k_s) v_s`` over every s (``linear_attention(..., causal=False)``), divided by
    ``scale · Σ_s q_t·k_s + 1e-10`` when ``normalize``. q, k ``[B, T, H, K]``, v ``[B, T, H, V]``; scale
    defaults to ``K**-0.5``."""
    q, k, v = _qkv(q, k, v, "K", "V")
    T = q.shape[1]
    return _masked(q, k, v, np.ones((T, T)), scale, normalize)


def prefix_linear_attention(q, k, v, prefix_len: int, scale: float | None = None) -> np.ndarray:
    """JRT-RNN's form: token ``t < prefix_len`` sees keys ``s < prefix_len``, a later token keys ``s ≤ t``;
    shapes as ``bidirectional_linear_attention``."""
    q, k, v = _qkv(q, k, v, "K", "V")
    t, s = np.ogrid[:q.shape[1], :q.shape[1]]
    seen = np.where(t < prefix_len, s < prefix_len, s <= t)
    return _masked(q, k, v, seen.astype(np.float64), scale, False)
