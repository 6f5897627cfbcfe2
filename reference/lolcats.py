"""Float64 LoLCATs hybrid attention in its quadratic form (LoLCATs' ``hybrid_attention_quadratic``),
sharing nothing with the chunked tile program it checks."""

from __future__ import annotations

import numpy as np

from .mixers import _expect, _f64, _qkv

__all__ = ["lolcats_attention"]


def lolcats_attention(q, k, v, q_features, k_features, window: int = 64, scale: float | None = None) -> np.ndarray:
    """``o_t = (Σ_{t-W<s≤t} exp(scale·q_t·k_s - m_t) v_s + Σ_{s≤t-W} φq_t·φk_s v_s)`` divided by the same
    sums without ``v``; ``m_t`` the largest windowed score. q, k ``[B, T, H, D]``, v ``[B, T, H, V]``,
    the features ``[B, T, H, F]``; scale defaults to ``D ** -0.5``."""
    q, k, v = _qkv(q, k, v, "D", "V")
    fq, fk = _f64(q_features), _f64(k_features)
    _expect("q_features", fq, q.shape[:3] + fq.shape[-1:], "B, T, H, F")
    _expect("k_features", fk, fq.shape, "B, T, H, F")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t = np.arange(q.shape[1])
    gap = t[:, None] - t[None, :]  # query minus key position
    scores = np.where((gap >= 0) & (gap < window), scale * np.einsum("bthd,bshd->bhts", q, k), -np.inf)
    linear = np.where(gap >= window, np.einsum("bthf,bshf->bhts", fq, fk), 0.0)
    weights = np.exp(scores - scores.max(-1, keepdims=True)) + linear
    return np.einsum("bhts,bshv->bthv", weights, v) / weights.sum(-1).transpose(0, 2, 1)[..., None]
