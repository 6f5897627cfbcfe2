"""xLSTM's matrix LSTM (mLSTM) as the stabilised token-by-token recurrence, in float64: the ground
truth for ``tilemix.ops.mlstm``, sharing nothing with its chunked program but the definition."""

from __future__ import annotations

import numpy as np

from .mixers import _expect, _f64, _qkv

__all__ = ["mlstm"]


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def mlstm(q, k, v, i, f, scale: float | None = None, initial_state=None, output_final_state: bool = False):
    """The stabilised mLSTM (xLSTM, Beck et al. 2024, appendix; ``mlstm_kernels``' recurrent step with
    ``eps = 0``), per batch and head, from ``(C_0, n_0, m_0) = initial_state`` (or zeros)::

        m_t = max(log σ(f_t) + m_{t-1}, i_t)
        C_t = exp(log σ(f_t) + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_tᵀ
        n_t = exp(log σ(f_t) + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t
        h_t = C_tᵀ (scale q_t) / max(|n_tᵀ (scale q_t)|, exp(-m_t))

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, i and f ``[B, T, H]`` (gate pre-activations); scale
    defaults to ``K**-0.5``; the state is ``(C [B, H, K, V], n [B, H, K], m [B, H])``.
    Returns ``(h [B, T, H, V], (C_T, n_T, m_T) or None)``."""
    q, k, v = _qkv(q, k, v, "K", "V")
    B, T, H, K = q.shape
    V = v.shape[-1]
    i, f = _f64(i), _f64(f)
    _expect("i", i, (B, T, H), "B, T, H")
    _expect("f", f, (B, T, H), "B, T, H")
    scale = K ** -0.5 if scale is None else scale
    if initial_state is None:
        C, n, m = np.zeros((B, H, K, V)), np.zeros((B, H, K)), np.zeros((B, H))
    else:
        C, n, m = (_f64(s).copy() for s in initial_state)
        _expect("initial_state[0]", C, (B, H, K, V), "B, H, K, V")
        _expect("initial_state[1]", n, (B, H, K), "B, H, K")
        _expect("initial_state[2]", m, (B, H), "B, H")
    log_f = _log_sigmoid(f)
    h = np.empty((B, T, H, V))
    for t in range(T):
        m_new = np.maximum(log_f[:, t] + m, i[:, t])
        forget, inject = np.exp(log_f[:, t] + m - m_new), np.exp(i[:, t] - m_new)
        C = forget[..., None, None] * C + inject[..., None, None] * np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        n = forget[..., None] * n + inject[..., None] * k[:, t]
        m = m_new
        qs = scale * q[:, t]
        numerator = np.einsum("bhkv,bhk->bhv", C, qs)
        denominator = np.maximum(np.abs(np.einsum("bhk,bhk->bh", n, qs)), np.exp(-m))
        h[:, t] = numerator / denominator[..., None]
    return h, ((C, n, m) if output_final_state else None)
