"""Mamba-2 SSD backward: two tile programs and a few per-chunk sums in torch.

Per (batch, head), with log decays ``a_t = dt_t·A``, ``u_t = dt_t x_t``, states ``h_t = e^{a_t}
h_{t-1} + B_t u_tᵀ`` (N x P) and ``y_t = h_tᵀ C_t + D x_t``. Given ``dy`` and the final state's
gradient ``dh_T``, the state gradient is ``g_t = C_t dy_tᵀ + e^{a_{t+1}} g_{t+1}`` (``g_T = C_T
dy_Tᵀ + dh_T``), and

- ``dC_t = h_t dy_t``: forward in time, the states recomputed chunk by chunk (``ssd_bwd_dc``):
  ``dC = ((dy uᵀ) ∘ L) B + (dy ∘ e^{cumsum a}) h_inᵀ`` per chunk, ``L = e^{segsum a}``;
- ``du_t = g_tᵀ B_t``, ``dB_t = g_t u_t``: over the chunks last to first (``ssd_bwd_dx``,
  ``chunks(reverse=True)``), which carries ``G`` = the gradient of the state a chunk leaves (``dh_T``
  first, d(initial state) last): ``du = ((C Bᵀ) ∘ L)ᵀ dy + (B ∘ e^{A_end - A_t}) G``, ``dB = ((dy uᵀ)
  ∘ L)ᵀ C + (u ∘ e^{A_end - A_t}) Gᵀ``, ``G ← e^{A_end} G + (C ∘ e^{A_t})ᵀ dy`` (``A_t``: cumulative
  log decay from the chunk's start; ``L[t', t] = e^{A_t' - A_t}`` for t' >= t, the forward's decay
  matrix, transposed where the later token is the column). A partial last chunk, visited first,
  reads zeros: tokens that change nothing;
- ``dx_t = dt_t du_t + D dy_t``; dt's direct part ``x_t·du_t``; ``dD = Σ x·dy`` (``x_t·dy_t`` per token
  from ``ssd_bwd_dx``, summed in torch);
- the decays: ``∂L/∂a_k = e^{a_k} <g_k, h_{k-1}>``, split per chunk into the pairs (s < k <= t)
  inside the chunk (i), the state entering the chunk with the chunk's later outputs (ii), the chunk's
  earlier inputs with the gradient leaving it (iii), and ``X_c = e^{A_end} <G_c, h_in_c>`` (iv),
  the same for every token of chunk c. (i, ii) come from the forward program and (iii) from the
  backward one, as sums of products (no cancellation). (iv) pairs the two programs' states: with
  ``alpha_c = <(C ∘ e^{A_t})ᵀ dy, h_in_c>`` (forward program) and ``beta_c = <G_c, (B ∘
  e^{A_end - A_s})ᵀ u>`` (backward one), both states' recurrences give ``X_c = X_{c+1} +
  alpha_{c+1} - beta_c`` and ``X_last = <dh_T, h_T> - beta_last``. Each program computes the
  other's update term with the same operand rounding as the other adds to its state, so the sum
  telescopes exactly for the states the programs carry (the plain telescoped sum over tokens, ``Σ_{t
  >= k} (dy_t·y_t - u_t·du_t)``, measured 0.3-18 relative error on dA in bf16 at T = 256-4096 with
  strong decay; this: 3e-4-1.1e-3). Then ``ddt = x·du + A·∂L/∂a``, ``dA = Σ_t dt_t ∂L/∂a_t``.

Group heads (G < H): the programs write dB and dC per head, ``[B, T, H, N]``, and torch sums the heads
of each group (one read of H/G times the group tensors: cheap next to the programs).

Column blocks: the code generator's column split cannot cut these programs (du contracts N, dB
contracts P and the decay terms reduce both), but every output is either per column of P (dx, the
states) or a sum over P (dB, dC, x·du, the decay terms, alpha, beta), so both programs run on
64-wide blocks of P (the ``HeadSplit`` declared below) and torch adds the partial sums: each block
is a head of its own (``[B, T, H, P]`` viewed as ``[B, T, H·P/64, 64]``; head h's block j in h's
group), one launch per program, and each program instance holds an N x 64 state, like the
forward's column split.

Long sequences with few heads: both programs run in sequence segments (``ops/_segments.py``), the
forward-in-time one from the forward's segment states, the last-to-first one from state gradients
combined over the later segments (``SegmentedScan(reverse=True)``)."""

