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
sequential scan would leave SMs idle.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tilemix.codegen import launch
from tilemix.codegen.tune import tuned_segments
from tilemix.tiles import Kernel

from .runtime import call_signature, check_hopper_dims, device_arch, recall, remember, run_kernel

__all__ = ["SegmentedScan", "segment_count"]

CHUNK = 64  # the scans' chunk: a segment holds whole chunks
MIN_SEGMENT = 1024  # shorter segments spend more on states than they gain in parallelism
MIN_TUNED_SEGMENT = 256  # the shortest segments the tuner tries
MAX_SEGMENTS = 64
MIN_LENGTH = 16384  # below this the sequential scan won at every measured B·H (bench/NOTES.md)
TARGET_CTAS_PER_SM = 1.5


def segment_count(T: int, programs: int, sms: int, min_length: int = MIN_LENGTH) -> int:
    """How many segments a sequence of length ``T`` is cut into when the sequential scan runs
    ``programs`` CTAs on ``sms`` SMs; 1 means the sequential scan. Segments pay when fewer than
    half the SMs would have a CTA and the sequence is at least ``min_length`` long; then the
    fewest (a power of two) that give 1.5 CTAs per SM, no shorter than MIN_SEGMENT and dividing T
    into whole chunks: segments pay on an idle GPU and lose on a full one, where their second pass
    over the inputs costs more than the idle SMs (bench/NOTES.md, "Sequence segments").
    ``$TILEMIX_SEGMENTS`` forces a count (where T allows it)."""
    forced = os.environ.get("TILEMIX_SEGMENTS")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"TILEMIX_SEGMENTS must be a positive integer, got {forced!r}")
        return int(forced) if T % (CHUNK * int(forced)) == 0 else 1
    segments = 1
    if T < min_length or 2 * programs >= sms:
        return segments
    while (programs * segments < TARGET_CTAS_PER_SM * sms and T // (2 * segments) >= MIN_SEGMENT
           and T % (CHUNK * 2 * segments) == 0):
        segments *= 2
    return segments


@dataclass(frozen=True)
class SegmentedScan:
    """A scan program and what it takes to run it over segments in parallel.

    ``states`` takes the scan's inputs (those it declares) and returns the state named ``state``
    it reaches from zero; ``log_decay(args, segments)`` gives each segment's state decay as a
    ``[B, S, H]`` log (None: the state is a plain sum, as in linear attention). ``reverse``: the
    scan walks its chunks last to first (a state's gradient, as in the SSD backward), so the state
    enters each segment from the next one and the final state is the first segment's.
    ``min_length``: the shortest sequence ``segment_count`` cuts (a scan with much work per chunk
    gains from segments on shorter sequences than one with little)."""

    kernel: Kernel
    states: Kernel
    state: str
    log_decay: Callable[[dict[str, Any], int], torch.Tensor] | None = None
    reverse: bool = False
    min_length: int = MIN_LENGTH

    def __call__(self, args: dict[str, Any], labels: dict[str, str] | None = None,
                 final_states: tuple[str, ...] | None = None, segments: int | None = None) -> dict[str, torch.Tensor]:
        """``run_kernel(self.kernel, ...)``, in ``segments`` segments (default: ``segment_count`` on
        a GPU, 1 on the CPU)."""
        if segments is None:
            segments = self.default_segments(args, labels)
        if segments == 1:
            return run_kernel(self.kernel, args, labels, final_states)
        binding = self.kernel.bind(args, labels)
        B, T = binding.sizes["B"], binding.sizes["T"]
        if T % (CHUNK * segments):
            raise ValueError(f"{segments} segments need T to be a multiple of {CHUNK * segments}, got T={T}")
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

    def segment_choices(self, T: int) -> list[int]:
        """The segment counts the tuner tries: powers of two up to MAX_SEGMENTS that cut T into
        whole chunks, segments no shorter than MIN_TUNED_SEGMENT (1 included)."""
        return [s for s in (2 ** i for i in range(MAX_SEGMENTS.bit_length()))
                if T % (CHUNK * s) == 0 and (s == 1 or T // s >= MIN_TUNED_SEGMENT)]

    def default_segments(self, args: dict[str, Any], labels: dict[str, str] | None = None,
                         tuned: bool = True) -> int:
        """The segment count a call runs: 1 on the CPU, else a tuned count for the shape (``tilemix
        tune``) when ``tuned`` and one is cached, else ``segment_count``; remembered per call
        signature."""
        signature = call_signature(self.kernel, args, "segments", tuned, os.environ.get("TILEMIX_SEGMENTS"))
        if signature is None:  # CPU tensors
            return 1
        count = recall(signature)
        if count is None:
            count = self._choose_segments(args, labels, tuned)
            remember(signature, count)
        return count

    def _choose_segments(self, args: dict[str, Any], labels: dict[str, str] | None, tuned: bool) -> int:
        binding = self.kernel.bind(args, labels)
        if 0 in binding.sizes.values():
            return 1
        check_hopper_dims(binding, labels or {})  # a clear error before the schedule lowers anything
        device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device.index
        arch = device_arch(device)
        if tuned and not os.environ.get("TILEMIX_SEGMENTS"):
            count = tuned_segments(self, binding, device, arch)
            if count is not None and binding.sizes["T"] % (CHUNK * count) == 0:
                return count
        programs = binding.sizes["B"] * binding.sizes["H"] * launch.column_blocks(
            launch.launch_schedule(self.kernel, binding, device, arch).split, binding.static)
        return segment_count(binding.sizes["T"], programs, launch.sm_count(device), self.min_length)


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


