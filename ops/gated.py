"""Gated linear attention with a decaying state: retention (one decay per head) and GLA (a decay
per token and key dim), ``S_t = diag(γ_t) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``; and RWKV-6,
GLA's recurrence read before the token's own decay, plus a per-head bonus on the current token.

All three are ``mixer``s: their backward is derived from the forward program (``tilemix.tiles.autodiff``).
GLA and RWKV-6 have two forms. The fast one (``gla_fwd``, ``rwkv6_fwd``) factorises the decay inside a
chunk as ``exp(b_i) · exp(-b_j)`` (``b`` the cumulative log decay from the chunk start): one matmul, exact
while ``exp(-b)`` stays inside the compute dtype's range (log decays summing below about -88 within a
64-token chunk overflow fp32 and bf16, below about -11 fp16). The exact one (``gla_exact_fwd``,
``rwkv6_exact_fwd``) forms the in-chunk scores with ``decayed_scores``: factors never above 1, six
matmuls, finite for log decays of any size. ``gla`` and ``rwkv6`` pick per call (``_run_form``)."""

from __future__ import annotations

import math

import torch

from tilemix.tiles import (
    Head,
    Out,
    Scalar,
    Seq,
    State,
    causal,
    chunks,
    colsum,
    cumsum,
    exp,
    in_seq,
    kernel,
    linrec,
    position,
    rowsum,
    segsum,
    zeros,
)

from ._library import mixer
from .decayed_scores import decayed_scores
from .runtime import check_call, default_scale, host_read

__all__ = ["retention", "retention_fwd", "retention_log_decay", "gla", "gla_fwd", "gla_exact_fwd", "rwkv6",
           "rwkv6_fwd", "rwkv6_exact_fwd"]


@kernel
def retention_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], log_gamma: Head[1], scale: Scalar,
                  o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        qc, kc, vc = q[c], k[c], v[c]
        log_decay = in_seq(position(c).T * 0.0 + 1.0).T * log_gamma  # per token; 0 past the sequence's end
        scores = causal(qc @ kc.T) * exp(segsum(log_decay))
        o[c] = (scores @ vc + (qc @ s) * exp(cumsum(log_decay))) * scale
        s = s * exp(colsum(log_decay)) + kc.T @ (vc * exp(cumsum(log_decay, reverse=True, exclusive=True)))


@kernel
def gla_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], g: Seq["K"], o: Out[Seq["V"]], s: State["K", "V"] = None,
            scale: Scalar = 1.0):
    for c in chunks(64):
        qc, kc, vc, gc = q[c], k[c], v[c], g[c]
        b = cumsum(gc)  # per key dim: log decay from the chunk start
        qb, kb = qc * exp(b) * scale, kc * exp(-b)
        o[c] = causal(qb @ kb.T) @ vc + qb @ s
        s = (s + kb.T @ vc) * exp(colsum(gc)).T  # the chunk's keys decayed to its end


@kernel
def rwkv6_fwd(r: Seq["K"], k: Seq["K"], v: Seq["V"], w: Seq["K"], u: Head["K"], scale: Scalar,
              o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        rc, kc, vc, wc = r[c], k[c], v[c], w[c]
        b = cumsum(wc)  # per key dim: log decay from the chunk start through token t
        rb, kb = rc * exp(b - wc), kc * exp(-b)  # the query reads the state before its own token's decay
        past = causal(rb @ kb.T, strict=True) @ vc + rb @ s
        o[c] = (past + rowsum(rc * u * kc) * vc) * scale  # u: the current token's bonus
        s = (s + kb.T @ vc) * exp(colsum(wc)).T


@kernel
def gla_exact_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], g: Seq["K"], o: Out[Seq["V"]], s: State["K", "V"] = None,
                  scale: Scalar = 1.0):
    """``gla_fwd`` with every decay factor at most 1: finite for log decays of any size."""
    for c in chunks(64):
        qc, kc, vc, gc = q[c], k[c], v[c], g[c]
        o[c] = (decayed_scores(qc, kc, gc) @ vc + (qc * exp(cumsum(gc))) @ s) * scale
        after = linrec(1.0, gc, zeros(1, gc.shape[1]), reverse=True, exclusive=True)  # exact sums, no cancellation
        s = s * exp(colsum(gc)).T + (kc * exp(after)).T @ vc


