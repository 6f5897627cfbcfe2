"""Linear attention: ``S_t = S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``.

The backward is four more tile programs, all forward in time and each with a state whose columns
no matmul contracts, so like the forward they split the state into 64-wide column blocks (no
128x128 fp32 state in registers, no spills on sm_90a): dq (``dq_t = scale·S_t do_t``, the state
carried transposed), a pass summing ``Σ q doᵀ`` (which with the final state's gradient is the
initial state's gradient ``D_0``), then dv (``D_tᵀ k_t``) and dk (``D_t v_t``), where ``D_t = dS_T +
scale·Σ_{s≥t} q_s do_sᵀ`` is carried as ``-D_0/scale`` plus the chunks seen so far, the chunk's own
included before it is used. Each is a ``SegmentedScan`` (sequence-parallel on long sequences with
few heads)."""

from __future__ import annotations

import torch

from tilemix.tiles import Out, Scalar, Seq, State, causal, chunks, kernel

from ._library import check_backward, no_state, register_derived_autograd, tile_op
from ._segments import SegmentedScan
from .eager import torch_custom_op
from .fastpath import fast_path
from .runtime import call_with_target, check_call, current_target, default_scale, fake_run, run_kernel, use_target
from .varlen import check_cu_seqlens, fake_varlen, run_varlen

__all__ = ["linear_attention", "linear_attention_fwd", "linear_attention_states", "linear_attention_bwd_dq",
           "linear_attention_bwd_dq_states", "linear_attention_bwd_total", "linear_attention_bwd_dv",
           "linear_attention_bwd_dk", "linear_attention_bwd_dk_states"]


@kernel
def linear_attention_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], scale: Scalar,
                         o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        # scaled after the matmuls: q reaches the tensor cores straight from shared memory
        qc, kc, vc = q[c], k[c], v[c]
        o[c] = (causal(qc @ kc.T) @ vc + qc @ s) * scale  # within the chunk + everything before it
        s = s + kc.T @ vc


@kernel
def linear_attention_states(k: Seq["K"], v: Seq["V"], s: State["K", "V"] = None):
    """The state a sequence (a segment of one) adds: pass 1 of the segmented forward."""
    for c in chunks(64):
        s = s + k[c].T @ v[c]


@kernel
def linear_attention_bwd_dq(do: Seq["V"], k: Seq["K"], v: Seq["V"], scale: Scalar,
                            dq: Out[Seq["K"]], s: State["V", "K"] = None):
    """``dq_t = scale · S_t do_t``, the state carried transposed (``Sᵀ``, V x K: initial_stateᵀ) so that
    no matmul contracts K and the K columns split into 64-wide blocks."""
    for c in chunks(64):
        doc, kc, vc = do[c], k[c], v[c]
        dq[c] = (causal(doc @ vc.T) @ kc + doc @ s) * scale
        s = s + vc.T @ kc


@kernel
def linear_attention_bwd_dq_states(k: Seq["K"], v: Seq["V"], s: State["V", "K"] = None):
    """The transposed state a sequence (a segment of one) adds: pass 1 of the segmented dq."""
    for c in chunks(64):
        s = s + v[c].T @ k[c]


@kernel
def linear_attention_bwd_total(q: Seq["K"], do: Seq["V"], e: State["K", "V"] = None):
    """``e + Σ_t q_t do_tᵀ`` over the sequence (unscaled): pass 1 of the dk and dv programs, whose state
    starts from the negated sum."""
    for c in chunks(64):
        e = e + q[c].T @ do[c]


@kernel
def linear_attention_bwd_dv(q: Seq["K"], k: Seq["K"], do: Seq["V"], scale: Scalar,
                            dv: Out[Seq["V"]], e: State["K", "V"] = None):
    """``dv_t = D_tᵀ k_t`` with ``D_t = dS_T + scale · Σ_{s≥t} q_s do_sᵀ``, forward in time: ``e`` starts at
    ``-D_0 / scale`` (``-(linear_attention_bwd_total + dS_T / scale)``) and adds each chunk's ``q doᵀ``
    before the chunk uses it, so there ``-scale · e`` is D at the chunk's end (the later chunks'
    sum, as a reverse scan would carry it: rounding relative to that, not to D_0) and the chunk's own
    tokens at or after t come in through the transposed causal mask. No matmul contracts V: V splits
    into 64-wide column blocks. q is not scaled before the matmuls (it reaches them from shared
    memory, as the same bf16 values pass 1 summed). The masked product comes first in the sum: the
    lowering then stages e while it runs (one wgmma wait per chunk less than the other order)."""
    for c in chunks(64):
        qc, kc, doc = q[c], k[c], do[c]
        e = e + qc.T @ doc
        dv[c] = ((-causal(kc @ qc.T, transposed=True)) @ doc + kc @ e) * -scale


