"""DeltaNet and gated DeltaNet: ``u_t = β_t (v_t − S'_tᵀ k_t)``, ``S_t = S'_t + k_t u_tᵀ``,
``o_t = scale · S_tᵀ q_t``, with ``S'_t = S_{t-1}`` (delta rule) or ``exp(g_t) S_{t-1}`` (gated).

Chunked with the UT transform: within a 64-token chunk the new values ``u`` solve the unit lower
triangular system ``(I + A) u = β (V − D K S)``, ``A = tril(β (K Kᵀ ⊙ Γ), -1)``, where ``Γ[i, j] =
exp(G_i − G_j)`` is the decay from token j to token i and ``D = diag(exp G)`` the decay from the
chunk's start (both all ones for the delta rule). So ``u = u0 − w S`` with ``u0 = (I + A)⁻¹ β V`` and
``w = (I + A)⁻¹ β D K``, which need no state: the ops compute them for every chunk at once in a grid
program (``*_prepare``, ``blocks``), then run the state recurrence alone in a scan (``*_scan``), so
the solves leave the sequential path. ``*_fwd`` states the same forward as one scan program.

The prepares solve for ``(I + A)⁻¹ diag(β)`` (64 right-hand columns, not 2 x 128: the serial
substitution is the costly part), then multiply on tensor cores with the inverse split as ``hi + lo``
(``hi`` = bf16 rounding): one bf16 operand alone would give w several times the error at correlated
keys, two keep it at the direct solve's.

The backward is derived from the programs (``tilemix.tiles.autodiff``, ``trisolve``'s adjoint):
no hand-written backward. w and u0 pass between the programs in the compute dtype, as every matmul
operand is rounded to it anyway."""

from __future__ import annotations

import torch

from tilemix.tiles import (
    Out,
    Scalar,
    Seq,
    State,
    blocks,
    cast,
    causal,
    chunks,
    colsum,
    concat,
    cumsum,
    exp,
    eye,
    kernel,
    segsum,
    trisolve,
)

from ._library import mixer, no_state, register_derived_autograd, tile_op
from .runtime import check_call, default_scale

__all__ = ["delta_rule", "delta_rule_fwd", "delta_rule_prepare", "delta_rule_scan", "gated_delta_rule",
           "gated_delta_rule_fwd", "gated_delta_rule_prepare", "gated_delta_rule_scan"]


@kernel
def delta_rule_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], beta: Seq[1], scale: Scalar,
                   o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        qc, kc, vc, bc = q[c], k[c], v[c], beta[c]
        a = causal(kc @ kc.T * bc, strict=True)
        u = trisolve(a, vc * bc) - trisolve(a, kc * bc) @ s
        o[c] = (qc @ s + causal(qc @ kc.T) @ u) * scale
        s = s + kc.T @ u


@kernel
def delta_rule_prepare(k: Seq["K"], v: Seq["V"], beta: Seq[1], w: Out[Seq["K"]], u0: Out[Seq["V"]]):
    for c in blocks(64):  # each chunk alone: no state
        kc, bc = k[c], beta[c]
        a = causal(kc @ kc.T * bc, strict=True)
        t = trisolve(a, eye(64) * bc)  # (I + A)⁻¹ diag(β), fp32
        hi = cast(t, "bf16")  # t = hi + lo: both halves exact enough as matmul operands
        w[c] = hi @ kc + (t - hi) @ kc
        u0[c] = hi @ v[c] + (t - hi) @ v[c]


@kernel
def delta_rule_scan(q: Seq["K"], k: Seq["K"], w: Seq["K"], u0: Seq["V"], scale: Scalar,
                    o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        qc, kc = q[c], k[c]
        u = u0[c] - w[c] @ s
        o[c] = (qc @ s + causal(qc @ kc.T) @ u) * scale
        s = s + kc.T @ u


@kernel
def gated_delta_rule_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], g: Seq[1], beta: Seq[1], scale: Scalar,
                         o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        qc, kc, vc, gc, bc = q[c], k[c], v[c], g[c], beta[c]
        decay = exp(segsum(gc))  # token j -> token i, zero above the diagonal
        from_start = exp(cumsum(gc))  # chunk start -> token t
        a = causal(kc @ kc.T * decay * bc, strict=True)
        u = trisolve(a, vc * bc) - trisolve(a, kc * (bc * from_start)) @ s
        o[c] = ((qc @ s) * from_start + (qc @ kc.T * decay) @ u) * scale
        s = s * exp(colsum(gc)) + kc.T @ (u * exp(cumsum(gc, reverse=True, exclusive=True)))