@kernel
def rwkv6_exact_fwd(r: Seq["K"], k: Seq["K"], v: Seq["V"], w: Seq["K"], u: Head["K"], scale: Scalar,
                    o: Out[Seq["V"]], s: State["K", "V"] = None):
    """``rwkv6_fwd`` with every decay factor at most 1: finite for log decays of any size."""
    for c in chunks(64):
        rc, kc, vc, wc = r[c], k[c], v[c], w[c]
        past = decayed_scores(rc, kc, wc, strict=True) @ vc + (rc * exp(cumsum(wc, exclusive=True))) @ s
        o[c] = (past + rowsum(rc * u * kc) * vc) * scale
        after = linrec(1.0, wc, zeros(1, wc.shape[1]), reverse=True, exclusive=True)
        s = s * exp(colsum(wc)).T + (kc * exp(after)).T @ vc


retention_mixer = mixer(retention_fwd, "tilemix::retention", final_states=("s",))
gla_mixer = mixer(gla_fwd, "tilemix::gla", final_states=("s",))
rwkv6_mixer = mixer(rwkv6_fwd, "tilemix::rwkv6", final_states=("s",))
gla_exact_mixer = mixer(gla_exact_fwd, "tilemix::gla_exact", final_states=("s",))
rwkv6_exact_mixer = mixer(rwkv6_exact_fwd, "tilemix::rwkv6_exact", final_states=("s",))