@kernel
def linear_attention_bwd_dk(q: Seq["K"], v: Seq["V"], do: Seq["V"], scale: Scalar,
                            dk: Out[Seq["K"]], g: State["V", "K"] = None):
    """``dk_t = D_t v_t`` as ``linear_attention_bwd_dv`` computes dv, on the transposed state ``g``
    (``eᵀ``, V x K: K splits into 64-wide column blocks)."""
    for c in chunks(64):
        qc, vc, doc = q[c], v[c], do[c]
        g = g + doc.T @ qc
        dk[c] = ((-causal(vc @ doc.T, transposed=True)) @ qc + vc @ g) * -scale


@kernel
def linear_attention_bwd_dk_states(q: Seq["K"], do: Seq["V"], g: State["V", "K"] = None):
    """Pass 1 of the segmented dk: ``g + Σ do_t q_tᵀ``."""
    for c in chunks(64):
        g = g + do[c].T @ q[c]


linear_attention_scan = SegmentedScan(linear_attention_fwd, linear_attention_states, "s")
# the backward's three scans, each also sequence-parallel on long sequences with few heads
linear_attention_bwd_dq_scan = SegmentedScan(linear_attention_bwd_dq, linear_attention_bwd_dq_states, "s")
linear_attention_bwd_dv_scan = SegmentedScan(linear_attention_bwd_dv, linear_attention_bwd_total, "e")
linear_attention_bwd_dk_scan = SegmentedScan(linear_attention_bwd_dk, linear_attention_bwd_dk_states, "g")


def _forward_op(name: str):
    """The forward as the custom op ``tilemix::name`` (one per backward: their autograd differs)."""
    return tile_op(
        name,
        "(Tensor q, Tensor k, Tensor v, float scale, Tensor? initial_state, bool output_final_state,"
        " Tensor? cu_seqlens=None) -> (Tensor, Tensor)",
        linear_attention_fwd,
        lambda q, k, v, scale, initial_state, final, cu_seqlens=None: (
            dict(q=q, k=k, v=v, scale=scale, s=initial_state, cu_seqlens=cu_seqlens),
            {"s": "initial_state"}, ("s",) if final else ()),
        lambda out: (out["o"], out.get("s", no_state(out["o"]))),
        run=linear_attention_scan)


linear_attention_op = _forward_op("linear_attention")
linear_attention_derived_op = _forward_op("linear_attention_derived")
register_derived_autograd(linear_attention_derived_op, linear_attention_fwd,
                          ("q", "k", "v", "scale", "s", None, "cu_seqlens"), ("o", "s"))


def _transposed(state: torch.Tensor | None) -> torch.Tensor | None:
    return None if state is None else state.transpose(-1, -2).contiguous()


# the backward programs as custom ops too, so a compiled training step (AOT autograd traces the
# backward with fake tensors) sees them as ops, not as Python that runs a kernel
linear_attention_bwd_dq_op = tile_op(
    "linear_attention_bwd_dq",
    "(Tensor do, Tensor k, Tensor v, float scale, Tensor? initial_state, Tensor? cu_seqlens=None) -> Tensor",
    linear_attention_bwd_dq,
    lambda do, k, v, scale, initial_state, cu_seqlens=None: (
        dict(do=do, k=k, v=v, scale=scale, s=_transposed(initial_state), cu_seqlens=cu_seqlens),
        {"s": "initial_state"}, ()),
    lambda out: out["dq"],
    run=linear_attention_bwd_dq_scan)


def _dkdv(q, k, v, do, scale, final_state_grad, initial_state_grad, run):
    """dk, dv and the initial state's gradient D_0 = dS_T + scale · Σ q doᵀ (empty unless
    ``initial_state_grad``), forward in time: pass 1 sums Σ q doᵀ, then the dv and dk programs start
    from ``-D_0 / scale`` (dk's transposed). ``run(kernel or scan, args, labels, final_states)``
    (each state per sequence of a packed batch: ``run`` passes its ``cu_seqlens``)."""
    if scale == 0 and final_state_grad is not None:  # D_t = dS_T throughout: what q = 0, scale = 1 give
        q, scale = torch.zeros_like(q), 1.0
    total = run(linear_attention_bwd_total, dict(q=q, do=do), {}, ("e",))["e"]
    start = -total if final_state_grad is None else -(total + final_state_grad / scale)
    labels = {"e": "final_state_grad"}
    dv = run(linear_attention_bwd_dv_scan, dict(q=q, k=k, do=do, scale=scale, e=start), labels, ())["dv"]
    dk = run(linear_attention_bwd_dk_scan, dict(q=q, v=v, do=do, scale=scale, g=_transposed(start)), {}, ())["dk"]
    if not initial_state_grad:
        return dk, dv, no_state(dk)
    return dk, dv, total * scale if final_state_grad is None else total * scale + final_state_grad


@torch_custom_op("tilemix::linear_attention_bwd_dkdv", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor do, float scale, Tensor? final_state_grad, bool initial_state_grad,"
    " Tensor? cu_seqlens=None) -> (Tensor, Tensor, Tensor)"))
def linear_attention_bwd_dkdv_op(q, k, v, do, scale, final_state_grad, initial_state_grad, cu_seqlens=None):
    """dk, dv and the initial state's gradient (empty unless asked for)."""
    def run(program, args, labels, final):
        if isinstance(program, SegmentedScan):
            return program(args, labels, final, cu_seqlens=cu_seqlens)
        if cu_seqlens is not None:
            return run_varlen(program, args, labels, final, cu_seqlens)
        return run_kernel(program, args, labels, final)

    return _dkdv(q, k, v, do, scale, final_state_grad, initial_state_grad, run)