from __future__ import annotations

import torch

from tilemix.codegen.schedule import HeadSplit, declare, head_split_width
from tilemix.tiles import (
    GroupSeq,
    Head,
    Out,
    Seq,
    State,
    causal,
    chunks,
    colsum,
    cumsum,
    exp,
    kernel,
    rowsum,
    segsum,
    zeros,
)

from ._library import tile_op
from ._segments import SegmentedScan
from .runtime import current_target, use_target
from .ssd_states import segment_log_decay, ssd_bwd_dx_states, ssd_states
from .varlen import sequence_index

__all__ = ["ssd_bwd_dc", "ssd_bwd_dx", "ssd_bwd_dc_scan", "ssd_bwd_dx_scan", "register_ssd_autograd"]


@kernel
def ssd_bwd_dc(x: Seq["P"], dt: Seq[1], A: Head[1], B: GroupSeq["N"], C: GroupSeq["N"], dy: Seq["P"],
               dC: Out[Seq["N"]], da: Out[Seq[1]], alpha: Out[Seq[1]], h: State["N", "P"] = None):
    """Forward in time, h recomputed as the forward does: ``dC_t = h_t dy_t`` per head; ``da``: the
    decays' gradient from the pairs within the chunk and from the state entering it (terms i, ii
    of the module docstring); ``alpha``: ``<Q, h_in>`` of each chunk (on all its tokens)."""
    for c in chunks(64):
        # Ordered so that at most one 64x128 fp32 tile sits beside the state (sm_90a: no spills at
        # N = 128, P = 64): alpha's Q and the pair tile m die before dC's accumulator is made. x, B, C
        # and dy reach the tensor cores as loaded; only alpha's operand is scaled (dy ∘ e^{A_t}, as
        # ssd_bwd_dx rounds it in its state-gradient update, so alpha pairs exactly with beta).
        dtc, xc, bc, cc, dyc = dt[c], x[c], B[c], C[c], dy[c]
        log_decay = dtc * A
        decay_from_start = exp(cumsum(log_decay))
        decay_to_end = exp(cumsum(log_decay, reverse=True, exclusive=True))
        dy_scaled = dyc * decay_from_start
        alpha[c] = zeros(64, 1) + colsum(rowsum(h * (cc.T @ dy_scaled)))
        # term ii, <C_t, e^{A_t} h_in dy_t> = <dy_t e^{A_t}, (C h_in)_t>: a 64 x P product, not C
        # against the 64 x N inter-chunk part of dC
        da_inter = cumsum(rowsum(dy_scaled * (cc @ h)), reverse=True)
        m = dyc @ xc.T * (exp(segsum(log_decay)) * dtc.T)  # [t, s]: dy_t·u_s e^{A_t - A_s}
        dC[c] = m @ bc + (dyc @ h.T) * decay_from_start
        w = cumsum(m * (cc @ bc.T), reverse=True)  # [k, s]: the pairs' terms summed over t >= k
        da[c] = rowsum(w - causal(w, transposed=True)) + da_inter
        h = h * exp(colsum(log_decay)) + bc.T @ (xc * (dtc * decay_to_end))


