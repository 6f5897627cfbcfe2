"""Mamba-2 SSD: ``h_t = exp(dt_t·A) h_{t-1} + dt_t · B_t x_tᵀ``, ``y_t = h_tᵀ C_t + D·x_t``."""

from __future__ import annotations

import torch

from tilemix.tiles import GroupSeq, Head, Out, Seq, State, chunks, colsum, cumsum, exp, kernel, segsum

from ._library import check_backward, no_state, register_derived_autograd, tile_op
from ._segments import SegmentedScan
from .fastpath import fast_path
from .runtime import call_with_target, check_call
from .ssd_backward import register_ssd_autograd
from .ssd_states import segment_log_decay, ssd_states
from .varlen import check_cu_seqlens

__all__ = ["ssd", "ssd_fwd", "ssd_states"]


@kernel
def ssd_fwd(x: Seq["P"], dt: Seq[1], A: Head[1], B: GroupSeq["N"], C: GroupSeq["N"],
            y: Out[Seq["P"]], D: Head[1] = None, h: State["N", "P"] = None):
    for c in chunks(64):
        # row scalings sit on the smallest operand: (C·diag(a)) @ h = diag(a)(C @ h), and dt scales the
        # score columns rather than x, so x, B and C reach the tensor cores straight from shared memory
        dtc, xc = dt[c], x[c]
        log_decay = dtc * A  # per token, <= 0
        decay_from_start = exp(cumsum(log_decay))  # chunk start -> token t
        decay_to_end = exp(cumsum(log_decay, reverse=True, exclusive=True))  # token t -> chunk end
        scores = C[c] @ B[c].T * (exp(segsum(log_decay)) * dtc.T)
        yc = scores @ xc + (C[c] @ h) * decay_from_start
        y[c] = yc if D is None else yc + xc * D
        h = h * exp(colsum(log_decay)) + B[c].T @ (xc * (dtc * decay_to_end))


ssd_scan = SegmentedScan(ssd_fwd, ssd_states, "h", segment_log_decay)


def _forward_op(name: str):
    """The forward as the custom op ``tilemix::name`` (one per backward: their autograd differs)."""
    return tile_op(
        name,
        "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? initial_state, bool output_final_state,"
        " Tensor? cu_seqlens=None) -> (Tensor, Tensor)",
        ssd_fwd,
        lambda x, dt, A, B, C, D, initial_state, final, cu_seqlens=None: (
            dict(x=x, dt=dt, A=A, B=B, C=C, D=D, h=initial_state, cu_seqlens=cu_seqlens),
            {"h": "initial_state"}, ("h",) if final else ()),
        lambda out: (out["y"], out.get("h", no_state(out["y"]))),
        run=ssd_scan)


ssd_op = _forward_op("ssd")
register_ssd_autograd(ssd_op)  # backward programs: ops/ssd_backward.py
ssd_derived_op = _forward_op("ssd_derived")
register_derived_autograd(ssd_derived_op, ssd_fwd, ("x", "dt", "A", "B", "C", "D", "h", None, "cu_seqlens"),
                          ("y", "h"))


@fast_path
def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
        output_final_state: bool = False, *, cu_seqlens: torch.Tensor | None = None, target: str | None = None,
        backward: str = "hand-written"):
    """The Mamba-2 state-space dual (SSD) scan.

    x: ``[B, T, H, P]``; dt: ``[B, T, H]`` (positive step sizes); A: ``[H]``
    (negative); B, C: ``[B, T, G, N]`` with ``H % G == 0`` (head h reads group
    ``h // (H // G)``); D: ``[H]`` or None; initial_state: float32
    ``[B, H, N, P]`` or None. Returns ``(y [B, T, H, P], final_state or None)``.
    ``cu_seqlens``: int32 ``[N + 1]``, sequences packed into one row (B = 1; ``ops/varlen.py``),
    each with its own initial and final state (``[N, H, N, P]``, N the sequences).
    Differentiable in every tensor argument (and through the final state): the backward programs
    are in ``ops/ssd_backward.py`` and run on the forward's target.
    ``target``: "auto" (default: $TILEMIX_TARGET, else by the GPU), "hopper" or "generic" (the mma.sync
    kernels, also on an H100).
    ``backward``: "hand-written" (default: ``ops/ssd_backward.py``) or "derived" (the backward
    derived from ``ssd_fwd``, ``tilemix.tiles.autodiff``, on the interpreter or the GPU).
    """
    check_call("ssd", differentiable=True, target=target, flags=dict(output_final_state=output_final_state),
               x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x, "x")
    op = ssd_derived_op if check_backward(backward) == "derived" else ssd_op
    y, state = call_with_target(target, op, x, dt, A, B, C, D, initial_state, bool(output_final_state), cu_seqlens)
    return y, (state if output_final_state else None)
