"""Pass 3, shared-memory layout: the ring, the tiles loaded once, the store panels (``SharedLayout``).

Staging buffers for register-tile matmul operands, prefix scans and the cross-warp exchange
buffers are allocated after these while the consumer code is emitted (``emit.Emitter``): which
tiles are staged, and which buffers they may share, is decided op by op there."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tilemix.tiles.ir import Op

from .structure import PANEL, KernelPlan

__all__ = ["SharedLayout", "plan_shared_memory", "align"]


def align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class SharedLayout:
    """Shared memory known before the consumer code is emitted: the ring of ``stages`` stages of
    ``stage_bytes`` (each holding every tile the chunk loop loads, at ``load_offset``), the tiles
    loaded once (``prologue_offset``), the per-token vectors' ring (``col_ring``, ``col_stage_bytes``
    a stage, at ``col_offset``), then ``store_buffers`` panel buffers of ``store_rows`` rows per
    consumer for tile stores. ``top``: the bytes these take; staging buffers, scans and the
    exchange buffers are allocated after them as the consumer code is emitted."""

    stage_bytes: int
    load_offset: Mapping[Op, int]
    prologue_offset: Mapping[Op, int]
    col_offset: Mapping[Op, int]
    col_stage_bytes: int
    col_ring: int
    stores: tuple[Op, ...]  # the tile stores (through shared panels)
    store_rows: int
    store_buffers: int
    store_offset: int
    top: int


def plan_shared_memory(plan: KernelPlan, max_store_buffers: int) -> SharedLayout:
    """Pass 3: the ring, the tiles loaded once and the store panels (``max_store_buffers``: panel
    buffers a consumer alternates between for wide tiles)."""
    stages = plan.schedule.stages
    top = 0

    def alloc(nbytes: int, alignment: int = 1024) -> int:
        nonlocal top
        offset = align(top, alignment)
        top = offset + nbytes
        return offset

    load_offset, stage_bytes = {}, 0
    for op in plan.loads:
        load_offset[op] = stage_bytes
        stage_bytes += plan.load_bytes(op)
    top = stage_bytes * stages
    prologue_offset = {op: alloc(plan.load_bytes(op)) for op in plan.prologue_loads}
    col_offset, col_stage_bytes = {}, 0
    for op in plan.col_loads:
        col_offset[op] = col_stage_bytes
        col_stage_bytes += plan.load_bytes(op)
    col_ring = alloc(col_stage_bytes * stages, 16) if plan.col_loads else 0
    stores = tuple(op for op in plan.program.walk() if op.name == "store" and op.operands[0].type.cols > 1)
    store_rows = max((op.operands[0].type.rows for op in stores), default=0)
    store_buffers = min(max_store_buffers, max((op.operands[0].type.cols // PANEL for op in stores), default=1))
    store_offset = alloc(store_rows * 128 * store_buffers * plan.schedule.consumers)
    return SharedLayout(stage_bytes=stage_bytes, load_offset=MappingProxyType(load_offset),
                        prologue_offset=MappingProxyType(prologue_offset), col_offset=MappingProxyType(col_offset),
                        col_stage_bytes=col_stage_bytes, col_ring=col_ring, stores=stores, store_rows=store_rows,
                        store_buffers=store_buffers, store_offset=store_offset, top=top)
