"""What a lowering hands the launch: the kernel's CUDA source and how to call it.

``KernelSource.params`` lists the kernel's parameters in argument order as ``(ParamKind, name)``;
the launch turns each into the argument its kind says (a tensor map, an address, a float)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .knobs import Schedule

__all__ = ["KernelSource", "ParamKind"]


class ParamKind(str, Enum):
    """How a kernel receives one program parameter."""

    TMAP = "tmap"  # a TMA tensor map of a 16-bit input (sm_90a)
    TMAP_OUT = "tmap_out"  # a TMA tensor map of a 16-bit output (sm_90a)
    PTR = "ptr"  # the address of a 16-bit input (generic kernels: cp.async reads)
    PTR_OUT = "ptr_out"  # the address of an output written with plain stores
    F32 = "f32"  # the address of an fp32 input (per-token or per-head values)
    STATE = "state"  # the addresses of a state's initial value (or null) and its final value
    SCALAR = "scalar"  # a float passed by value
    CHUNK_STATE = "chunk_state"  # the address of an fp32 [B, H, NC, r, c] tile per chunk (input or output)
    OFFSETS = "offsets"  # the address of a packed batch's int32 [N + 1] sequence offsets (cu_seqlens)


@dataclass
class KernelSource:
    name: str
    source: str
    smem_bytes: int
    stage_bytes: int  # shared memory of one ring stage (each extra stage costs this much)
    threads: int
    schedule: Schedule
    params: list = field(default_factory=list)  # (ParamKind, param name) in kernel argument order
    grid_loops: list = field(default_factory=list)  # (dim, block size) of each blocks() loop, outermost first
    size_args: list = field(default_factory=list)  # runtime sizes passed as int arguments, in order
    tmap_rows: dict = field(default_factory=dict)  # rows of the TMA box of each loaded parameter
    matrix: bool = False  # a Matrix program: no batch/head grid
    column_ctas: int = 1  # CTAs per head (and grid block): the split's column blocks over the consumers
