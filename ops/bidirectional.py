"""Bidirectional linear attention (SANA / linear DiT): ``o_t = scale · Sᵀ q_t`` with ``S = Σ_s k_s v_sᵀ`` over
the whole sequence, optionally normalised by ``scale · q_t·Σ_s k_s``; and JRT-RNN's prefix linear attention:
bidirectional over the first ``prefix_len`` tokens, causal after them.

Programs:

- ``bidirectional_linear_attention_fwd`` (``_normalized_fwd``): two chunk loops, the first summing the state
  (and the key sum), the second reading it; the state comes back as the final state the backward reads.
- ``prefix_linear_attention_fwd``: one causal loop whose keys before ``prefix_len`` (a ``Scalar`` compared with
  the token positions, so one kernel serves every prefix length) are masked out, started from the prefix's
  state ``S_P = Σ_{s<P} k_s v_sᵀ``, which ``linear_attention_states`` sums over the prefix's views
  ``k[:, :P]``, ``v[:, :P]`` (read in place): the keys and values after the prefix are read once.
- ``linear_attention_read``: ``o_t = scale · Sᵀ x_t`` for a fixed state, the backward's gradients.

The derived backward (``tilemix.tiles.autodiff``) takes one chunk loop: the bidirectional programs' second
loop reads the first loop's final value, whose gradient would need a reverse program per loop chained through
it. The backward is written here instead, from the same programs and causal linear attention's backward
(``_bidirectional_backward``, ``_prefix_backward``); it needs no per-chunk states.
"""

from __future__ import annotations

import torch

from tilemix.tiles import Out, Scalar, Seq, State, causal, chunks, colsum, kernel, position, rowsum, where

from ._library import no_state, tile_op
from .eager import torch_custom_op
from .linear_attention import linear_attention_bwd_dkdv_op, linear_attention_states
from .runtime import call_with_target, check_call, current_target, default_scale, fake_run, run_kernel, use_target

__all__ = ["bidirectional_linear_attention_fwd", "bidirectional_linear_attention_normalized_fwd",
           "prefix_linear_attention_fwd", "linear_attention_read", "prefix_linear_attention"]

EPSILON = 1e-10  # added to the normaliser, as fla's normalize_output does


@kernel
def bidirectional_linear_attention_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], scale: Scalar,
                                       o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        s = s + k[c].T @ v[c]
    for c in chunks(64):
        o[c] = (q[c] @ s) * scale


@kernel
def bidirectional_linear_attention_normalized_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], scale: Scalar,
                                                  o: Out[Seq["V"]], s: State["K", "V"] = None,
                                                  z: State[1, "K"] = None):
    """``o_t = scale·Sᵀq_t / (scale·q_t·z + EPSILON)``, ``z = Σ_s k_s`` over the same keys as S."""
    for c in chunks(64):
        kc = k[c]
        s = s + kc.T @ v[c]
        z = z + colsum(kc)
    for c in chunks(64):
        qc = q[c]
        o[c] = (qc @ s) * scale / (rowsum(qc * z) * scale + EPSILON)


@kernel
def prefix_linear_attention_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], prefix_len: Scalar, scale: Scalar,
                                o: Out[Seq["V"]], s: State["K", "V"] = None):
    """Causal linear attention over the keys at or after ``prefix_len``, from the prefix's state ``s``: a token
    in the prefix reads ``s`` alone, a later one ``s`` and the keys from ``prefix_len`` through itself."""
    for c in chunks(64):
        qc, vc = q[c], v[c]
        kc = where(position(c) >= prefix_len, k[c], 0.0)
        o[c] = (causal(qc @ kc.T) @ vc + qc @ s) * scale
        s = s + kc.T @ vc


@kernel
def linear_attention_read(x: Seq["K"], scale: Scalar, o: Out[Seq["V"]], s: State["K", "V"]):
    """``o_t = scale · sᵀ x_t`` for a fixed state ``s``."""
    for c in chunks(64):
        o[c] = (x[c] @ s) * scale


def _transposed(state: torch.Tensor) -> torch.Tensor:
    return state.transpose(-1, -2).contiguous()


# -- the state sum and the state read as custom ops: the backward programs ----------------------------------
linear_attention_sum_op = tile_op(
    "linear_attention_sum", "(Tensor a, Tensor b) -> Tensor", linear_attention_states,
    lambda a, b: (dict(k=a, v=b), {"k": "a", "v": "b"}, ("s",)), lambda out: out["s"])
linear_attention_read_op = tile_op(
    "linear_attention_read", "(Tensor x, float scale, Tensor s) -> Tensor", linear_attention_read,
    lambda x, scale, s: (dict(x=x, scale=scale, s=s), {}, ()), lambda out: out["o"])