class _HostFlag:
    """A device bool the host reads later: copied to pinned memory behind the work queued so far, so
    reading it waits for that work only, not for kernels launched after it."""

    def __init__(self, flag: torch.Tensor):
        self._event = None
        if flag.is_cuda:
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flag.device))  # the copy's stream
        else:
            self._host = flag

    def read(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        host_read()
        return bool(self._host)


def _fast_form_holds(log_decay: torch.Tensor, compute_dtype: torch.dtype) -> _HostFlag:
    """Whether the fast form is exact for these log decays ``[B, T, H, K]``: every factor
    ``exp(±b)`` within the square root of the compute dtype's largest value, so its products with
    values up to that size (keys, gradients) stay finite. ``-b`` is at most a chunk's total log
    decay; any 64 tokens lie in two adjacent aligned chunks, so their sums bound it wherever the
    chunks start."""
    log_decay, (B, T, H, K) = log_decay.detach(), log_decay.shape
    whole = T - T % 64
    totals = [log_decay[:, :whole].reshape(B, whole // 64, 64, H, K).sum(2, dtype=torch.float32),
              log_decay[:, whole:].sum(1, keepdim=True, dtype=torch.float32),  # the partial chunk, or zeros
              log_decay.new_zeros(B, 1, H, K, dtype=torch.float32)]
    totals = torch.cat(totals, 1)
    worst = -(totals[:, :-1] + totals[:, 1:]).amin() if log_decay.numel() else totals.new_zeros(())
    return _HostFlag(worst <= math.log(torch.finfo(compute_dtype).max) / 2)


def _run_form(fast, exact_form, exact, log_decay: torch.Tensor, compute_dtype: torch.dtype, **args):
    """``exact_form(**args)`` or ``fast(**args)``: the caller's ``exact`` (a bool), or, for None, the
    fast form launched behind an enqueued check of the decays and the exact one run after it only if
    the check fails; the host waits for the check alone, so the GPU never idles on the read. Traced
    (``torch.compile``) or captured (CUDA graphs) calls take the exact form: the check reads the host."""
    if exact is not None:
        if not isinstance(exact, bool):
            raise TypeError(f"exact: expected True, False or None, got {exact!r}")
        return (exact_form if exact else fast)(**args)
    if torch.compiler.is_compiling() or (log_decay.is_cuda and torch.cuda.is_current_stream_capturing()):
        return exact_form(**args)
    holds = _fast_form_holds(log_decay, compute_dtype)
    result = fast(**args)
    return result if holds.read() else exact_form(**args)


def retention_log_decay(heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``log γ_h`` for ``γ_h = 1 - 2^(-5-h)``, h = 0 .. heads - 1 (RetNet's multi-scale decays)."""
    return torch.tensor([math.log1p(-2.0 ** (-5 - h)) for h in range(heads)], device=device, dtype=dtype)


def _check(op: str, output_final_state, cu_seqlens, **tensors) -> None:
    """The op's arguments; a packed batch (``cu_seqlens``, checked by ``Mixer``) has a state per sequence."""
    check_call(op, differentiable=True, flags=dict(output_final_state=output_final_state), **tensors)
    query = "r" if "r" in tensors else "q"
    q, v, state = tensors[query], tensors["v"], tensors["initial_state"]
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{query if q.dim() != 4 else 'v'}: expected [B, T, H, D], got shape "
                         f"{tuple((q if q.dim() != 4 else v).shape)}")
    rows = q.shape[0] if not isinstance(cu_seqlens, torch.Tensor) else cu_seqlens.shape[0] - 1
    expected = (rows, q.shape[2], q.shape[3], v.shape[3])
    if state is not None and tuple(state.shape) != expected:
        layout = "[B, H, K, V]" if cu_seqlens is None else "[N, H, K, V] (N sequences)"
        raise ValueError(f"initial_state: expected {layout} = {list(expected)}, got {list(state.shape)}")


def retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              initial_state: torch.Tensor | None = None, output_final_state: bool = False, *,
              cu_seqlens: torch.Tensor | None = None):
    """Multi-scale retention (RetNet; flash-linear-attention's ``chunk_retention`` convention):
    head h decays its state by ``γ_h = 1 - 2^(-5-h)`` per token.

    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; scale defaults to ``K ** -0.5``; initial_state:
    float32 ``[B, H, K, V]`` or None (zeros). Returns ``(o [B, T, H, V], final_state or None)``.
    Differentiable (the derived backward). ``cu_seqlens``: a packed batch, as ``Mixer`` takes it."""
    _check("retention", output_final_state, cu_seqlens, q=q, k=k, v=v, initial_state=initial_state)
    log_gamma = retention_log_decay(q.shape[2], q.device)
    o, state = retention_mixer(q=q, k=k, v=v, log_gamma=log_gamma, scale=default_scale(q, scale), s=initial_state,
                               cu_seqlens=cu_seqlens)
    return o, (state if output_final_state else None)


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
        initial_state: torch.Tensor | None = None, output_final_state: bool = False, *,
        cu_seqlens: torch.Tensor | None = None, exact: bool | None = None):
    """Gated linear attention (flash-linear-attention's ``chunk_gla`` convention):
    ``S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``.

    q, k, g: ``[B, T, H, K]`` (g: log forget gates, ≤ 0); v: ``[B, T, H, V]``; scale defaults to
    ``K ** -0.5``; initial_state: float32 ``[B, H, K, V]`` or None (zeros). Returns
    ``(o [B, T, H, V], final_state or None)``. Differentiable (the derived backward). ``cu_seqlens``:
    a packed batch, as ``Mixer`` takes it. ``exact``: the form (module docstring); None checks the
    gates on the GPU and has the host wait for that check (not for the forward launched behind it): pass
    True or False to skip it (traced or captured calls take the exact form unless told)."""
    _check("gla", output_final_state, cu_seqlens, q=q, k=k, v=v, g=g, initial_state=initial_state)
    if g.shape != k.shape:
        raise ValueError(f"g: expected the shape of k {tuple(k.shape)}, got {tuple(g.shape)}")
    o, state = _run_form(gla_mixer, gla_exact_mixer, exact, g, q.dtype, q=q, k=k, v=v, g=g, s=initial_state,
                         scale=default_scale(q, scale), cu_seqlens=cu_seqlens)
    return o, (state if output_final_state else None)


def rwkv6(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
          scale: float | None = None, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
          *, cu_seqlens: torch.Tensor | None = None, exact: bool | None = None):
    """RWKV-6's time mixing (flash-linear-attention's ``chunk_rwkv6`` convention):
    ``o_t = scale · (S_{t-1} + diag(u) k_t v_tᵀ)ᵀ r_t``, ``S_t = diag(exp w_t) S_{t-1} + k_t v_tᵀ``.

    r, k, w: ``[B, T, H, K]`` (w: log decays, ≤ 0); v: ``[B, T, H, V]``; u: ``[H, K]`` bonus; scale
    defaults to ``K ** -0.5``; initial_state: float32 ``[B, H, K, V]`` or None (zeros). Returns
    ``(o [B, T, H, V], final_state or None)``. Differentiable (the derived backward). ``cu_seqlens``:
    a packed batch, as ``Mixer`` takes it. ``exact``: as ``gla``'s, read from w."""
    _check("rwkv6", output_final_state, cu_seqlens, r=r, k=k, v=v, w=w, u=u, initial_state=initial_state)
    if w.shape != k.shape:
        raise ValueError(f"w: expected the shape of k {tuple(k.shape)}, got {tuple(w.shape)}")
    if u.shape != (k.shape[2], k.shape[3]):
        raise ValueError(f"u: expected [H, K] = {[k.shape[2], k.shape[3]]}, got {list(u.shape)}")
    o, state = _run_form(rwkv6_mixer, rwkv6_exact_mixer, exact, w, r.dtype, r=r, k=k, v=v, w=w, u=u,
                         scale=default_scale(r, scale), s=initial_state, cu_seqlens=cu_seqlens)
    return o, (state if output_final_state else None)
