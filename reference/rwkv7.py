"""RWKV-7's time mixing (the generalised delta rule with a diagonal-plus-rank-one transition) as the
token-by-token recurrence, in float64: the ground truth for ``tilemix.ops.rwkv7``, sharing nothing
with its chunked programs but the definition."""

from __future__ import annotations

import numpy as np

from .mixers import _expect, _f64, _qkv

__all__ = ["rwkv7"]


def rwkv7(r, w, k, v, a, b, scale: float | None = None, initial_state=None, output_final_state: bool = False):
    """Per batch and head, with the state ``S [K, V]`` (flash-linear-attention's tensor layout)::

        S_t = (diag(exp w_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ
        o_t = scale · S_tᵀ r_t

    (fla writes the transpose, ``S_t = S_{t-1} (diag(exp w_t) + a_t b_tᵀ) + v_t k_tᵀ`` on ``[V, K]``).
    r, w, k, a, b ``[B, T, H, K]`` (w: log decays); v ``[B, T, H, V]``; scale defaults to 1, as
    fla's ``chunk_rwkv7``. Returns ``(o [B, T, H, V], S_T [B, H, K, V] or None)``."""
    r, k, v = _qkv(r, k, v, "K", "V")
    w, a, b = _f64(w), _f64(a), _f64(b)
    B, T, H, K = r.shape
    for name, x in (("w", w), ("a", a), ("b", b)):
        _expect(name, x, r.shape, "B, T, H, K")
    scale = 1.0 if scale is None else scale
    state = np.zeros((B, H, K, v.shape[-1])) if initial_state is None else _f64(initial_state).copy()
    _expect("initial_state", state, (B, H, K, v.shape[-1]), "B, H, K, V")
    o = np.empty(v.shape)
    for t in range(T):
        removed = np.einsum("bhk,bhkv->bhv", a[:, t], state)  # a_tᵀ S_{t-1}
        state = (np.exp(w[:, t])[..., None] * state + np.einsum("bhk,bhv->bhkv", b[:, t], removed)
                 + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t]))
        o[:, t] = scale * np.einsum("bhkv,bhk->bhv", state, r[:, t])
    return o, (state if output_final_state else None)
