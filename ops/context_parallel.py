"""Context parallelism: sequence mixers over a sequence sharded along T across a process group.

Sharding convention. Scans (``linear_attention_cp``, ``ssd_cp``): rank r of ``group`` holds the r-th
contiguous slice of the sequence, ``x[:, start_r : start_r + T_r]``; slices may differ in length
(none needs to be a multiple of 64). Attention (``attention_cp``): every rank holds the same number
of tokens; with ``causal`` the sequence is cut into ``2·W`` equal chunks and rank r holds chunks r and
``2W-1-r`` side by side (zig-zag, so every rank has the same causal work: ``zigzag_shard``,
``zigzag_unshard``), without it any equal contiguous slices.

Scans pass states, as the single-GPU segmented scan (``ops/_segments.py``) does between segments:
every rank runs the op on its slice from a zero state (rank 0 from ``initial_state``) and keeps its
final state, the ranks all-gather those states and their slices' decays (``W`` states, never the
inputs), combine them in rank order (``_segments.combine``) into the state entering each slice and
the global final state, and add what the entering state contributes to the slice's outputs:
``scale · q S_in`` (linear attention), ``(C S_in) · exp(cumsum(dt·A))`` (SSD), so no second pass
over k and v (x, B). The backward is the mirror image through autograd: the all-gather's backward
sums the entering states' gradients into each rank's final-state gradient, which each rank's local
backward then takes like the single-GPU op's.

``output_final_state``: every rank returns the global final state (the last rank's, which every
rank computes from the gathered states); its gradients from all ranks are summed, so give it its
gradient on one rank. ``initial_state`` is read on rank 0 (the others may pass None) and its
gradient arrives there. Inputs every rank holds whole (SSD's A and D) get each rank's share of their
gradient: sum it over the ranks (as DistributedDataParallel does). Every rank must call the op and
backpropagate through its outputs (the exchange is a collective in both directions)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._segments import combine
from .cp_exchange import all_gather, rank_and_size
from .linear_attention import linear_attention
from .ring_attention import attention_cp, zigzag_shard, zigzag_unshard
from .runtime import default_scale
from .ssd import ssd

__all__ = ["linear_attention_cp", "ssd_cp", "attention_cp", "zigzag_shard", "zigzag_unshard"]


def _entering_states(final: torch.Tensor, log_decay: torch.Tensor | None, rank: int,
                     group) -> tuple[torch.Tensor, torch.Tensor]:
    """The state entering this rank's slice and the global final state, from this rank's final state
    reached from zero (``[B, H, ...]``) and its slice's log decay (``[B, H]``, None: no decay)."""
    states = all_gather(final, group).transpose(0, 1)  # [B, W, H, ...]
    decays = None if log_decay is None else all_gather(log_decay, group).transpose(0, 1)
    starts, last = combine(states, decays, None)
    return starts[:, rank], last


def linear_attention_cp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        initial_state: torch.Tensor | None = None, output_final_state: bool = False, *,
                        group: dist.ProcessGroup | None = None, target: str | None = None):
    """``linear_attention`` on a sequence sharded along T over ``group`` (None: the default group):
    q, k, v are this rank's contiguous slice ``[B, T_r, H, *]`` (see the module docstring). Returns
    this rank's ``o [B, T_r, H, V]`` and the global final state (or None). Differentiable."""
    rank, _ = rank_and_size(group)
    scale = default_scale(q, scale)
    o, final = linear_attention(q, k, v, scale, initial_state if rank == 0 else None, True, target=target)
    start, last = _entering_states(final, None, rank, group)
    # every rank adds its entering state (zeros on rank 0): each rank's outputs then depend on the
    # exchange, so every rank's backward reaches its all-reduce
    o = o + (torch.einsum("bthk,bhkv->bthv", q.to(start.dtype), start) * scale).to(o.dtype)
    return o, (last if output_final_state else None)


def ssd_cp(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
           output_final_state: bool = False, *, group: dist.ProcessGroup | None = None, target: str | None = None):
    """``ssd`` on a sequence sharded along T over ``group`` (None: the default group): x, dt, B, C are
    this rank's contiguous slice (``[B, T_r, ...]``, see the module docstring), A and D whole. Returns
    this rank's ``y [B, T_r, H, P]`` and the global final state (or None). Differentiable."""
    rank, _ = rank_and_size(group)
    y, final = ssd(x, dt, A, B, C, D, initial_state if rank == 0 else None, True, target=target)
    log_decay = dt.to(torch.float64).cumsum(1) * A.to(torch.float64)  # [B, T_r, H]: start of slice -> token t
    start, last = _entering_states(final, dt.to(torch.float64).sum(1) * A.to(torch.float64), rank, group)
    heads, groups = x.shape[2], C.shape[2]
    Ch = C.to(start.dtype).repeat_interleave(heads // groups, dim=2)  # [B, T_r, H, N]: head h reads group h // (H/G)
    entering = torch.einsum("bthn,bhnp->bthp", Ch, start) * log_decay.exp().to(start.dtype).unsqueeze(-1)
    return y + entering.to(y.dtype), (last if output_final_state else None)
