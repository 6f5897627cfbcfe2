"""Mamba-1's selective scan: ``h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t`` per channel and state
entry, ``y_t = h_t C_t + D u_t``, gated by ``silu(z_t)`` (mamba_ssm's ``selective_scan_fn``).

The decay ``exp(Δ A)`` is per (token, channel, state entry), so no chunk matmul factorises it: the
program runs ``linrec`` (an elementwise scan, no ``exp(cumsum)`` to overflow) once per state entry
over a ``64 x P`` tile of channels, with entry n's column of B and C picked (``Bc[:, n:n+1]``).
Channels are split into heads of ``P`` (64 where it divides the channels: the GPU kernels' panel
width); the state of a head is a ``[P, E]`` tile, entry ``n`` in column ``n`` (its layout in
``[B, Dm, N]``), small enough for registers where a ``[1, N·P]`` row is held whole by every thread.
The op scans ``ENTRY_GROUP`` entries a call and sums the calls' outputs. Its backward is derived
from the program (``tiles.autodiff``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tilemix.tiles import (
    Const,
    GroupSeq,
    Head,
    Out,
    Seq,
    State,
    chunks,
    exp,
    in_seq,
    iota,
    kernel,
    linrec,
    position,
    sigmoid,
    softplus,
    where,
)

from ._library import mixer
from .runtime import check_call

__all__ = ["selective_scan", "selective_scan_fwd"]

HEAD_WIDTH = 64  # channels per program instance where they divide the channels (the GPU's panel width)
STATE_COLUMNS = 16  # the GPU's state tiles hold the entries in a multiple of 16 columns
# state entries one program call scans: NVRTC's time grows steeply with the unrolled entries (sm_90a
# forward, 2-core machine: 14 s at 4, 26 s at 8, 246 s at 16), so N = 16 runs as two calls of one kernel
ENTRY_GROUP = 8


@kernel
def selective_scan_fwd(u: Seq["P"], delta: Seq["P"], A: Head["S"], B: GroupSeq["N"], C: GroupSeq["N"],
                       y: Out[Seq["P"]], D: Head["P"] = None, z: Seq["P"] = None, delta_bias: Head["P"] = None,
                       delta_softplus: Const = False, h: State["P", "E"] = None):
    """A: the head's ``[N·P]`` decay rates, entry n's in columns ``n·P ...``; B, C: ``N`` or more
    columns (the GPU pads them to its panel), of which the first ``S / P`` are read; h: the head's
    ``[P, E]`` state, entry n in column n (``E >= S / P``: the GPU pads it to 16 columns)."""
    width, entries = u.cols, A.shape[1] // u.cols
    entry = iota(1, h.shape[1], axis=1)
    for c in chunks(64):
        uc, dc, Bc, Cc = u[c], delta[c], B[c], C[c]
        if delta_bias is not None:
            dc = dc + delta_bias
        if delta_softplus:
            dc = softplus(dc)
        if delta_bias is not None or delta_softplus:  # no step past the sequence's end: the state holds
            dc = dc * in_seq(position(c).T * 0.0 + 1.0).T
        yc = None if D is None else uc * D
        for n in range(entries):  # Δ B u formed per entry, read from the chunk's u: no Δ u tile held
            hs = linrec(exp(dc * A[:, n * width:(n + 1) * width]), dc * Bc[:, n:n + 1] * uc, h[:, n:n + 1].T)
            h = where(entry == float(n), hs[-1:].T, h)
            term = hs * Cc[:, n:n + 1]
            yc = term if yc is None else yc + term
        y[c] = yc if z is None else yc * (z[c] * sigmoid(z[c]))


selective_scan_mixer = mixer(selective_scan_fwd, "tilemix::selective_scan", final_states=("h",))


def _head_width(channels: int, groups: int) -> int:
    """Channels per head: 64 where it divides each group's channels, else a group's channels (a
    multiple of 16: the program slices the state row in blocks of the head width)."""
    per_group = channels // groups
    return HEAD_WIDTH if per_group % HEAD_WIDTH == 0 else per_group


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, output_final_state) -> None:
    check_call("selective_scan", differentiable=True,
               flags=dict(delta_softplus=delta_softplus, output_final_state=output_final_state),
               u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    if u.dim() != 3:
        raise ValueError(f"u: expected [B, T, Dm], got shape {tuple(u.shape)}")
    batch, length, channels = u.shape
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{name}: expected the shape of u {tuple(u.shape)}, got {tuple(t.shape)}")
    if A.dim() != 2 or A.shape[0] != channels or A.shape[1] == 0:
        raise ValueError(f"A: expected [Dm, N] with Dm = {channels}, got shape {tuple(A.shape)}")
    state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            t = t.unsqueeze(2)
        if t.dim() != 4 or t.shape[:2] != (batch, length) or t.shape[3] != state or t.shape[2] == 0 \
                or channels % t.shape[2]:
            raise ValueError(f"{name}: expected [B, T, N] = {[batch, length, state]} or [B, T, G, N] with G "
                             f"dividing Dm = {channels}, got shape {tuple(t.shape)}")
    if B.dim() != C.dim() or (B.dim() == 4 and B.shape[2] != C.shape[2]):
        raise ValueError(f"C: expected the groups of B {tuple(B.shape)}, got shape {tuple(C.shape)}")
    groups = B.shape[2] if B.dim() == 4 else 1
    if (channels // groups) % 16:
        raise ValueError(f"u: its Dm = {channels} channels make groups of {channels // groups} (G = {groups}); "
                         "selective_scan takes groups of a multiple of 16 channels")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{name}: expected [Dm] = [{channels}], got shape {tuple(t.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, channels, state):
        raise ValueError(f"initial_state: expected [B, Dm, N] = {[batch, channels, state]}, "
                         f"got {list(initial_state.shape)}")


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   initial_state: torch.Tensor | None = None, output_final_state: bool = False):
    """Mamba-1's selective scan (mamba_ssm's ``selective_scan_fn``, sequence-major):
    ``Δ = softplus(delta + delta_bias)`` (each part optional), ``h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t``,
    ``y_t = h_t C_t + D ⊙ u_t``, times ``silu(z_t)`` when z is given.

    u, delta, z: ``[B, T, Dm]``; A: ``[Dm, N]`` (negative); B, C: ``[B, T, N]`` or ``[B, T, G, N]``
    (channel d reads group ``d // (Dm // G)``); D, delta_bias: ``[Dm]``; initial_state: float32
    ``[B, Dm, N]`` or None (zeros). Returns ``(y [B, T, Dm], final_state or None)``. Differentiable
    in every tensor argument (the derived backward). The GPU kernels take Dm / G a multiple of 64."""
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, output_final_state)
    batch, length, channels = u.shape
    state = A.shape[1]
    B, C = (t.unsqueeze(2) if t.dim() == 3 else t for t in (B, C))
    width = _head_width(channels, B.shape[2])
    heads = channels // width

    def per_head(t):
        return None if t is None else t.unflatten(-1, (heads, width))

    rates = A.unflatten(0, (heads, width)).transpose(1, 2)  # [H, N, P]
    h0 = initial_state if initial_state is not None else u.new_zeros(batch, channels, state, dtype=torch.float32)
    h0 = h0.unflatten(1, (heads, width))  # [B, H, P, N]
    ys, hs = [], []
    for first in range(0, state, ENTRY_GROUP):  # y is linear in the entries' terms, D u and the gate included
        entries = slice(first, first + ENTRY_GROUP)
        y, h = selective_scan_mixer(u=per_head(u), delta=per_head(delta), A=rates[:, entries].flatten(1),
                                    B=_panels(B[..., entries], u.is_cuda, HEAD_WIDTH),
                                    C=_panels(C[..., entries], u.is_cuda, HEAD_WIDTH),
                                    D=per_head(D) if first == 0 else None, z=per_head(z),
                                    delta_bias=per_head(delta_bias), delta_softplus=bool(delta_softplus),
                                    h=_panels(h0[..., entries], u.is_cuda, STATE_COLUMNS))
        ys.append(y)
        hs.append(h[..., :h0[..., entries].shape[-1]])
    # the groups' partial outputs summed at float32 or better (a bf16 partial is rounded once)
    y = ys[0] if len(ys) == 1 else sum(p.to(torch.promote_types(p.dtype, torch.float32)) for p in ys).to(u.dtype)
    y = y.flatten(2)
    if not output_final_state:
        return y, None
    return y, torch.cat(hs, -1).flatten(1, 2)


def _panels(t: torch.Tensor, cuda: bool, columns: int) -> torch.Tensor:
    """``t``, on a GPU zero-padded to a multiple of ``columns`` columns (B and C load in 64-column panels,
    the state's register tiles hold 16): entries past the group's are zero and stay zero."""
    if not cuda or t.shape[-1] % columns == 0:
        return t
    return F.pad(t, (0, columns - t.shape[-1] % columns))
