"""Float64 NumPy definitions of the ops: the ground truth.

Naive on purpose — attention as the explicit quadratic softmax, linear
attention and SSD as token-by-token recurrences — so they share no
algorithm (chunking, online softmax, segment sums) with the tile programs
they check. Inputs may be NumPy arrays or torch tensors of any float dtype.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gemm", "attention", "linear_attention", "ssd", "retention", "gla", "rwkv6", "delta_rule",
           "gated_delta_rule"]


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _expect(name: str, x: np.ndarray, shape: tuple, names: str) -> None:
    if x.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape [{names}] = {list(shape)}, got {list(x.shape)}")


def _qkv(q, k, v, d: str, dv: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q and k ``[B, T, H, d]``, v ``[B, T, H, dv]``, in float64, checked."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    if q.ndim != 4:
        raise ValueError(f"q: expected shape [B, T, H, {d}], got {list(q.shape)}")
    _expect("k", k, q.shape, f"B, T, H, {d}")
    _expect("v", v, q.shape[:3] + v.shape[-1:], f"B, T, H, {dv}")
    return q, k, v


def gemm(a, b) -> np.ndarray:
    """``C = A B`` for ``A [M, K]``, ``B [K, N]``."""
    a, b = _f64(a), _f64(b)
    if a.ndim != 2:
        raise ValueError(f"a: expected shape [M, K], got {list(a.shape)}")
    _expect("b", b, (a.shape[1], b.shape[-1] if b.ndim == 2 else -1), "K, N")
    return a @ b


def attention(q, k, v, causal: bool = False, scale: float | None = None, window: int | None = None) -> np.ndarray:
    """``O = softmax(scale · Q Kᵀ + M) V`` per batch and head, with
    ``M[i, j] = -inf`` for ``j > i + Tk - Tq`` when causal (aligned to the end, as
    FlashAttention does; ``Tq = Tk``: ``j > i``), and also for ``j <= i - window``
    with a sliding ``window`` (causal, ``Tq = Tk`` only). q ``[B, Tq, H, D]``, k
    ``[B, Tk, H_kv, D]``, v ``[B, Tk, H_kv, Dv]`` → ``[B, Tq, H, Dv]``; a query that
    sees no key outputs 0; grouped queries where ``H_kv < H`` (``H % H_kv == 0``): head h
    reads kv head ``h // (H // H_kv)``, as if k and v were repeated. scale defaults to ``D**-0.5``."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    if q.ndim != 4:
        raise ValueError(f"q: expected shape [B, T, H, D], got {list(q.shape)}")
    if window is not None and (not causal or not isinstance(window, int) or window <= 0):
        raise ValueError(f"window: expected a positive int with causal=True, got {window!r} (causal={causal})")
    B, T, H, D = q.shape
    kv_heads = k.shape[2] if k.ndim == 4 else -1
    if kv_heads <= 0 or H % kv_heads:
        raise ValueError(f"k: expected shape [B, T, H_kv, D] with H_kv dividing H = {H}, got {list(k.shape)}")
    Tk = k.shape[1]
    _expect("k", k, (B, Tk, kv_heads, D), "B, Tk, H_kv, D")
    _expect("v", v, (B, Tk, kv_heads) + v.shape[-1:], "B, Tk, H_kv, Dv")
    if window is not None and Tk != T:
        raise ValueError(f"window: a sliding window takes keys and queries of one length; k has {Tk}, q {T}")
    k, v = np.repeat(k, H // kv_heads, axis=2), np.repeat(v, H // kv_heads, axis=2)
    scale = D ** -0.5 if scale is None else scale
    scores = scale * np.einsum("bihd,bjhd->bhij", q, k)
    if causal:
        visible = np.tril(np.ones((T, Tk), dtype=bool), Tk - T)
        if window is not None:
            visible &= np.triu(visible, 1 - window)
        scores = np.where(visible, scores, -np.inf)
    if T and Tk:
        top = scores.max(axis=-1, keepdims=True)
        scores = scores - np.where(np.isfinite(top), top, 0)  # a row that sees no key stays -inf
    p = np.exp(scores)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)  # such a row: 0
    return np.einsum("bhij,bjhd->bihd", p, v)