@linear_attention_bwd_dkdv_op.register_fake
def _(q, k, v, do, scale, final_state_grad, initial_state_grad, cu_seqlens=None):
    def run(program, args, labels, final):
        program = getattr(program, "kernel", program)
        if cu_seqlens is not None:
            return fake_varlen(program, args, labels, final, cu_seqlens)
        return fake_run(program, args, labels, final)

    return _dkdv(q, k, v, do, scale, final_state_grad, initial_state_grad, run)


def _setup(ctx, inputs, output):
    q, k, v, scale, initial_state, _, cu_seqlens = inputs
    ctx.scale = scale
    ctx.target = current_target()  # the backward programs run on the forward's target
    ctx.save_for_backward(q, k, v, initial_state, cu_seqlens)


def _backward(ctx, do, dstate):
    q, k, v, initial_state, cu_seqlens = ctx.saved_tensors
    do = do.contiguous()
    final_grad = dstate if dstate is not None and dstate.numel() else None
    want_dinit = initial_state is not None and ctx.needs_input_grad[4]
    with use_target(ctx.target):
        dq = linear_attention_bwd_dq_op(do, k, v, ctx.scale, initial_state, cu_seqlens)
        dk, dv, dinit = linear_attention_bwd_dkdv_op(q, k, v, do, ctx.scale, final_grad, want_dinit, cu_seqlens)
    return dq, dk, dv, None, (dinit if want_dinit else None), None, None


linear_attention_op.register_autograd(_backward, setup_context=_setup)


@fast_path
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     initial_state: torch.Tensor | None = None, output_final_state: bool = False, *,
                     cu_seqlens: torch.Tensor | None = None, target: str | None = None,
                     backward: str = "hand-written", causal: bool = True, normalize: bool = False):
    """Causal linear attention without normalisation (flash-linear-attention's
    ``chunk_linear_attn`` convention).

    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; scale defaults to ``K ** -0.5``;
    initial_state: float32 ``[B, H, K, V]`` or None (zeros).
    Returns ``(o [B, T, H, V], final_state [B, H, K, V] or None)``.
    ``cu_seqlens``: int32 ``[N + 1]``, N sequences packed into one row (B = 1; ``ops/varlen.py``):
    each starts from its own initial state (``[N, H, K, V]``) and ends in its own final state.
    ``target``: "auto" (default: $TILEMIX_TARGET, else by the GPU), "hopper" or "generic" (the mma.sync
    kernels, also on an H100); the backward runs on the forward's.
    ``backward``: "hand-written" (default: the programs above) or "derived" (the backward derived
    from ``linear_attention_fwd``, ``tilemix.tiles.autodiff``, on the interpreter or the GPU).
    ``causal=False``: bidirectional (SANA, linear DiT), ``o_t = scale · Sᵀ q_t`` with ``S = Σ_s k_s v_sᵀ`` over
    every token (``ops/bidirectional.py``); ``normalize=True`` (bidirectional only) divides ``o_t`` by
    ``scale · q_t·Σ_s k_s + 1e-10`` over the same keys (fla's ``normalize_output`` convention: a sum near 0 is
    not guarded further). It takes no initial state, returns no final state and has its own backward.
    """
    check_call("linear_attention", differentiable=True, target=target,
               flags=dict(output_final_state=output_final_state, causal=causal, normalize=normalize),
               q=q, k=k, v=v, initial_state=initial_state)
    if cu_seqlens is not None:
        if not causal:
            raise ValueError("cu_seqlens: packed sequences run the causal scan only (causal=True)")
        check_cu_seqlens(cu_seqlens, q, "q")
    if not causal:
        return _bidirectional(q, k, v, scale, initial_state, output_final_state, target, backward, normalize)
    if normalize:
        raise ValueError("normalize: True is supported with causal=False only")
    op = linear_attention_derived_op if check_backward(backward) == "derived" else linear_attention_op
    o, state = call_with_target(target, op, q, k, v, default_scale(q, scale), initial_state, bool(output_final_state),
                                cu_seqlens)
    return o, (state if output_final_state else None)


def _bidirectional(q, k, v, scale, initial_state, output_final_state, target, backward, normalize):
    """``linear_attention(..., causal=False)``, its arguments checked."""
    for name, given in (("initial_state", initial_state is not None), ("output_final_state", output_final_state)):
        if given:
            raise ValueError(f"{name}: the bidirectional form (causal=False) has no recurrent state")
    if check_backward(backward) != "hand-written":
        raise ValueError("backward: 'derived' is the causal program's; causal=False runs its own backward")
    # the ops ops/bidirectional.py registers (importing it here would close a cycle: it reuses this module)
    op = torch.ops.tilemix.bidirectional_linear_attention_normalized if normalize else \
        torch.ops.tilemix.bidirectional_linear_attention
    return call_with_target(target, op, q, k, v, default_scale(q, scale))[0], None