@kernel
def gated_delta_rule_prepare(k: Seq["K"], v: Seq["V"], g: Seq[1], beta: Seq[1],
                             w: Out[Seq["K"]], u0: Out[Seq["V"]]):
    for c in blocks(64):  # each chunk alone: no state
        kc, gc, bc = k[c], g[c], beta[c]
        a = causal(kc @ kc.T * exp(segsum(gc)) * bc, strict=True)
        t = trisolve(a, concat([eye(64) * bc, eye(64) * (bc * exp(cumsum(gc)))]))  # one solve, 128 columns
        tu, tw = t[:, 0:64], t[:, 64:128]  # (I + A)⁻¹ diag(β), (I + A)⁻¹ diag(β exp(G))
        hu, hw = cast(tu, "bf16"), cast(tw, "bf16")
        w[c] = hw @ kc + (tw - hw) @ kc
        u0[c] = hu @ v[c] + (tu - hu) @ v[c]


@kernel
def gated_delta_rule_scan(q: Seq["K"], k: Seq["K"], g: Seq[1], w: Seq["K"], u0: Seq["V"], scale: Scalar,
                          o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        qc, kc, gc = q[c], k[c], g[c]
        u = u0[c] - w[c] @ s
        o[c] = ((qc @ s) * exp(cumsum(gc)) + (qc @ kc.T * exp(segsum(gc))) @ u) * scale
        s = s * exp(colsum(gc)) + kc.T @ (u * exp(cumsum(gc, reverse=True, exclusive=True)))


_SIGNATURE = "float scale, Tensor? initial_state, bool output_final_state) -> (Tensor, Tensor)"


def _scan_op(name: str, program, inputs: tuple[str, ...]):
    """``program`` (a scan) as the differentiable custom op ``tilemix::name``: its tensor ``inputs``,
    then scale, initial_state and the final-state flag."""
    schema = ", ".join(f"Tensor {n}" for n in inputs)
    op = tile_op(
        name, f"({schema}, {_SIGNATURE}", program,
        lambda *args: ({**dict(zip(inputs, args)), "scale": args[-3], "s": args[-2]},
                       {"s": "initial_state"}, ("s",) if args[-1] else ()),
        lambda out: (out["o"], out.get("s", no_state(out["o"]))))
    register_derived_autograd(op, program, (*inputs, "scale", "s", None), ("o", "s"))
    return op


def _composite(name: str, prepare, scan, gates: tuple[str, ...]) -> None:
    """``tilemix::name(q, k, v, *gates, scale, initial_state, output_final_state)``: the prepare
    mixer, then the scan op; an implicit-autograd composite, so each program's derived backward runs."""
    prepare_op = mixer(prepare, f"tilemix::{name}_prepare").op
    scan_op = _scan_op(f"{name}_scan", scan, ("q", "k", *(("g",) if "g" in gates else ()), "w", "u0"))
    schema = ", ".join(f"Tensor {n}" for n in ("q", "k", "v", *gates))
    torch.library.define(f"tilemix::{name}", f"({schema}, {_SIGNATURE}")

    @torch.library.impl(f"tilemix::{name}", "CompositeImplicitAutograd")
    def run(q, k, v, *rest):
        *gate_values, scale, initial_state, output_final_state = rest
        w, u0 = prepare_op(k, v, *gate_values)
        g = gate_values[:1] if "g" in gates else ()
        return scan_op(q, k, *g, w, u0, scale, initial_state, output_final_state)


_composite("delta_rule", delta_rule_prepare, delta_rule_scan, ("beta",))
_composite("gated_delta_rule", gated_delta_rule_prepare, gated_delta_rule_scan, ("g", "beta"))


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, scale: float | None = None,
               initial_state: torch.Tensor | None = None, output_final_state: bool = False):
    """DeltaNet (flash-linear-attention's ``chunk_delta_rule`` convention, keys as given: normalise
    them yourself for a contracting recurrence).

    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]`` (in (0, 1) usually);
    scale defaults to ``K ** -0.5``; initial_state: float32 ``[B, H, K, V]`` or None (zeros).
    Returns ``(o [B, T, H, V], final_state [B, H, K, V] or None)``. Differentiable in every tensor
    through the backward derived from ``delta_rule_prepare`` and ``delta_rule_scan``."""
    check_call("delta_rule", differentiable=True, flags=dict(output_final_state=output_final_state),
               q=q, k=k, v=v, beta=beta, initial_state=initial_state)
    o, state = torch.ops.tilemix.delta_rule(q, k, v, beta, default_scale(q, scale), initial_state,
                                            bool(output_final_state))
    return o, (state if output_final_state else None)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False):
    """Gated DeltaNet (``chunk_gated_delta_rule``'s convention): ``delta_rule`` with the state decayed
    by ``exp(g_t)`` before each token's update; g: ``[B, T, H]`` log decays (<= 0)."""
    check_call("gated_delta_rule", differentiable=True, flags=dict(output_final_state=output_final_state),
               q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    o, state = torch.ops.tilemix.gated_delta_rule(q, k, v, g, beta, default_scale(q, scale), initial_state,
                                                  bool(output_final_state))
    return o, (state if output_final_state else None)
