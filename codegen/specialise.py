"""A program specialised for one call and lowered: traced at the binding's sizes with the
schedule's column split applied, then lowered for the arch. Below ``schedule`` (which lowers
candidate schedules to see which fit) and ``launch`` (which compiles the result)."""

from __future__ import annotations

from dataclasses import replace

from tilemix.tiles import Kernel
from tilemix.tiles.params import Binding

from .generic import lower_generic
from .hopper import KernelSource, lower_hopper
from .knobs import Schedule

__all__ = ["hopper_source", "generic_source", "kernel_source"]


def hopper_source(kernel: Kernel, binding: Binding, schedule: Schedule, varlen: bool = False) -> KernelSource:
    """The sm_90a kernel for ``kernel`` at ``binding`` under ``schedule`` (``varlen``: for a packed
    batch, ``ops/varlen.py``)."""
    traced = replace(binding, static=dict(binding.static, **dict(schedule.split)))
    program = kernel.trace(traced, target="sm_90a")
    return lower_hopper(program, schedule, dict(binding.static), varlen)


def generic_source(kernel: Kernel, binding: Binding, schedule: Schedule, arch: str = "sm_80",
                   varlen: bool = False) -> KernelSource:
    """The generic (mma.sync) kernel for ``arch``, one of ``GENERIC_ARCHS``: same schedules, same
    tracing, with the arch's shared-memory limit."""
    traced = replace(binding, static=dict(binding.static, **dict(schedule.split)))
    program = kernel.trace(traced, target=arch)
    return lower_generic(program, arch, schedule, dict(binding.static), varlen)


def kernel_source(kernel: Kernel, binding: Binding, schedule: Schedule, arch: str = "sm_90a",
                  varlen: bool = False) -> KernelSource:
    """The kernel for ``arch``: sm_90a lowers for Hopper, the others for the generic target."""
    if arch == "sm_90a":
        return hopper_source(kernel, binding, schedule, varlen)
    return generic_source(kernel, binding, schedule, arch, varlen)
