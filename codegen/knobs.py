"""The knobs of a generated kernel, apart from the program's math: ``Schedule`` and the limits it
is chosen within.

A ``Schedule`` says how a program is laid onto the GPU (ring depth, consumer warpgroups, column
split, issue order). The lowering reads it; ``codegen/schedule.py`` chooses one per call and holds
the tuner's search space. This module sits below the lowering so both can import it."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Schedule", "column_blocks", "launch_registers", "smem_limit", "ISSUE_ORDERS", "OVERLAPS", "OCCUPANCIES",
           "SMEM_LIMIT", "SMEM_LIMITS", "REGISTER_FILE"]

ISSUE_ORDERS = ("fit", "early", "program")  # Schedule.issue
OVERLAPS = ("fit", "on", "off")  # Schedule.overlap
OCCUPANCIES = (1, 2, 3, 4)  # Schedule.occupancy
SMEM_LIMIT = 227 * 1024  # dynamic shared memory one sm_90a CTA may opt into
# the generic target's archs (CUDA programming guide, compute capabilities table)
SMEM_LIMITS = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
# shared memory per SM, of which the driver reserves 1 KiB per resident CTA (same table)
SM_SHARED = {"sm_90a": 228 * 1024, "sm_80": 164 * 1024, "sm_86": 100 * 1024, "sm_89": 100 * 1024, "sm_90": 228 * 1024}
CTA_RESERVED = 1024
REGISTER_FILE = 65536  # 32-bit registers per SM on every target


@dataclass(frozen=True)
class Schedule:
    """Knobs of the generated kernel (the autotuner searches these).

    ``stages``: depth of the shared-memory ring the producer fills ahead.
    ``split``: static dim → width; the dim is cut into column blocks
    (legal when nothing contracts or reduces over it, e.g. the value dim of
    linear attention).
    ``consumers``: consumer warpgroups per CTA. With ``consumer_axis ==
    "columns"`` each takes one column block of the split dim; with ``"blocks"``
    each takes one block of the innermost grid loop (attention's query blocks,
    gemm's N blocks); with ``"heads"`` (sm_90a only; ``launch_schedule`` picks it for one-consumer
    scans whose heads fill the GPU: SSD's backward, linear attention at D = 64) each takes one of
    ``consumers`` consecutive heads of one batch, ``h = hcta * consumers + wg`` (the launch needs
    H and H/G multiples of ``consumers``). Tiles the consumers have in common (q and k of a scan,
    k and v of attention, A of gemm, the GroupSeq tiles of a group's heads such as SSD's B and C)
    are loaded once for all of them.
    ``share_staging``: register tiles staged in shared memory as matmul operands share buffers
    once a tile's readers are emitted (less shared memory; the defaults take it only where no
    schedule fits without it, and for two heads per CTA at two stages).
    ``issue`` (sm_90a; the generic kernels keep program order): the order the chunk loop's ops are
    lowered in (``issue_order``). ``"early"`` issues each matmul as soon as its operands are ready;
    ``"fit"`` does so where that keeps no more register tiles live than program order, else keeps
    program order (``"program"``); which of the three is fastest differs by program and head dim.
    ``overlap`` (sm_90a): whether a chunk's last wgmma groups, those accumulating into the loop's
    carried tiles, keep running while the next chunk starts (``"on"``, where nothing else touches
    those tiles and the ring has two stages or more) or are waited for at the chunk's end
    (``"off"``). Their register operands then stay live into the next chunk; where that leaves
    ptxas too few registers it runs every wgmma of the kernel one at a time (remark C7512), so
    ``"fit"`` overlaps only where the estimate (``overlap_registers``) leaves room (attention's dk/dv
    program at D=128 is serialised when overlapped).
    ``stage_a``: a matmul's A operand that the chunk makes in registers and only matmuls read is
    staged in shared memory where it is made, and read there (its registers free at once, for a
    shared-memory round trip); the sm_90a defaults take it where the kernel then spills fewer bytes
    (``default_schedule``): gla's forward at D=128 spilled 248 B, not 520, and ran 13% faster
    (H100); attention's backward, which does not spill, ran 6% slower with it.
    ``occupancy``: CTAs each SM holds at once (``__launch_bounds__``'s second argument): 2 splits the
    registers and shared memory between two CTAs, so one CTA's loads and stores run while the other
    computes — for memory-bound kernels with few registers (a decode step's state update), or
    one-consumer kernels, whose producer and consumer take half the register file at 1.
    """

    stages: int = 2
    split: tuple[tuple[str, int], ...] = ()
    consumers: int = 1
    consumer_axis: str = "columns"
    share_staging: bool = False
    issue: str = field(default="fit", metadata={"choices": ISSUE_ORDERS})
    overlap: str = field(default="fit", metadata={"choices": OVERLAPS})
    occupancy: int = field(default=1, metadata={"choices": OCCUPANCIES})
    stage_a: bool = field(default=False, metadata={"choices": (False, True)})


def column_blocks(split: tuple[tuple[str, int], ...], dims: dict[str, int]) -> int:
    """How many column blocks a schedule's ``split`` cuts the state and output columns into (``dims``:
    the static dims' full sizes)."""
    blocks = 1
    for dim, width in split:
        blocks *= dims[dim] // width
    return blocks


def launch_registers(threads: int, occupancy: int) -> int:
    """Registers a thread of a ``threads``-thread CTA gets from ptxas when ``occupancy`` CTAs share an
    SM (``__launch_bounds__(threads, occupancy)``; a multiple of 8, at most 255)."""
    return min(255, REGISTER_FILE // (threads * occupancy)) // 8 * 8


def smem_limit(arch: str, occupancy: int = 1) -> int:
    """The dynamic shared memory one CTA may use on ``arch`` with ``occupancy`` CTAs per SM."""
    limit = SMEM_LIMIT if arch == "sm_90a" else SMEM_LIMITS[arch]
    return limit if occupancy == 1 else min(limit, SM_SHARED[arch] // occupancy - CTA_RESERVED)
