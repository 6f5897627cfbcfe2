"""xLSTM's matrix LSTM (mLSTM): a ``[K, V]`` memory C with an exponential input gate, a sigmoid
forget gate taken in log space, a normaliser n and a running max m that keeps every exponent ≤ 0.

Chunked as in ``mlstm_kernels``: within a 64-token chunk the log weight of token j in token t's
memory is ``b_t - b_j + i_j`` (``b`` the cumulative log forget gate from the chunk's start), a
matrix whose row max, with the carried ``m`` decayed to row t, is the recurrence's own ``m_t``; the
state (C, n) crosses chunks scaled by ``exp(-m)``. So the chunked program computes the same ``m``
as the token loop, and its h and final state match it term for term. h does not depend on the
stabiliser (it scales the numerator and both sides of the denominator's max alike), so the backward
derived from the program (the max's subgradient included) is the gradient of h."""

from __future__ import annotations

import torch

from tilemix.tiles import (
    Out,
    Scalar,
    Seq,
    State,
    chunks,
    colmax,
    colsum,
    cumsum,
    exp,
    in_seq,
    kernel,
    maximum,
    rowmax,
    rowsum,
    segsum,
    softplus,
)

from ._library import no_state, register_derived_autograd, tile_op
from .runtime import check_call, default_scale

__all__ = ["mlstm", "mlstm_fwd"]

# the input gate of the rows past the sequence's end: no weight, and never the max (-inf would
# turn a zero gradient into 0 * inf in the derived backward)
_NO_TOKEN = -1e30


@kernel
def mlstm_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], i: Seq[1], f: Seq[1], scale: Scalar, h: Out[Seq["V"]],
              C: State["K", "V"] = None, n: State["K", 1] = None, m: State[1, 1] = None):
    for c in chunks(64):
        qc, kc, vc = q[c], k[c], v[c]
        log_f = in_seq(-softplus(-f[c].T)).T  # log σ(f); 0 past the sequence's end: the state stops there
        gate = in_seq(i[c].T, fill=_NO_TOKEN).T
        b = cumsum(log_f)
        log_w = segsum(log_f) + gate.T  # [t, j]: token j's log weight in row t's memory, -inf for j > t
        m_t = maximum(b + m, rowmax(log_w))
        w = exp(log_w - m_t)
        carried = exp(b + m - m_t)  # the state entering the chunk, as row t weighs it
        scores = (qc @ kc.T) * w * scale
        numerator = scores @ vc + (qc @ C) * (carried * scale)
        qn = rowsum(scores) + rowsum(qc * (n * scale).T) * carried
        h[c] = numerator / maximum(abs(qn), exp(-m_t))
        to_end = cumsum(log_f, reverse=True, exclusive=True) + gate  # token j's log weight at the chunk's end
        m_end = maximum(m + colsum(log_f), colmax(to_end))
        decay, inject = exp(m + colsum(log_f) - m_end), exp(to_end - m_end)
        # in this order (numerator, then n's update before C's) the fewest registers spill at K = 256
        n = n * decay + colsum(kc * inject).T
        C = C * decay + kc.T @ (vc * inject)
        m = m_end


_STATES = ("C", "n", "m")
_ARGUMENTS = ("q", "k", "v", "i", "f", "scale", *_STATES, None)  # the op's arguments as program parameters


def _program_args(*args):
    *tensors, flag = args
    labels = {s: f"initial_state[{j}]" for j, s in enumerate(_STATES)}
    return dict(zip(_ARGUMENTS, tensors)), labels, (_STATES if flag else ())


def _result(out):
    h = out["h"]
    return h, *(out.get(s, no_state(h)) for s in _STATES)


mlstm_op = tile_op(
    "mlstm", "(Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, float scale, Tensor? C, Tensor? n, Tensor? m, "
    "bool output_final_state) -> (Tensor, Tensor, Tensor, Tensor)", mlstm_fwd, _program_args, _result)
register_derived_autograd(mlstm_op, mlstm_fwd, _ARGUMENTS, ("h", *_STATES))


def _check(q, k, v, i, f, initial_state, output_final_state) -> tuple:
    """The initial state as the program's (C, n [.., K, 1], m [.., 1, 1]), or Nones; errors name the argument."""
    check_call("mlstm", differentiable=True, flags=dict(output_final_state=output_final_state),
               q=q, k=k, v=v, i=i, f=f)
    for name, x in (("q", q), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name}: expected [B, T, H, D], got shape {tuple(x.shape)}")
    B, T, H, K = q.shape
    for name, x in (("i", i), ("f", f)):
        if tuple(x.shape) != (B, T, H):
            raise ValueError(f"{name}: expected [B, T, H] = {[B, T, H]}, got {list(x.shape)}")
    if initial_state is None:
        return None, None, None
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3:
        raise TypeError(f"initial_state: expected a tuple (C, n, m) or None, got {type(initial_state).__name__}")
    expected = ((B, H, K, v.shape[3]), (B, H, K), (B, H))
    for j, (name, x, shape) in enumerate(zip(_STATES, initial_state, expected)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"initial_state[{j}]: expected a tensor ({name}), got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"initial_state[{j}]: expected {name} of shape {list(shape)}, got {list(x.shape)}")
    C, n, m = initial_state
    return C, n.unsqueeze(-1), m[..., None, None]


def mlstm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
          scale: float | None = None, initial_state: tuple | None = None, output_final_state: bool = False):
    """xLSTM's mLSTM cell over a sequence, the stabilised recurrence (per batch and head; the xLSTM
    paper's appendix, ``mlstm_kernels``' recurrent step without its ``eps``)::

        m_t = max(log σ(f_t) + m_{t-1}, i_t)
        C_t = exp(log σ(f_t) + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_tᵀ
        n_t = exp(log σ(f_t) + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t
        h_t = C_tᵀ (scale q_t) / max(|n_tᵀ (scale q_t)|, exp(-m_t))

    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; i, f: ``[B, T, H]`` input and forget gate
    pre-activations; scale defaults to ``K ** -0.5``; initial_state: float32 ``(C [B, H, K, V],
    n [B, H, K], m [B, H])`` or None (all zeros). Returns ``(h [B, T, H, V], (C, n, m) or None)``.
    The state ``(C, n, m)`` stands for the unstabilised ``exp(m) (C, n)``: the stabiliser changes no
    h, only keeps every exponent ≤ 0. In fp32 keep the input gates above about -88 (m_t ≥ i_t, and
    an m_t below that overflows ``exp(-m_t)``). Differentiable in every tensor (the backward derived
    from ``mlstm_fwd``)."""
    C, n, m = _check(q, k, v, i, f, initial_state, output_final_state)
    h, C, n, m = mlstm_op(q, k, v, i, f, default_scale(q, scale), C, n, m, bool(output_final_state))
    return h, ((C, n.squeeze(-1), m[..., 0, 0]) if output_final_state else None)