@kernel
def ssd_bwd_dx(x: Seq["P"], dt: Seq[1], A: Head[1], B: GroupSeq["N"], C: GroupSeq["N"], dy: Seq["P"],
               dx: Out[Seq["P"]], dB: Out[Seq["N"]], ddt: Out[Seq[1]], da: Out[Seq[1]], beta: Out[Seq[1]],
               xdy: Out[Seq[1]], D: Head[1] = None, g: State["N", "P"] = None):
    """Chunks last to first, carrying ``g``, the gradient of the state a chunk leaves (``dh_T``
    first, d(initial state) last; see the module docstring): dx, dB per head, dt's direct part
    ``x·du``, the decays' gradient from the state leaving each chunk (term iii), ``beta = <G_out,
    L>`` per chunk, ``xdy = x_t·dy_t`` (D's gradient, summed in torch)."""
    for c in chunks(64, reverse=True):
        dtc, xc, bc, cc, dyc = dt[c], x[c], B[c], C[c], dy[c]
        log_decay = dtc * A
        to_end = exp(cumsum(log_decay, reverse=True, exclusive=True))  # token -> chunk end
        # the forward program's state update, rounded as it rounds it (and alpha: this one's)
        beta[c] = zeros(64, 1) + colsum(rowsum(g * (bc.T @ (xc * (dtc * to_end)))))
        decay = exp(segsum(log_decay))  # [t', t]: e^{A_t' - A_t}, t' at or after t
        dB[c] = (dyc @ xc.T * (decay * dtc.T)).T @ cc + (xc @ g.T) * (dtc * to_end)
        inter = (bc @ g) * to_end
        da[c] = cumsum(rowsum(xc * inter) * dtc, exclusive=True)
        # du: dy_t' (C_t'·B_t) e^{A_t' - A_t} over t' >= t (written again, but CSE makes it ``decay`` above:
        # one 64x64 tile live across dB; bench/NOTES.md, "SSD backward")
        dxdt = (cc @ bc.T * exp(segsum(log_decay))).T @ dyc + inter
        ddt[c] = rowsum(xc * dxdt)
        xdy[c] = rowsum(xc * dyc)
        dx[c] = dxdt * dtc if D is None else dxdt * dtc + dyc * D
        from_start = exp(cumsum(log_decay))  # chunk start -> token
        g = g * exp(colsum(log_decay)) + cc.T @ (dyc * from_start)


# on column blocks of P (their partial sums over P added in torch; on a GPU the state then fits the
# registers, as the forward's column split); $TILEMIX_SSD_BWD_SPLIT sets the width, 0 for none
declare(ssd_bwd_dc, ssd_bwd_dx, head_split=HeadSplit("P", env="TILEMIX_SSD_BWD_SPLIT"))

# each in sequence segments where the heads leave the GPU idle (long sequences, few heads), as the forward,
# but from T = 8192: these programs do about four times the forward's work per chunk, so segments pay
# at lengths where the forward's scans gain nothing (bench/NOTES.md, "Sequence segments")
SEGMENTS_FROM = 8192
ssd_bwd_dc_scan = SegmentedScan(ssd_bwd_dc, ssd_states, "h", segment_log_decay, min_length=SEGMENTS_FROM)
ssd_bwd_dx_scan = SegmentedScan(ssd_bwd_dx, ssd_bwd_dx_states, "g", segment_log_decay, reverse=True,
                                min_length=SEGMENTS_FROM)

# the backward programs as custom ops, so a compiled training step sees ops, not Python
ssd_bwd_dc_op = tile_op(
    "ssd_bwd_dc", "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor dy, Tensor? initial_state,"
    " Tensor? cu_seqlens=None) -> (Tensor, Tensor, Tensor, Tensor)",
    ssd_bwd_dc,
    lambda x, dt, A, B, C, dy, initial_state, cu_seqlens=None: (
        dict(x=x, dt=dt, A=A, B=B, C=C, dy=dy, h=initial_state, cu_seqlens=cu_seqlens), {"h": "initial_state"},
        ("h",)),
    lambda out: (out["dC"], out["da"], out["alpha"], out["h"]),
    run=ssd_bwd_dc_scan)
