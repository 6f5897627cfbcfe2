"""Float64 NumPy definition of Mamba-1's selective scan, token by token (mamba_ssm's
``selective_scan_ref``, sequence-major)."""

from __future__ import annotations

import numpy as np

from .mixers import _expect, _f64

__all__ = ["selective_scan"]


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False,
                   initial_state=None, output_final_state: bool = False):
    """``Δ = softplus(delta + delta_bias)`` (each part optional), per channel d and state entry n
    ``h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] B_t[g(d), n] u_t[d]``,
    ``y_t[d] = Σ_n h_t[d, n] C_t[g(d), n] + D[d] u_t[d]``, times ``silu(z_t[d])`` when z is given.
    u, delta, z ``[Bsz, T, Dm]``; A ``[Dm, N]``; B, C ``[Bsz, T, N]`` or ``[Bsz, T, G, N]`` (channel d
    reads group ``g(d) = d // (Dm // G)``); D, delta_bias ``[Dm]``; state ``[Bsz, Dm, N]``.
    Returns ``(y [Bsz, T, Dm], h_T or None)``."""
    u, delta, A, B, C = _f64(u), _f64(delta), _f64(A), _f64(B), _f64(C)
    if u.ndim != 3:
        raise ValueError(f"u: expected shape [B, T, Dm], got {list(u.shape)}")
    Bsz, T, Dm = u.shape
    _expect("delta", delta, u.shape, "B, T, Dm")
    if A.ndim != 2:
        raise ValueError(f"A: expected shape [Dm, N], got {list(A.shape)}")
    N = A.shape[1]
    _expect("A", A, (Dm, N), "Dm, N")
    B, C = (x[:, :, None] if x.ndim == 3 else x for x in (B, C))
    G = B.shape[2] if B.ndim == 4 else 0
    if G == 0 or Dm % G:
        raise ValueError(f"B: expected shape [B, T, N] or [B, T, G, N] with G dividing Dm = {Dm}, got {list(B.shape)}")
    _expect("B", B, (Bsz, T, G, N), "B, T, G, N")
    _expect("C", C, (Bsz, T, G, N), "B, T, G, N")
    group = np.arange(Dm) // (Dm // G)
    if delta_bias is not None:
        delta = delta + _f64(delta_bias)
    if delta_softplus:
        delta = np.logaddexp(0.0, delta)
    state = np.zeros((Bsz, Dm, N)) if initial_state is None else _f64(initial_state).copy()
    _expect("initial_state", state, (Bsz, Dm, N), "B, Dm, N")
    y = np.empty((Bsz, T, Dm))
    for t in range(T):
        step = delta[:, t, :, None]
        state = np.exp(step * A) * state + step * B[:, t][:, group] * u[:, t, :, None]
        y[:, t] = np.einsum("bdn,bdn->bd", state, C[:, t][:, group])
    if D is not None:
        y += _f64(D) * u
    if z is not None:
        z = _f64(z)
        y *= z / (1.0 + np.exp(-z))
    return y, (state if output_final_state else None)
