"""What each target can hold and compute — the limits the verifier checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .ir import Program
from .lowerable import Fail, check_lowerable
from .types import DType

__all__ = ["Target", "TARGETS", "get_target"]


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    mma_dtypes: tuple[DType, ...]  # operand dtypes of its matmul instructions
    carried_bytes: int | None  # fp32 loop-carried state one program instance may keep resident
    fragment: int | None  # every tile dim is 1 or a multiple of it (tensor-core fragments); None: any size
    # what its code generator lowers, checked at verify time (``lowerable``); none for the interpreter
    lowering_checks: tuple[Callable[[Program, Fail], None], ...] = ()


_GENERIC = dict(mma_dtypes=(DType.f16, DType.bf16),
                # mma.sync keeps state in the registers of 4-8 warps beside the working tiles: a
                # 128x128 fp32 tile (128 registers a thread) and a few row vectors, what
                # FlashAttention-2's 128-query blocks carry at head dim 128
                carried_bytes=66 * 1024, fragment=16, lowering_checks=(check_lowerable,))

TARGETS = {
    "cpu": Target("cpu", "NumPy interpreter (exact semantics)",
                  (DType.f32, DType.f16, DType.bf16, DType.f64), None, None),
    # half of an H100 SM's 256 KiB register file: two consumer warpgroups hold
    # the state and still have room for the chunk's working tiles
    "sm_90a": Target("sm_90a", "Hopper: wgmma + TMA, warp-specialised", (DType.f16, DType.bf16), 128 * 1024, 16,
                     (check_lowerable,)),
    **{arch: Target(arch, "generic tensor cores: mma.sync + ldmatrix + cp.async", **_GENERIC)
       for arch in ("sm_80", "sm_86", "sm_89", "sm_90")},  # sm_90: the generic target forced on a Hopper
}


def get_target(name: str | Target) -> Target:
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; expected one of {sorted(TARGETS)}") from None
