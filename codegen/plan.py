"""The lowering's analysis passes, each returning a frozen plan that the later passes read.

``analyze_structure`` splits a program into grid loops, the per-CTA body and its chunk loop
(``KernelPlan``); ``plan_liveness`` finds each value's readers and the adds a matmul accumulates
into (``Liveness``); ``plan_shared_memory`` lays out the loads' ring, the tiles loaded once and the
store panels (``SharedLayout``). Nothing here emits code; what a target decides (whether it lowers
``consumer_axis="heads"``, its store buffers, which ops are elementwise maps) is an argument."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tilemix.tiles.errors import TileError
from tilemix.tiles.ir import Loop, Op, Program, Value

from .schedule import Schedule, column_blocks

__all__ = ["KernelPlan", "Liveness", "SharedLayout", "analyze_structure", "plan_liveness", "plan_shared_memory",
           "PANEL", "CONSUMER_THREADS", "thread_registers", "align"]

CONSUMER_THREADS = 128  # threads of one consumer group (a warpgroup): one program instance
PANEL = 64  # columns of a 128-byte swizzled shared-memory panel

_SETUP = ("full", "scalar_param", "read_param", "load_state")  # ops allowed beside a grid loop

def fail(target: str, message: str, program: Program, op: Op | None = None):
    raise TileError(f"{target} code generator: {message}", op.loc if op else program.loc)


@dataclass(frozen=True)
class KernelPlan:
    """A program's structure as the kernel lays it out: the grid loops (blockIdx), the per-CTA
    ``body``, its chunk ``loop`` (or None), the tile loads before it (``prologue_loads``, loaded
    once) and inside it (``loads``, into the ring), its per-token vectors (``col_loads``, copied
    into the ring with the chunk's tiles), and how the consumers share the CTA's work."""

    program: Program
    schedule: Schedule
    full_dims: Mapping[str, int]
    target: str  # the name errors give
    grid_loops: tuple[Loop, ...]
    body: list[Op]
    loop: Loop | None
    prologue_loads: tuple[Op, ...]
    loads: tuple[Op, ...]
    col_loads: tuple[Op, ...]
    loaded_tiles: frozenset[Value]
    loaded: frozenset[str]  # parameters the program loads
    scanned: frozenset[Value]  # column vectors prefix-scanned in shared memory (cumsum, segsum)
    matrix: bool  # a Matrix program: no batch x head grid
    size_args: tuple[str, ...]  # runtime sizes passed as int arguments
    index_name: Mapping[int, str]  # loop index value id -> its C++ expression
    split_loop: Loop | None  # the grid loop whose blocks the consumers share out
    heads: bool  # the consumers take consecutive heads of one batch

    def fail(self, message: str, op: Op | None = None):
        fail(self.target, message, self.program, op)

    def block_expr(self, consumer) -> str:
        """Index of consumer ``consumer``'s block of the split grid loop."""
        depth = len(self.grid_loops) - 1
        return f"(cta{depth} * {self.schedule.consumers} + {consumer})"

    def split_width(self, param_name: str) -> int | None:
        """The block width of a parameter's feature dim, if it is split."""
        dims = [d for d in self.program.param(param_name).spec.dims if isinstance(d, str)]
        return dict(self.schedule.split).get(dims[-1]) if dims else None

    def per_consumer(self, op: Op) -> bool:
        """Whether each consumer loads its own copy of this tile."""
        if self.heads:  # each consumer its own head's Seq tiles; a group's tiles once for all
            return self.program.param(op.attrs["param"]).spec.kind == "seq"
        if self.split_width(op.attrs["param"]):
            return True
        return self.split_loop is not None and self.split_loop.index in op.operands

    def col0(self, param_name: str, consumer: str = "wg") -> str:
        """Column offset of a consumer's block of a parameter's feature dim (0 without a split)."""
        width = self.split_width(param_name)
        return f"(colcta * {self.schedule.consumers} + {consumer}) * {width}" if width else "0"

    def load_bytes(self, op: Op) -> int:
        t = op.result.type
        size = 4 if t.cols == 1 else 2  # per-token vectors are fp32
        return t.rows * t.cols * size * (self.schedule.consumers if self.per_consumer(op) else 1)

    @property
    def column_ctas(self) -> int:
        """CTAs the split cuts each head's columns into (each CTA's consumers take one block each)."""
        blocks = column_blocks(self.schedule.split, self.full_dims)
        return blocks // self.schedule.consumers if self.schedule.consumer_axis == "columns" else blocks

    def trip_count(self, loop: Loop) -> str:
        end = loop.dim  # runtime sizes are kernel arguments named after their dims
        if loop.stop is not None:
            block = self.index_name[loop.stop.index.id]
            if self.split_loop is not None and loop.stop.index is self.split_loop.index:
                # every consumer runs the CTA's longest range; positions mask what is not theirs
                block = self.block_expr(self.schedule.consumers - 1)
            end = f"min({end}, ({block} + 1) * {loop.stop.size})"
        chunks = f"(({end}) + {loop.size - 1}) / {loop.size}"
        return chunks if loop.start is None else f"max(0, {chunks} - c_first)"

    def first_chunk(self, loop: Loop) -> list[str]:
        """The declaration of ``c_first``, the first chunk of a loop with a start (none without)."""
        if loop.start is None:
            return []
        block = self.index_name[loop.start.index.id]
        if self.split_loop is not None and loop.start.index is self.split_loop.index:
            block = self.block_expr(0)  # every consumer starts where the CTA's first block does
        return [f"const int c_first = {block} * {loop.start.size} / {loop.size};"]


def _grid_loops(body: list[Op]) -> tuple[list[Loop], list[Op]]:
    """The nested blocks() loops a body starts with (beside setup ops only), and the body inside them."""
    grid_loops = []
    while True:
        loops = [op for op in body if isinstance(op, Loop)]
        if len(loops) == 1 and loops[0].kind == "blocks" and all(op is loops[0] or op.name in _SETUP for op in body):
            grid_loops.append(loops[0])
            body = loops[0].body
            continue
        return grid_loops, body


def _check_consumers(target: str, program: Program, schedule: Schedule, matrix: bool, consumer_heads: bool):
    axis = schedule.consumer_axis
    if axis not in ("columns", "blocks", "heads"):
        fail(target, f"consumer_axis is 'columns', 'blocks' or 'heads', not {axis!r}", program)
    if axis == "heads":
        if not consumer_heads:  # the generic target issues loads per head otherwise
            fail(target, "consumer_axis='heads' is lowered for sm_90a only", program)
        if matrix:
            fail(target, "consumer_axis='heads' needs a batch x head grid (a program of Seq parameters)", program)
        if schedule.split:
            fail(target, "consumer_axis='heads' takes no column split (each consumer runs a whole head)", program)


def analyze_structure(program: Program, schedule: Schedule, full_dims: Mapping[str, int], target: str,
                      consumer_heads: bool) -> KernelPlan:
    """Pass 1: the program's grid loops, per-CTA body, chunk loop and loads (``KernelPlan``);
    ``consumer_heads``: whether the target lowers ``consumer_axis="heads"``."""
    grid_loops, body = _grid_loops(program.body)
    loops = [op for op in body if isinstance(op, Loop)]
    if len(loops) > 1 or any(op.kind != "chunks" for op in loops):
        fail(target, "this version lowers nested blocks() loops around at most one chunks() loop", program)
    loop = loops[0] if loops else None
    if loop is not None and any(isinstance(op, Loop) for op in loop.body):
        fail(target, "loops nested in a chunks() loop are not lowered yet", program, loop)
    tile_loads = lambda ops: tuple(op for op in ops if op.name == "load" and op.result.type.cols > 1)  # noqa: E731
    in_loop = loop.body if loop is not None else []
    col_loads = tuple(op for op in in_loop if op.name == "load" and op.result.type.cols == 1
                      and op.operands[0] is loop.index and program.param(op.attrs["param"]).spec.kind == "seq")
    for op in tile_loads(body) + tile_loads(in_loop):
        if op.result.type.cols % PANEL:
            fail(target, f"tiles loaded from {op.attrs['param']} are {op.result.type.cols} wide; "
                 f"sm_90a needs feature dims that are multiples of {PANEL}", program, op)
    matrix = any(p.spec.kind == "matrix" for p in program.params)
    index_name = {loop.index.id: f"blk{depth}" for depth, loop in enumerate(grid_loops)}
    _check_consumers(target, program, schedule, matrix, consumer_heads)
    split_loop = None
    if schedule.consumer_axis == "blocks" and schedule.consumers > 1:
        if not grid_loops:
            fail(target, "consumer_axis='blocks' needs a blocks() loop", program)
        split_loop = grid_loops[-1]
    if loop is not None:
        # the chunk index: the iteration counter c, offset by the first chunk when the loop has a start,
        # counted down from the last chunk when it runs in reverse
        index = "c" if loop.start is None else "(c_first + c)"
        index_name[loop.index.id] = f"(n_iter - 1 - {index})" if loop.reverse else index
    return KernelPlan(
        program=program, schedule=schedule, full_dims=MappingProxyType(dict(full_dims)), target=target,
        grid_loops=tuple(grid_loops), body=body, loop=loop, prologue_loads=tile_loads(body),
        loads=tile_loads(in_loop), col_loads=col_loads, loaded_tiles=frozenset(op.result for op in tile_loads(in_loop)),
        loaded=frozenset(op.attrs["param"] for op in program.walk() if op.name == "load"),
        scanned=frozenset(op.operands[0] for op in program.walk()
                          if op.name in ("cumsum", "segsum") and op.operands[0].type.cols == 1),
        matrix=matrix,
        size_args=tuple(sorted({d for p in program.params if p.spec.kind == "matrix" for d in p.spec.dims})
                        if matrix else ("T", "H", "G")),
        index_name=MappingProxyType(index_name), split_loop=split_loop, heads=schedule.consumer_axis == "heads")


@dataclass(frozen=True)
class Liveness:
    """Who reads each value and when it dies: ``readers``, ``uses``, ``last_reader`` (a loop reads
    its carried updates after its body; an absorbed matmul's operands are read at its add), the op
    list (``scope``) defining each value; ``accumulate``: add -> (its matmul, the accumulator) for
    each ``x + a @ b`` whose product nothing else reads (the matmul accumulates into ``x``);
    ``shared_rows``: transposed per-token vectors read in place from the ring."""

    uses: Mapping[Value, int]
    scope: Mapping[Value, list[Op]]
    last_reader: Mapping[Value, Op]
    readers: Mapping[Value, tuple[Op, ...]]
    accumulate: Mapping[Op, tuple[Op, Value]]
    absorbed: frozenset[Op]  # matmuls emitted with the add they accumulate into
    absorbed_by: Mapping[Op, Op]  # absorbed matmul -> its add
    shared_rows: frozenset[Value]


def _reads(program: Program):
    uses, scope, last_reader, readers = Counter(), {}, {}, defaultdict(list)

    def read(values, op: Op):
        uses.update(values)
        last_reader.update((v, op) for v in values)
        for v in values:
            readers[v].append(op)

    def visit(ops: list[Op]):
        for op in ops:
            if op.result is not None:
                scope[op.result] = ops
            if isinstance(op, Loop):
                read(op.init, op)
                scope.update({v: op.body for v in op.carried})
                visit(op.body)
                read(op.update, op)
            else:
                read(op.operands, op)

    visit(program.body)
    return uses, scope, last_reader, readers


def _accumulations(program: Program, uses: Counter) -> dict[Op, tuple[Op, Value]]:
    producer = {op.result: op for op in program.walk() if op.result is not None}
    accumulate = {}
    for op in program.walk():
        if op.name != "add":
            continue
        for m, x in (op.operands, op.operands[::-1]):
            mm = producer.get(m)
            if (mm is not None and mm.name == "matmul" and uses[m] == 1 and m is not x
                    and (x.type.rows, x.type.cols) == (op.result.type.rows, op.result.type.cols)):
                accumulate[op] = (mm, x)
                break
    return accumulate


def _last_readers_with_absorbed(program: Program, accumulate, absorbed) -> dict[Value, Op]:
    """Last readers where an absorbed matmul's operands are read by its add: an op between the two
    must not take their registers (or their staging buffers) as their last reader."""
    deferred = {add: mm.operands for add, (mm, _) in accumulate.items()}
    last_reader = {}

    def reread(ops: list[Op]):
        for op in ops:
            if isinstance(op, Loop):
                last_reader.update((v, op) for v in op.init)
                reread(op.body)
                last_reader.update((v, op) for v in op.update)
            elif op not in absorbed:
                last_reader.update((v, op) for v in (*deferred.get(op, ()), *op.operands))

    reread(program.body)
    return last_reader


def plan_liveness(plan: KernelPlan, maps: frozenset[str]) -> Liveness:
    """Pass 2: readers, last readers and scopes, the accumulating adds, the ring's row views
    (``maps``: the elementwise ops, which read such a view in place)."""
    uses, scope, last_reader, readers = _reads(plan.program)
    accumulate = _accumulations(plan.program, uses)
    absorbed = frozenset(mm for mm, _ in accumulate.values())
    if accumulate:
        last_reader = _last_readers_with_absorbed(plan.program, accumulate, absorbed)
    # transposes of per-token vectors that only elementwise maps read: views of the stage
    # (``tm::shared_row``), each element read where it is used, no registers held
    ring = {op.result for op in plan.col_loads}
    shared_rows = frozenset(
        op.result for op in (plan.loop.body if plan.loop is not None else [])
        if op.name == "transpose" and op.operands[0] in ring
        and all(not isinstance(r, Loop) and r.name in maps for r in readers[op.result]))
    return Liveness(uses=MappingProxyType(dict(uses)), scope=MappingProxyType(scope),
                    last_reader=MappingProxyType(last_reader),
                    readers=MappingProxyType({v: tuple(ops) for v, ops in readers.items()}),
                    accumulate=MappingProxyType(accumulate), absorbed=absorbed,
                    absorbed_by=MappingProxyType({mm: add for add, (mm, _) in accumulate.items()}),
                    shared_rows=shared_rows)


def thread_registers(t) -> int:
    """Registers a thread holds of a ``tm::rt<rows, cols>`` (wgmma's accumulator layout: 2 rows of
    each 64 and 2 columns of each 8; a row vector repeats in every row's threads)."""
    rows = 1 if t.rows == 1 else t.rows // 32
    cols = 1 if t.cols == 1 else t.cols // 4
    return rows * cols


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