# -- bidirectional ------------------------------------------------------------------------------------------
bidirectional_linear_attention_op = tile_op(
    "bidirectional_linear_attention", "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)",
    bidirectional_linear_attention_fwd, lambda q, k, v, scale: (dict(q=q, k=k, v=v, scale=scale), {}, ("s",)),
    lambda out: (out["o"], out["s"]))
bidirectional_linear_attention_normalized_op = tile_op(
    "bidirectional_linear_attention_normalized",
    "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor, Tensor)",
    bidirectional_linear_attention_normalized_fwd,
    lambda q, k, v, scale: (dict(q=q, k=k, v=v, scale=scale), {}, ("s", "z")),
    lambda out: (out["o"], out["s"], out["z"]))


def _bidirectional_setup(ctx, inputs, output):
    q, k, v, ctx.scale = inputs
    ctx.target = current_target()
    ctx.save_for_backward(q, k, v, *output)


def _with_state_grad(state_grad: torch.Tensor, direct: torch.Tensor | None) -> torch.Tensor:
    """A state's gradient through the outputs, plus the one coming in for the state as an op result."""
    return state_grad if direct is None else state_grad + direct


def _bidirectional_backward(ctx, do, ds):
    """``o_t = scale · Sᵀ q_t``, ``S = Σ_s k_s v_sᵀ``: ``dq_t = scale · S do_t``, and with
    ``dS = scale · Σ_t q_t do_tᵀ`` (plus the gradient of S as the op's result): ``dk_s = dS v_s``,
    ``dv_s = dSᵀ k_s``."""
    q, k, v, _, s = ctx.saved_tensors
    do = do.contiguous()
    with use_target(ctx.target):
        dstate = _with_state_grad(linear_attention_sum_op(q, do) * ctx.scale, ds)
        return (linear_attention_read_op(do, ctx.scale, _transposed(s)),
                linear_attention_read_op(v, 1.0, _transposed(dstate)), linear_attention_read_op(k, 1.0, dstate), None)


def _normalized_backward(ctx, do, ds, dz):
    """``o_t = n_t / d_t`` with ``n_t = scale · Sᵀ q_t`` and ``d_t = scale · q_t·z + EPSILON``: n's gradient
    ``g_t = do_t / d_t`` goes through the programs as do does above; d's, ``-do_t·o_t / d_t``, reaches q_t
    directly and every k through ``z = Σ_s k_s`` (in torch: vectors per token, no matmul)."""
    q, k, v, o, s, z = ctx.saved_tensors
    work = torch.promote_types(q.dtype, torch.float32)
    scale, zw = ctx.scale, z.to(work)[:, :, 0]  # [B, H, K]
    d = torch.einsum("bthk,bhk->bth", q.to(work), zw) * scale + EPSILON
    g = (do.to(work) / d.unsqueeze(-1)).to(q.dtype)
    dd = -(do.to(work) * o.to(work)).sum(-1) / d  # [B, T, H]
    with use_target(ctx.target):
        dstate = _with_state_grad(linear_attention_sum_op(q, g) * scale, ds)
        dq = linear_attention_read_op(g, scale, _transposed(s)).to(work) + scale * dd.unsqueeze(-1) * zw.unsqueeze(1)
        dk = linear_attention_read_op(v, 1.0, _transposed(dstate)).to(work)
        dv = linear_attention_read_op(k, 1.0, dstate)
    dsum = scale * torch.einsum("bth,bthk->bhk", dd, q.to(work))  # z's gradient
    dk = dk + _with_state_grad(dsum, None if dz is None else dz[:, :, 0].to(work)).unsqueeze(1)
    return dq.to(q.dtype), dk.to(k.dtype), dv, None


bidirectional_linear_attention_op.register_autograd(_bidirectional_backward, setup_context=_bidirectional_setup)
bidirectional_linear_attention_normalized_op.register_autograd(_normalized_backward,
                                                               setup_context=_bidirectional_setup)


# -- prefix -------------------------------------------------------------------------------------------------
prefix_linear_attention_pass_op = tile_op(
    "prefix_linear_attention_pass",
    "(Tensor q, Tensor k, Tensor v, float prefix_len, float scale, Tensor? prefix_state) -> Tensor",
    prefix_linear_attention_fwd,
    lambda q, k, v, prefix_len, scale, prefix_state: (
        dict(q=q, k=k, v=v, prefix_len=prefix_len, scale=scale, s=prefix_state), {"s": "prefix_state"}, ()),
    lambda out: out["o"])


