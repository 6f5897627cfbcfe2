"""Sequence-parallel state passing for chunked scans (linear attention, SSD) with few sequences.

A scan program runs one CTA per (batch, head, column block) and walks the sequence chunk by
chunk, so long sequences with few batch x heads leave most of the GPU idle (bench/NOTES.md,
"Sequence segments").
Because the carried state is linear in the inputs, ``s_end = decay · s_start + local``, the
sequence can be cut into S segments that run in parallel, in two passes of tile programs:

1. ``states`` program on every segment from a zero state: the segment's ``local`` contribution;
2. a combine over the S segments in torch (a few small ops on [B, S, H, ...] float32 states: a
   cumsum for linear attention; for SSD one matmul whose weights, decays between segments, are
   formed in float64) gives every segment's starting state and the final state;
3. the scan program itself on every segment from its starting state: the outputs.

Segments are views: ``[B, T, ...]`` is reshaped to ``[B·S, T/S, ...]``, so T must be a
multiple of ``64·S``; otherwise the scan runs sequentially. Pass 1 reads k and v (x, dt, B)
once more, and the states make three extra trips through HBM, so segments pay only where the
sequential scan would leave SMs idle: how many a call runs is ``codegen/schedule.py``'s choice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tilemix.codegen.env import read
from tilemix.codegen.schedule import MIN_LENGTH, SCAN_CHUNK, scan_segments
from tilemix.codegen.tune import tuned_segments
from tilemix.tiles import Kernel

from .runtime import call_signature, check_hopper_dims, device_arch, recall, remember, run_kernel
from .varlen import run_varlen

__all__ = ["SegmentedScan"]

@dataclass(frozen=True)
class SegmentedScan:
    """A scan program and what it takes to run it over segments in parallel.

    ``states`` takes the scan's inputs (those it declares) and returns the state named ``state``
    it reaches from zero; ``log_decay(args, segments)`` gives each segment's state decay as a
    ``[B, S, H]`` log (None: the state is a plain sum, as in linear attention). ``reverse``: the
    scan walks its chunks last to first (a state's gradient, as in the SSD backward), so the state
    enters each segment from the next one and the final state is the first segment's.
    ``min_length``: the shortest sequence ``schedule.segment_count`` cuts (a scan with much work per chunk
    gains from segments on shorter sequences than one with little)."""

    kernel: Kernel
    states: Kernel
    state: str
    log_decay: Callable[[dict[str, Any], int], torch.Tensor] | None = None
    reverse: bool = False
    min_length: int = MIN_LENGTH

    def __call__(self, args: dict[str, Any], labels: dict[str, str] | None = None,
                 final_states: tuple[str, ...] | None = None, segments: int | None = None,
                 cu_seqlens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``run_kernel(self.kernel, ...)``, in ``segments`` segments (default: ``default_segments``);
        with ``cu_seqlens``, on the packed sequences it delimits (``run_varlen``: each sequence is
        a program instance, no segments)."""
        if cu_seqlens is not None:
            return run_varlen(self.kernel, args, labels, final_states, cu_seqlens)
        signature = call_signature(self.kernel, args, final_states, None, ())  # run_kernel's, computed once
        if segments is None:
            segments = self.default_segments(args, labels, signature=signature)
        if segments == 1:
            return run_kernel(self.kernel, args, labels, final_states, signature=signature)
        binding = self.kernel.bind(args, labels)
        B, T = binding.sizes["B"], binding.sizes["T"]
        if T % (SCAN_CHUNK * segments):
            raise ValueError(f"{segments} segments need T to be a multiple of {SCAN_CHUNK * segments}, got T={T}")
        split = {p.name: _split(args[p.name], segments) for p in binding.params
                 if p.present and p.spec.kind in ("seq", "group_seq") and not p.spec.output}
        inputs = {name: split.get(name, value) for name, value in args.items()
                  if name in self.states.specs and name != self.state}  # from a zero state
        local = run_kernel(self.states, inputs, labels, final_states=(self.state,))[self.state]
        local = local.view(B, segments, *local.shape[1:])
        log_decay = None if self.log_decay is None else self.log_decay(args, segments)
        if self.reverse:  # segments in the order the scan meets them
            local, log_decay = local.flip(1), (None if log_decay is None else log_decay.flip(1))
        starts, final = combine(local, log_decay, args.get(self.state))
        if self.reverse:
            starts = starts.flip(1)
        outputs = run_kernel(self.kernel, {**args, **split, self.state: starts.flatten(0, 1)}, labels,
                             final_states=())
        result = {name: t.view(B, T, *t.shape[2:]) for name, t in outputs.items()}
        if final_states is None or self.state in final_states:
            result[self.state] = final
        return result

    def default_segments(self, args: dict[str, Any], labels: dict[str, str] | None = None,
                         tuned: bool = True, signature: tuple | None = None) -> int:
        """The segment count a call runs: 1 on the CPU, else a tuned count for the shape (``tilemix
        tune``) when ``tuned`` and one is cached, else ``schedule.scan_segments``; the tuned choice
        remembered per call ``signature`` (``call_signature``: computed when None)."""
        signature = signature or call_signature(self.kernel, args)
        if signature is None:  # CPU tensors
            return 1
        if not tuned:  # the tuner's baseline: not remembered
            return self._choose_segments(args, labels, tuned)
        count = recall(signature, "segments")
        if count is None:
            count = self._choose_segments(args, labels, tuned)
            remember(signature, count, "segments")
        return count

    def _choose_segments(self, args: dict[str, Any], labels: dict[str, str] | None, tuned: bool) -> int:
        binding = self.kernel.bind(args, labels)
        if 0 in binding.sizes.values():
            return 1
        check_hopper_dims(binding, labels or {})  # a clear error before the schedule lowers anything
        device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device.index
        arch = device_arch(device)
        if tuned and not read("TILEMIX_SEGMENTS"):
            count = tuned_segments(self, binding, device, arch)
            if count is not None and binding.sizes["T"] % (SCAN_CHUNK * count) == 0:
                return count
        return scan_segments(self.kernel, binding, device, arch, self.min_length)


def _split(t: torch.Tensor, segments: int) -> torch.Tensor:
    """``[B, T, ...]`` as ``[B·S, T/S, ...]`` (a view of a contiguous tensor)."""
    B, T = t.shape[:2]
    return t.reshape(B * segments, T // segments, *t.shape[2:])


def combine(local: torch.Tensor, log_decay: torch.Tensor | None,
            initial: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every segment's starting state and the final state from the segments' ``local [B, S, H, ...]``
    contributions, their ``log_decay [B, S, H]`` (None: no decay) and the ``initial [B, H, ...]``
    state (None: zeros): ``start_i = Σ_{j<i} exp(g_{j+1} + … + g_{i-1}) local_j + exp(g_0 + … + g_{i-1}) initial``."""
    if log_decay is None:
        inclusive = torch.cumsum(local, dim=1)
        starts = inclusive - local
        final = inclusive[:, -1]
        if initial is not None:
            starts = starts + initial.unsqueeze(1)
            final = final + initial
        return starts, final
    # one matmul gives the S starts and, as row S, the final state: start_i = Σ_{j<i} w_ij local_j
    # with w_ij = exp(E_i - I_j), I the inclusive and E the exclusive cumulative log decay
    B, S, H = local.shape[:3]
    g = log_decay.to(torch.float64).transpose(1, 2)  # [B, H, S]
    inclusive = torch.cumsum(g, dim=2)
    exclusive = torch.nn.functional.pad(inclusive, (1, 0))  # [B, H, S + 1]: E_0 = 0, ..., E_S = total
    exponent = exclusive.unsqueeze(3) - inclusive.unsqueeze(2)  # [B, H, S + 1 (i), S (j)]
    below = _strictly_below(S + 1, local.device)[:, :S]
    weights = torch.where(below, exponent, float("-inf")).exp().to(local.dtype)
    rows = torch.matmul(weights, local.flatten(3).transpose(1, 2))  # [B, H, S + 1, X]
    if initial is not None:
        rows = rows + exclusive.exp().to(local.dtype).unsqueeze(3) * initial.flatten(2).unsqueeze(2)
    starts = rows[:, :, :S].transpose(1, 2).reshape(local.shape)
    final = rows[:, :, S].reshape(B, H, *local.shape[3:]).contiguous()
    return starts, final


@functools.cache
def _strictly_below(n: int, device: torch.device) -> torch.Tensor:
    """The ``n x n`` mask of j < i (built once: ``tril`` of a bool tensor is slow on the host)."""
    index = torch.arange(n, device=device)
    return index[:, None] > index[None, :]