def linear_attention(q, k, v, scale: float | None = None, initial_state=None, output_final_state: bool = False):
    """Causal linear attention without normalisation:
    ``S_0 = initial_state`` (or 0), ``S_t = S_{t-1} + k_t v_tᵀ``,
    ``o_t = scale · S_tᵀ q_t``. q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
    state ``[B, H, K, V]``; scale defaults to ``K**-0.5``.
    Returns ``(o [B, T, H, V], S_T or None)``."""
    q, k, v = _qkv(q, k, v, "K", "V")
    return _decayed_scan(q, k, v, np.zeros(q.shape), scale, initial_state, output_final_state)  # no decay


def _decayed_scan(q, k, v, log_decay, scale, initial_state, output_final_state):
    """``S_t = diag(exp log_decay_t) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``, token by token;
    ``log_decay [B, T, H, K]`` (a decay per key dim)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    state = np.zeros((B, H, K, V)) if initial_state is None else _f64(initial_state).copy()
    _expect("initial_state", state, (B, H, K, V), "B, H, K, V")
    o = np.empty((B, T, H, V))
    for t in range(T):
        state = np.exp(log_decay[:, t])[..., None] * state + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = scale * np.einsum("bhkv,bhk->bhv", state, q[:, t])
    return o, (state if output_final_state else None)


def retention(q, k, v, scale: float | None = None, initial_state=None, output_final_state: bool = False):
    """Multi-scale retention: ``S_t = γ_h S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t`` with
    ``γ_h = 1 - 2^(-5-h)`` for head h; shapes as ``linear_attention``."""
    q, k, v = _qkv(q, k, v, "K", "V")
    log_gamma = np.log1p(-(2.0 ** (-5.0 - np.arange(q.shape[2]))))
    log_decay = np.broadcast_to(log_gamma[None, None, :, None], q.shape)
    return _decayed_scan(q, k, v, log_decay, scale, initial_state, output_final_state)


def gla(q, k, v, g, scale: float | None = None, initial_state=None, output_final_state: bool = False):
    """Gated linear attention: ``S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``;
    g ``[B, T, H, K]`` log forget gates, other shapes as ``linear_attention``."""
    q, k, v = _qkv(q, k, v, "K", "V")
    g = _f64(g)
    _expect("g", g, q.shape, "B, T, H, K")
    return _decayed_scan(q, k, v, g, scale, initial_state, output_final_state)


def rwkv6(r, k, v, w, u, scale: float | None = None, initial_state=None, output_final_state: bool = False):
    """RWKV-6: ``o_t = scale · (S_{t-1} + diag(u) k_t v_tᵀ)ᵀ r_t``, ``S_t = diag(exp w_t) S_{t-1} + k_t v_tᵀ``;
    w ``[B, T, H, K]`` log decays, u ``[H, K]``, other shapes as ``linear_attention`` (q is r)."""
    r, k, v = _qkv(r, k, v, "K", "V")
    w, u = _f64(w), _f64(u)
    B, T, H, K = r.shape
    V = v.shape[-1]
    _expect("w", w, r.shape, "B, T, H, K")
    _expect("u", u, (H, K), "H, K")
    scale = K ** -0.5 if scale is None else scale
    state = np.zeros((B, H, K, V)) if initial_state is None else _f64(initial_state).copy()
    _expect("initial_state", state, (B, H, K, V), "B, H, K, V")
    o = np.empty((B, T, H, V))
    for t in range(T):
        kv = np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = scale * np.einsum("bhkv,bhk->bhv", state + u[None, :, :, None] * kv, r[:, t])
        state = np.exp(w[:, t])[..., None] * state + kv
    return o, (state if output_final_state else None)


def ssd(x, dt, A, B, C, D=None, initial_state=None, output_final_state: bool = False):
    """Mamba-2 SSD recurrence: per head ``h``, with group ``g = h // (H // G)``,
    ``h_t = exp(dt_t · A) h_{t-1} + dt_t · B_t x_tᵀ`` (state ``[N, P]``),
    ``y_t = h_tᵀ C_t + D · x_t``. x ``[Bsz, T, H, P]``, dt ``[Bsz, T, H]``,
    A ``[H]``, B and C ``[Bsz, T, G, N]``, D ``[H]`` or None, state
    ``[Bsz, H, N, P]``. Returns ``(y [Bsz, T, H, P], h_T or None)``."""
    x, dt, A, B, C = _f64(x), _f64(dt), _f64(A), _f64(B), _f64(C)
    if x.ndim != 4:
        raise ValueError(f"x: expected shape [B, T, H, P], got {list(x.shape)}")
    Bsz, T, H, P = x.shape
    _expect("dt", dt, (Bsz, T, H), "B, T, H")
    _expect("A", A, (H,), "H")
    if B.ndim != 4:
        raise ValueError(f"B: expected shape [B, T, G, N], got {list(B.shape)}")
    G, N = B.shape[2], B.shape[3]
    _expect("B", B, (Bsz, T, G, N), "B, T, G, N")
    _expect("C", C, (Bsz, T, G, N), "B, T, G, N")
    if G == 0 or H % G:
        raise ValueError(f"B: {G} groups must divide the {H} heads")
    group = np.arange(H) // (H // G)
    state = np.zeros((Bsz, H, N, P)) if initial_state is None else _f64(initial_state).copy()
    _expect("initial_state", state, (Bsz, H, N, P), "B, H, N, P")
    y = np.empty((Bsz, T, H, P))
    for t in range(T):
        decay = np.exp(dt[:, t] * A)[:, :, None, None]
        inject = dt[:, t][:, :, None, None] * np.einsum("bhn,bhp->bhnp", B[:, t][:, group], x[:, t])
        state = decay * state + inject
        y[:, t] = np.einsum("bhnp,bhn->bhp", state, C[:, t][:, group])
    if D is not None:
        D = _f64(D)
        _expect("D", D, (H,), "H")
        y += D[None, None, :, None] * x
    return y, (state if output_final_state else None)


def gated_delta_rule(q, k, v, g, beta, scale: float | None = None, initial_state=None,
                     output_final_state: bool = False):
    """Gated DeltaNet, token by token: ``S'_t = exp(g_t) S_{t-1}``, ``u_t = β_t (v_t − S'_tᵀ k_t)``,
    ``S_t = S'_t + k_t u_tᵀ``, ``o_t = scale · S_tᵀ q_t``. q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
    g and beta ``[B, T, H]``, state ``[B, H, K, V]``; scale defaults to ``K**-0.5``.
    Returns ``(o [B, T, H, V], S_T or None)``."""
    q, k, v = _qkv(q, k, v, "K", "V")
    B, T, H, K = q.shape
    g, beta = _f64(g), _f64(beta)
    _expect("g", g, (B, T, H), "B, T, H")
    _expect("beta", beta, (B, T, H), "B, T, H")
    scale = K ** -0.5 if scale is None else scale
    state = np.zeros((B, H, K, v.shape[-1])) if initial_state is None else _f64(initial_state).copy()
    _expect("initial_state", state, (B, H, K, v.shape[-1]), "B, H, K, V")
    o = np.empty(v.shape)
    for t in range(T):
        state = np.exp(g[:, t])[:, :, None, None] * state
        u = beta[:, t, :, None] * (v[:, t] - np.einsum("bhkv,bhk->bhv", state, k[:, t]))
        state = state + np.einsum("bhk,bhv->bhkv", k[:, t], u)
        o[:, t] = scale * np.einsum("bhkv,bhk->bhv", state, q[:, t])
    return o, (state if output_final_state else None)


def delta_rule(q, k, v, beta, scale: float | None = None, initial_state=None, output_final_state: bool = False):
    """DeltaNet: ``gated_delta_rule`` with ``g = 0`` (``u_t = β_t (v_t − S_{t-1}ᵀ k_t)``,
    ``S_t = S_{t-1} + k_t u_tᵀ``, ``o_t = scale · S_tᵀ q_t``)."""
    beta = _f64(beta)
    return gated_delta_rule(q, k, v, np.zeros(beta.shape), beta, scale, initial_state, output_final_state)
