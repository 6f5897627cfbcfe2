"""GPU timing: what the tuner and ``tilemix bench`` measure a call with (CUDA events, L2 flushed,
host time kept out of the measurement)."""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable

import torch

__all__ = ["HOST_WINDOW_MS", "time_ms", "host_us", "kernel_ms", "spin_cycles_per_ms"]

L2_FLUSH_BYTES = 1 << 30  # 20x the H100's 50 MB L2
HOST_WINDOW_MS = 2.0  # GPU spin before each timed call: host work shorter than this is not timed


@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")


@functools.cache
def spin_cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep`` (calibrated once per process)."""
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / start.elapsed_time(end)


def time_ms(fn: Callable[[], object], warmup: int = 10, reps: int = 30) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event timed calls: GPU time. Before each call
    a 1 GiB write evicts L2 (no call finds its inputs cached by the previous one), then the GPU spins
    HOST_WINDOW_MS while the host enqueues the call, so host time shorter than that is not counted
    (``host_us`` reports it: the GPU time is what a model whose GPU runs behind the host sees; without
    the spin, the host time of segmented scans leaked into their timings)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    flush = _l2_flush_buffer()
    spin = int(HOST_WINDOW_MS * spin_cycles_per_ms())
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        torch.cuda._sleep(spin)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def host_us(fn: Callable[[], object], calls: int = 50) -> float:
    """Microseconds of host time per call: back-to-back calls, the GPU running behind."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def kernel_ms(fn: Callable[[], object], calls: int = 5) -> list[tuple[str, float]]:
    """Each GPU kernel ``fn`` launches with its milliseconds per call (its launches in one call
    summed), longest first: where a call's time goes. ``torch.profiler`` over back-to-back calls, L2
    not flushed, so the sum may undercut ``time_ms``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_call: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            per_call[event.name] += event.time_range.elapsed_us() / 1e3 / calls
    return sorted(per_call.items(), key=lambda item: -item[1])
