"""Pass 4, shared-memory layout: every buffer of the kernel's shared memory (``SharedLayout``).

In allocation order: the ring of stages the chunk loops load into (one loop after another, each
loop's loads from the start of a stage), the tiles loaded once, the per-token vectors' ring, the
store panels, then the consumers' own buffers as the consumer code meets them in emission order
(each chunk loop's issue order inside it): register tiles staged as
matmul operands (with ``Schedule.share_staging`` a buffer whose tile's readers are all emitted
is reused), prefix scans of column vectors, and last the cross-warp exchange buffers, each sized
for the program's widest exchange."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tilemix.tiles.ir import Loop, Op, Value

from .issue_order import IssuePlan
from .liveness import Liveness
from .staging import staged_operands
from .structure import PANEL, KernelPlan

__all__ = ["SharedLayout", "plan_shared_memory", "align"]


def align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class SharedLayout:
    """The ring of ``stages`` stages of ``stage_bytes`` (each holding every tile a chunk loop
    loads, at ``load_offset``), the tiles loaded once (``prologue_offset``), the per-token vectors'
    ring (``col_ring``, ``col_stage_bytes`` a stage, at ``col_offset``), ``store_buffers`` panel
    buffers of ``store_rows`` rows per consumer for tile stores, then per consumer: each staged
    value's buffer (``staging``), each scanned column vector's scan (``scans``) and the exchange
    buffers (``scratch_floats`` floats each, from ``scratch_offset``). ``top``: the bytes all take."""

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
    staging: Mapping[Value, int]
    scans: Mapping[Value, int]
    scratch_floats: Mapping[str, int]  # "scratch" (column reductions, scans), "transposed" (transposes)
    scratch_offset: int
    top: int


class _Allocator:
    def __init__(self, top: int = 0):
        self.top = top

    def __call__(self, nbytes: int, alignment: int = 1024) -> int:
        offset = align(self.top, alignment)
        self.top = offset + nbytes
        return offset


def _stage_offsets(plan: KernelPlan, loads_of: Mapping[Loop, tuple[Op, ...]]) -> tuple[dict[Op, int], int]:
    """Each load's offset in a stage, every loop's from the stage's start, and the bytes of the
    largest loop's loads (a stage's size)."""
    offsets, size = {}, 0
    for loop in plan.loops:
        top = 0
        for op in loads_of[loop]:
            offsets[op] = top
            top += plan.load_bytes(op)
        size = max(size, top)
    return offsets, size


def plan_shared_memory(plan: KernelPlan, live: Liveness, issues: Mapping[Loop, IssuePlan],
                       max_store_buffers: int) -> SharedLayout:
    """Pass 4: every buffer, in allocation order (``issues``: each chunk loop's issue plan;
    ``max_store_buffers``: panel buffers a consumer alternates between for wide tile stores)."""
    stages = plan.schedule.stages
    load_offset, stage_bytes = _stage_offsets(plan, plan.loop_loads)
    alloc = _Allocator(stage_bytes * stages)
    prologue_offset = {op: alloc(plan.load_bytes(op)) for op in plan.prologue_loads}
    col_offset, col_stage_bytes = _stage_offsets(plan, plan.loop_col_loads)
    col_ring = alloc(col_stage_bytes * stages, 16) if plan.col_loads else 0
    stores = tuple(op for op in plan.program.walk() if op.name == "store" and op.operands[0].type.cols > 1
                   and plan.program.param(op.attrs["param"]).spec.kind != "chunk_state")
    store_rows = max((op.operands[0].type.rows for op in stores), default=0)
    store_buffers = min(max_store_buffers, max((op.operands[0].type.cols // PANEL for op in stores), default=1))
    store_offset = alloc(store_rows * 128 * store_buffers * plan.schedule.consumers)
    staging, scans, scratch = _consumer_buffers(plan, live, issues, alloc)
    scratch_offset = alloc((sum(scratch.values()) or 4) * 4 * plan.schedule.consumers, 16)
    return SharedLayout(stage_bytes=stage_bytes, load_offset=MappingProxyType(load_offset),
                        prologue_offset=MappingProxyType(prologue_offset), col_offset=MappingProxyType(col_offset),
                        col_stage_bytes=col_stage_bytes, col_ring=col_ring, stores=stores, store_rows=store_rows,
                        store_buffers=store_buffers, store_offset=store_offset, staging=MappingProxyType(staging),
                        scans=MappingProxyType(scans), scratch_floats=MappingProxyType(scratch),
                        scratch_offset=scratch_offset, top=alloc.top)


def _emission_order(plan: KernelPlan, issues: Mapping[Loop, IssuePlan]) -> Iterator[tuple[Op, bool]]:
    """The consumer code's ops in the order they are emitted, each with whether it is in a chunk
    loop: grid loops' bodies where they stand (their indices come from blockIdx), each chunk loop's
    in its issue order, as ``Lowering.lower_ops`` walks them."""
    def walk(ops: list[Op], in_loop: bool):
        for op in ops:
            if isinstance(op, Loop):
                yield from walk(op.body, in_loop) if op.kind == "blocks" else walk(list(issues[op].order), True)
            else:
                yield op, in_loop

    return walk(plan.program.body, False)


def _consumer_buffers(plan: KernelPlan, live: Liveness, issues: Mapping[Loop, IssuePlan], alloc: _Allocator):
    """Staging buffers and scans, allocated in emission order, and the exchanges' sizes. A staged
    buffer is shared (``Schedule.share_staging``) with a tile of the same size and scope whose last
    reader is emitted, unless that tile was staged before the chunk loop and this one in it (a
    buffer reused inside the loop would hand the next iteration's readers another tile)."""
    consumers, share = plan.schedule.consumers, plan.schedule.share_staging
    staging, scans, scratch = {}, {}, {"scratch": 0, "transposed": 0}
    slots: dict[Value, tuple[int, int, bool]] = {}  # staged value -> (offset, bytes a consumer, in the loop)
    emitted: set[Op] = set()
    loaded = plan.shared_tiles

    def stage(v: Value, in_loop: bool):
        nbytes = v.type.rows * v.type.cols * 2
        free = next((u for u, (_, size, u_in_loop) in slots.items()
                     if share and size == nbytes and live.last_reader.get(u) in emitted
                     and not (in_loop and not u_in_loop) and live.scope.get(u) is live.scope.get(v)), None)
        offset = slots.pop(free)[0] if free is not None else alloc(nbytes * consumers)
        slots[v] = (offset, nbytes, in_loop)
        staging[v] = offset

    early = {op: vs for issue in issues.values() for op, vs in issue.early_staging.items()}
    for op, in_loop in _emission_order(plan, issues):
        if op in live.absorbed:
            continue
        staged, scanned, exchanges = _buffers_of(op, plan, live, loaded)
        for v in (*early.get(op, ()), *staged):
            if v not in slots:
                stage(v, in_loop)
        for v in scanned:
            if v not in scans:
                scans[v] = alloc(2 * v.type.rows * 4 * consumers, 16)
        for buffer, floats in exchanges:
            scratch[buffer] = max(scratch[buffer], -(-floats // 4) * 4)
        emitted.add(op)
        if op in live.accumulate:
            emitted.add(live.accumulate[op][0])
    return staging, scans, scratch


def _buffers_of(op: Op, plan: KernelPlan, live: Liveness,
                loaded: frozenset[Value]) -> tuple[list[Value], list[Value], list[tuple[str, int]]]:
    """What emitting ``op`` needs of the consumer's shared memory: register tiles staged as matmul
    operands, column vectors prefix-scanned, and cross-warp exchanges (buffer, floats); ``loaded``:
    the loaded tiles, read where they lie."""
    mm = live.accumulate[op][0] if op in live.accumulate else op
    if mm.name == "matmul":
        return _matmul_buffers(mm, loaded)
    if op.name == "linrec":
        return [], [], [("scratch", 8 * op.result.type.cols)]
    if op.name == "trisolve":  # the matrix, the solution and (64 columns or fewer) the halves' sums
        rows, cols = op.result.type.shape
        return [], [], [("scratch", rows * (rows + cols) + (2 * 4 * 64 if cols <= 64 else 0))]  # tm::trisolve
    if op.name == "slice" and op.result.type.rows == 1:  # one row of a tile
        return [], [], [("scratch", op.result.type.cols)]
    if op.name not in ("colsum", "colmax", "cumsum", "segsum", "transpose"):
        return [], [], []
    x = op.operands[0]
    rows, cols = x.type.rows, x.type.cols
    if (op.name == "colsum" and x in plan.scanned) or op.name == "segsum" or (op.name == "cumsum" and cols == 1):
        return [], [x], [("scratch", 4 * (rows // 64))]  # the scan's own exchange
    if op.name in ("colsum", "colmax"):
        return [], [], [("scratch", 4 * cols)]
    if op.name == "cumsum":
        return [], [], [("scratch", 4 * cols * (rows // 64))]
    if 1 in (rows, cols) and (rows, cols) != (1, 1) and op.result not in live.shared_rows:  # a transpose
        return [], [], [("transposed", max(rows, cols))]
    return [], [], []


def _matmul_buffers(mm: Op, loaded: frozenset[Value]) -> tuple[list[Value], list[Value], list[tuple[str, int]]]:
    """A matvec transposes a column operand; a row-vector product transposes its vector or its
    result, and sums down columns without ``tb``; a matmul stages B, and A where it is read from shared
    memory (transposed), unless they are loaded tiles or tiles no matmul takes (that is an error)."""
    a, b = mm.operands
    ta, tb = mm.attrs["ta"], mm.attrs["tb"]
    n, k = mm.result.type.cols, a.type.rows if ta else a.type.cols
    if n == 1 and not ta:
        return [], [], [] if tb else [("transposed", k)]
    if mm.result.type.rows == 1:  # the vector turned (where ta == tb), and with tb the result turned to a row
        if tb:
            return [], [], [("transposed", max(k if ta else 0, n))]
        return [], [], [("transposed", k)] * (not ta) + [("scratch", 4 * n)]
    return staged_operands(mm, loaded), [], []