ssd_bwd_dx_op = tile_op(
    "ssd_bwd_dx",
    "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor dy, Tensor? D, Tensor? final_grad,"
    " Tensor? cu_seqlens=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    ssd_bwd_dx,
    lambda x, dt, A, B, C, dy, D, final_grad, cu_seqlens=None: (
        dict(x=x, dt=dt, A=A, B=B, C=C, dy=dy, D=D, g=final_grad, cu_seqlens=cu_seqlens), {"g": "final_grad"},
        ("g",)),
    lambda out: (out["dx"], out["dB"], out["ddt"], out["da"], out["beta"], out["xdy"], out["g"]),
    run=ssd_bwd_dx_scan)


def _group_sum(per_head: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, T, H, N]`` per-head gradients summed over each group's heads, ``[B, T, G, N]`` in
    ``per_head``'s dtype: one pass, accumulated in float32 (torch's sums of 16-bit tensors; float64
    for float64) and rounded once."""
    b, t, h, n = per_head.shape
    return per_head if h == groups else per_head.view(b, t, groups, h // groups, n).sum(3)


def _repeat_each(t: torch.Tensor, times: int, dim: int) -> torch.Tensor:
    """``t.repeat_interleave(times, dim)`` as one copy of an expanded view: torch's repeat_interleave
    launches a few kernels more, which showed as host time per call under torch.profiler."""
    dim %= t.dim()
    return t.unsqueeze(dim + 1).expand(*t.shape[:dim + 1], times, *t.shape[dim + 1:]).flatten(dim, dim + 1)


def _setup(ctx, inputs, output):
    x, dt, A, B, C, D, initial_state, _, cu_seqlens = inputs
    ctx.target = current_target()  # the backward programs run on the forward's target
    ctx.save_for_backward(x, dt, A, B, C, D, initial_state, cu_seqlens)


CHUNK = 64  # the programs' chunk: the per-chunk terms alpha and beta are read once per chunk


def _backward(ctx, dy, dstate):
    x, dt, A, B, C, D, initial_state, cu_seqlens = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy = dy.contiguous()
    final_grad = dstate if dstate is not None and dstate.numel() else None
    Bsz, T, H = x.shape[:3]
    groups = B.shape[2]
    if T == 0 or Bsz == 0 or H == 0:  # nothing to differentiate through (T = 0: the final state is the initial one)
        zeros = [torch.zeros_like(t) if t is not None else None for t in (x, dt, A, B, C, D)]
        dinit = None
        if initial_state is not None:
            dinit = final_grad.clone() if final_grad is not None and T == 0 else torch.zeros_like(initial_state)
        return (*zeros, dinit, None, None)
    P, N = x.shape[3], B.shape[3]
    width = head_split_width(ssd_bwd_dx, {"P": P}, x.device.type == "cuda")
    blocks = P // width  # P's column blocks run as heads of their own: head h's block j is head h·blocks + j
    heads = H * blocks

    def as_heads(t):  # [B, T, H, P] -> [B, T, H·blocks, width]: a view where t allows
        return t.reshape(Bsz, T, heads, width)

    def per_block(t):  # a per-head [.., H] tensor repeated for each block
        return t if t is None or blocks == 1 else _repeat_each(t, blocks, -1)

    def state_as_heads(t):  # [B, H, N, P] -> [B, H·blocks, N, width] (B: the sequences of a packed batch)
        if t is None or blocks == 1:
            return t
        return t.unflatten(-1, (blocks, width)).movedim(-2, 2).reshape(t.shape[0], heads, N, width)

    def sum_blocks(t):  # [.., H·blocks] -> [.., H], in float64
        return t.unflatten(-1, (H, blocks)).sum(-1, dtype=torch.float64)

    xs, dys, final_heads = as_heads(x), as_heads(dy), state_as_heads(final_grad)
    dts, As, Ds = per_block(dt), per_block(A), per_block(D)
    with use_target(ctx.target):  # group heads: G divides H·blocks, and head h·blocks + j is in h's group
        dC_h, da_in, alpha, h_last = ssd_bwd_dc_op(xs, dts, As, B, C, dys, state_as_heads(initial_state), cu_seqlens)
        dx, dB_h, ddt_direct, da_out, beta, xdy, dinit = ssd_bwd_dx_op(xs, dts, As, B, C, dys, Ds, final_heads,
                                                                       cu_seqlens)
    dx = dx.reshape(x.shape)
    dB, dC = (_group_sum(t, groups).to(B.dtype) for t in (dB_h, dC_h))
    # term iv per chunk c: e^{A_c} <G_c, h_c> = <dh_T, h_T> + Σ_{c' > c} alpha_c' - Σ_{c' >= c} beta_c'
    last = None if final_grad is None else sum_blocks((final_heads.double() * h_last.double()).sum((-2, -1)))
    if cu_seqlens is None:
        alpha, beta = sum_blocks(alpha[:, ::CHUNK]), sum_blocks(beta[:, ::CHUNK])  # [B, chunks, H]
        prefix = (alpha - beta).cumsum(1)
        tail = prefix[:, -1:] - prefix - beta
        if last is not None:
            tail = tail + last[:, None]
        tail = _repeat_each(tail, CHUNK, 1)[:, :T]
    else:
        tail = _packed_tail(sum_blocks(alpha), sum_blocks(beta), last, cu_seqlens)
    da = sum_blocks(da_in) + sum_blocks(da_out) + tail
    ddt = torch.addcmul(sum_blocks(ddt_direct), da, A.double()).to(dt.dtype)
    dA = (dt * da).sum((0, 1)).to(A.dtype)  # da is float64: so is the product
    dD = None
    if D is not None and need[5]:
        dD = xdy.sum((0, 1), dtype=torch.float64).view(H, blocks).sum(-1).to(D.dtype)
    if dinit is not None and blocks > 1:  # [B, H·blocks, N, width] -> [B, H, N, P]
        rows = dinit.shape[0]  # the batch, or the sequences of a packed one
        dinit = dinit.reshape(rows, H, blocks, N, width).movedim(2, -2).reshape(rows, H, N, P)
    dinit = dinit.to(initial_state.dtype) if initial_state is not None and need[6] else None
    return (dx, ddt, dA, dB, dC, dD, dinit, None, None)


def _packed_tail(alpha: torch.Tensor, beta: torch.Tensor, last: torch.Tensor | None,
                 cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Term iv on every token of a packed batch (``[1, T, H]``; ``alpha``, ``beta``: ``[1, T, H]``,
    each chunk's value on its tokens; ``last``: ``<dh_T, h_T>`` per sequence, ``[N, H]``, or None):
    the sums over a sequence's later chunks, its chunks counted from its first token."""
    T = alpha.shape[1]
    sequence = sequence_index(cu_seqlens, T)
    first, end = cu_seqlens[sequence].long(), cu_seqlens[sequence + 1].long()
    token = torch.arange(T, device=alpha.device)
    start = first + (token - first) // CHUNK * CHUNK  # each token's chunk's first token
    at_start = ((token - first) % CHUNK == 0)[None, :, None]

    def later(per_chunk):  # Σ over the chunks from the token's own to its sequence's last
        suffix = torch.nn.functional.pad(per_chunk.where(at_start, 0).flip(1).cumsum(1).flip(1), (0, 0, 0, 1))
        return suffix[:, start] - suffix[:, end]

    tail = later(alpha) - alpha - later(beta)
    return tail if last is None else tail + last[sequence][None]


def register_ssd_autograd(op) -> None:
    """Make ``tilemix::ssd`` differentiable with the programs above."""
    op.register_autograd(_backward, setup_context=_setup)