def _prefix(q, k, v, prefix_len, scale, run):
    """o and the prefix's state (empty when ``prefix_len`` is 0): the state summed over views of the prefix,
    then the causal pass from it. ``run(kernel, args, labels, final_states)``."""
    state = run(linear_attention_states, dict(k=k[:, :prefix_len], v=v[:, :prefix_len]), {}, ("s",))["s"] \
        if prefix_len else None
    args = dict(q=q, k=k, v=v, prefix_len=float(prefix_len), scale=scale, s=state)
    o = run(prefix_linear_attention_fwd, args, {}, ())["o"]
    return o, (no_state(o) if state is None else state)


@torch_custom_op("tilemix::prefix_linear_attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, int prefix_len, float scale) -> (Tensor, Tensor)"))
def prefix_linear_attention_op(q, k, v, prefix_len, scale):
    """o and the prefix's state, which the backward reads."""
    return _prefix(q, k, v, prefix_len, scale, run_kernel)


@prefix_linear_attention_op.register_fake
def _(q, k, v, prefix_len, scale):
    return _prefix(q, k, v, prefix_len, scale, fake_run)


def _prefix_setup(ctx, inputs, output):
    q, k, v, ctx.prefix_len, ctx.scale = inputs
    ctx.target = current_target()
    ctx.save_for_backward(q, k, v, output[1])


def _prefix_backward(ctx, do, dprefix_state):
    """dq is the forward pass with do for q and v, k swapped, from the prefix's transposed state. A key at or
    after prefix_len is seen causally: its dk and dv are causal linear attention's. One before it is seen by
    every token, through the prefix's state, whose gradient ``scale · Σ_t q_t do_tᵀ`` the causal backward
    gives as its initial state's (plus the state's own as the op's result): those rows are overwritten with
    it applied to v and k."""
    q, k, v, state = ctx.saved_tensors
    P, scale = ctx.prefix_len, ctx.scale
    do = do.contiguous()
    with use_target(ctx.target):
        dq = prefix_linear_attention_pass_op(do, v, k, float(P), scale, _transposed(state) if P else None)
        dk, dv, dstate = linear_attention_bwd_dkdv_op(q, k, v, do, scale, None, P > 0)
        if P:
            dstate = _with_state_grad(dstate, dprefix_state)
            dk[:, :P] = linear_attention_read_op(v[:, :P], 1.0, _transposed(dstate))
            dv[:, :P] = linear_attention_read_op(k[:, :P], 1.0, dstate)
    return dq, dk, dv, None, None


prefix_linear_attention_op.register_autograd(_prefix_backward, setup_context=_prefix_setup)


def _check_against_q(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k and v shaped and typed as q asks, checked before the prefix's sum runs on their slices (whose
    errors would name the sum's arguments)."""
    if q.dim() != 4:
        raise ValueError(f"q: expected 4 dims [B, T, H, K], got shape {list(q.shape)}")
    for name, t, expected in (("k", k, list(q.shape)), ("v", v, list(q.shape[:3]) + ["V"])):
        if t.dim() != 4 or list(t.shape[:3]) != list(q.shape[:3]) or (name == "k" and t.shape != q.shape):
            raise ValueError(f"{name}: expected shape {expected} (from q), got {list(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")


def prefix_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                            scale: float | None = None, *, target: str | None = None) -> torch.Tensor:
    """JRT-RNN's prefix linear attention: a token ``t < prefix_len`` reads every key ``s < prefix_len``
    (bidirectional over the prefix), a later token every key ``s ≤ t`` (causal):
    ``o_t = scale · (Σ_{s ∈ seen(t)} k_s v_sᵀ)ᵀ q_t``, without normalisation.

    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; ``prefix_len``: an int, ``0 ≤ prefix_len ≤ T`` (0: causal
    linear attention, T: bidirectional); scale defaults to ``K ** -0.5``. Returns ``o [B, T, H, V]``.
    The prefix's keys and values are read twice (its state first, then the causal pass), the rest once.
    ``target`` as in ``linear_attention``. Differentiable."""
    check_call("prefix_linear_attention", differentiable=True, target=target, q=q, k=k, v=v)
    scale = default_scale(q, scale)
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, torch.SymInt)):
        raise TypeError(f"prefix_len: expected an int, got {type(prefix_len).__name__}")
    _check_against_q(q, k, v)
    if not 0 <= prefix_len <= k.shape[1]:
        raise ValueError(f"prefix_len: expected 0 <= prefix_len <= T = {k.shape[1]}, got {prefix_len}")
    return call_with_target(target, prefix_linear_attention_op, q, k, v, prefix_len, scale)[0]
