"""Linear attention: ``S_t = S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``.

The backward is two more tile programs: dq runs forward in time like the output (dq_t = scale·S_t
do_t), and dk, dv run over the time-reversed sequence, where the state D accumulates the later
tokens' scale·q do_ᵀ (dk_t = D_t v_t, dv_t = D_tᵀ k_t) starting from the final state's gradient;
what D reaches is the initial state's gradient."""

from __future__ import annotations

import torch

from tilemix.tiles import Out, Scalar, Seq, State, causal, chunks, kernel

from ._dispatch import call_with_target, check_call, current_target, default_scale, use_target
from ._library import no_state, tile_op
from ._segments import SegmentedScan

__all__ = ["linear_attention", "linear_attention_fwd", "linear_attention_states", "linear_attention_bwd_dq",
           "linear_attention_bwd_dkdv"]


@kernel
def linear_attention_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], scale: Scalar,
                         o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        qc, kc, vc = q[c] * scale, k[c], v[c]
        o[c] = causal(qc @ kc.T) @ vc + qc @ s  # within the chunk + everything before it
        s = s + kc.T @ vc


@kernel
def linear_attention_states(k: Seq["K"], v: Seq["V"], s: State["K", "V"] = None):
    """The state a sequence (a segment of one) adds: pass 1 of the segmented forward."""
    for c in chunks(64):
        s = s + k[c].T @ v[c]


@kernel
def linear_attention_bwd_dq(do: Seq["V"], k: Seq["K"], v: Seq["V"], scale: Scalar,
                            dq: Out[Seq["K"]], s: State["K", "V"] = None):
    for c in chunks(64):
        doc, kc, vc = do[c], k[c], v[c]
        dq[c] = (causal(doc @ vc.T) @ kc + doc @ s.T) * scale
        s = s + kc.T @ vc


@kernel
def linear_attention_bwd_dkdv(q: Seq["K"], k: Seq["K"], v: Seq["V"], do: Seq["V"], scale: Scalar,
                              dk: Out[Seq["K"]], dv: Out[Seq["V"]], d: State["K", "V"] = None):
    """On time-reversed inputs: "causal" here reaches the later tokens of the original order."""
    for c in chunks(64):
        qc, kc, vc, doc = q[c] * scale, k[c], v[c], do[c]
        dk[c] = causal(vc @ doc.T) @ qc + vc @ d.T
        dv[c] = causal(kc @ qc.T) @ doc + kc @ d
        d = d + qc.T @ doc


linear_attention_scan = SegmentedScan(linear_attention_fwd, linear_attention_states, "s")

linear_attention_op = tile_op(
    "linear_attention",
    "(Tensor q, Tensor k, Tensor v, float scale, Tensor? initial_state, bool output_final_state) -> (Tensor, Tensor)",
    linear_attention_fwd,
    lambda q, k, v, scale, initial_state, final: (dict(q=q, k=k, v=v, scale=scale, s=initial_state),
                                                  {"s": "initial_state"}, ("s",) if final else ()),
    lambda out: (out["o"], out.get("s", no_state(out["o"]))),
    run=linear_attention_scan)


def _flip(t: torch.Tensor) -> torch.Tensor:
    return t.flip(1)  # time reversed (a contiguous copy)


# the backward programs as custom ops too, so a compiled training step (AOT autograd traces the
# backward with fake tensors) sees them as ops, not as Python that runs a kernel
linear_attention_bwd_dq_op = tile_op(
    "linear_attention_bwd_dq", "(Tensor do, Tensor k, Tensor v, float scale, Tensor? initial_state) -> Tensor",
    linear_attention_bwd_dq,
    lambda do, k, v, scale, initial_state: (dict(do=do, k=k, v=v, scale=scale, s=initial_state),
                                            {"s": "initial_state"}, ()),
    lambda out: out["dq"])

# dk, dv and the initial state's gradient (empty unless asked for), in the original time order; the
# program runs on the time-reversed sequence, seeded with the final state's gradient
linear_attention_bwd_dkdv_op = tile_op(
    "linear_attention_bwd_dkdv",
    "(Tensor q, Tensor k, Tensor v, Tensor do, float scale, Tensor? final_state_grad, bool initial_state_grad)"
    " -> (Tensor, Tensor, Tensor)",
    linear_attention_bwd_dkdv,
    lambda q, k, v, do, scale, dfinal, want: (dict(q=_flip(q), k=_flip(k), v=_flip(v), do=_flip(do), scale=scale,
                                                   d=dfinal), {"d": "final_state_grad"}, ("d",) if want else ()),
    lambda out: (_flip(out["dk"]), _flip(out["dv"]), out.get("d", no_state(out["dk"]))))


def _setup(ctx, inputs, output):
    q, k, v, scale, initial_state, _ = inputs
    ctx.scale = scale
    ctx.target = current_target()  # the backward programs run on the forward's target
    ctx.save_for_backward(q, k, v, initial_state)


def _backward(ctx, do, dstate):
    q, k, v, initial_state = ctx.saved_tensors
    do = do.contiguous()
    final_grad = dstate if dstate is not None and dstate.numel() else None
    want_dinit = initial_state is not None and ctx.needs_input_grad[4]
    with use_target(ctx.target):
        dq = linear_attention_bwd_dq_op(do, k, v, ctx.scale, initial_state)
        dk, dv, dinit = linear_attention_bwd_dkdv_op(q, k, v, do, ctx.scale, final_grad, want_dinit)
    return dq, dk, dv, None, (dinit if want_dinit else None), None


linear_attention_op.register_autograd(_backward, setup_context=_setup)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     initial_state: torch.Tensor | None = None, output_final_state: bool = False, *,
                     target: str | None = None):
    """Causal linear attention without normalisation (flash-linear-attention's
    ``chunk_linear_attn`` convention).

    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; scale defaults to ``K ** -0.5``;
    initial_state: float32 ``[B, H, K, V]`` or None (zeros).
    Returns ``(o [B, T, H, V], final_state [B, H, K, V] or None)``.
    ``target``: "auto" (default: $TILEMIX_TARGET, else by the GPU), "hopper" or "generic" (the mma.sync
    kernels, also on an H100); the backward runs on the forward's.
    """
    check_call("linear_attention", differentiable=True, q=q, k=k, v=v, initial_state=initial_state)
    o, state = call_with_target(target, linear_attention_op, q, k, v, default_scale(q, scale), initial_state,
                                bool(output_final_state))
    return o, (state if output_final_state else None)
