"""Pass 1, structure analysis: a program as the kernel lays it out (``KernelPlan``).

Grid loops (blockIdx), the per-CTA body, its sequential chunk loops (one after another, each
walking the ring of stages in turn), the tile loads outside them (loaded once) and inside them
(into the ring), their per-token vectors, and how the consumer groups share a CTA's work; anything
else is rejected with an error naming the line (``tiles.lowerable``'s checks, the ones the verifier
of a GPU target runs, and the schedule's)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tilemix.tiles.errors import TileError
from tilemix.tiles.ir import Loop, Op, Program, Value
from tilemix.tiles.lowerable import PANEL, check_lowerable, grid_loops

from .knobs import Schedule, column_blocks

__all__ = ["KernelPlan", "analyze_structure", "sequence_dims", "token_by_token", "packed_offsets", "packed_start",
           "CONSUMER_THREADS", "PANEL"]

CONSUMER_THREADS = 128  # threads of one consumer group (a warpgroup): one program instance


def fail(target: str, message: str, program: Program, op: Op | None = None):
    raise TileError(f"{target} code generator: {message}", op.loc if op else program.loc)


@dataclass(frozen=True)
class KernelPlan:
    """A program's structure as the kernel lays it out: the grid loops (blockIdx), the per-CTA
    ``body``, its chunk ``loops`` in program order, the tile loads outside them (``prologue_loads``,
    loaded once) and inside each (``loop_loads``, into the ring), each loop's per-token vectors
    (``loop_col_loads``, copied into the ring with the chunk's tiles), and how the consumers share
    the CTA's work."""

    program: Program
    schedule: Schedule
    full_dims: Mapping[str, int]
    target: str  # the name errors give
    grid_loops: tuple[Loop, ...]
    body: list[Op]
    loops: tuple[Loop, ...]
    prologue_loads: tuple[Op, ...]
    loop_loads: Mapping[Loop, tuple[Op, ...]]
    loop_col_loads: Mapping[Loop, tuple[Op, ...]]
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

    @property
    def loads(self) -> tuple[Op, ...]:
        """Every chunk loop's tile loads into the ring, loop by loop."""
        return tuple(op for loop in self.loops for op in self.loop_loads[loop])

    @property
    def shared_tiles(self) -> frozenset[Value]:
        """The tiles loaded into shared memory, the ring's and the prologue's: read where they lie."""
        return self.loaded_tiles | {op.result for op in self.prologue_loads}

    @property
    def col_loads(self) -> tuple[Op, ...]:
        """Every chunk loop's per-token vectors copied into the ring, loop by loop."""
        return tuple(op for loop in self.loops for op in self.loop_col_loads[loop])

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
            end = f"min({end}, ({block} + 1) * {loop.stop.size}{_plus(loop.stop.offset)}{_shift(loop.stop, loop)})"
        chunks = f"(({end}) + {loop.size - 1}) / {loop.size}"
        if loop.stop is not None and loop.stop.dim != loop.dim:
            chunks = f"max(0, {chunks})"  # an end-aligned bound may fall before the dim's start
        return chunks if loop.start is None else f"max(0, {chunks} - c_first)"

    def first_chunk(self, loop: Loop) -> list[str]:
        """The declaration of ``c_first``, the first chunk of a loop with a start (none without)."""
        if loop.start is None:
            return []
        block = self.index_name[loop.start.index.id]
        if self.split_loop is not None and loop.start.index is self.split_loop.index:
            block = self.block_expr(0)  # every consumer starts where the CTA's first block does
        first_row = f"{block} * {loop.start.size}"
        if loop.start.offset or loop.start.dim != loop.dim:  # a window's (or end-aligned) first row, clamped
            first_row = f"max(0, {first_row}{_plus(loop.start.offset)}{_shift(loop.start, loop)})"
        return [f"const int c_first = {first_row} / {loop.size};"]


def _plus(offset: int) -> str:
    """A bound's row offset as a term of its C++ expression ("" for none)."""
    return f" {'+' if offset > 0 else '-'} {abs(offset)}" if offset else ""


def _shift(bound, loop: Loop) -> str:
    """The term moving a bound from its index's dim onto the loop's, the two aligned at their ends
    (``ir.Bound.aligned_shift``), as C++ ("" on one dim)."""
    return "" if bound.dim == loop.dim else f" + ({loop.dim} - {bound.dim})"


def token_by_token(loops: list[Loop]) -> bool:
    """Whether a program with these chunk loops runs one token per chunk (a decode step): it moves
    its states and little else, which the schedule's occupancy and the state moves are chosen for."""
    return bool(loops) and all(loop.size == 1 for loop in loops)


def sequence_dims(program: Program) -> tuple[str, ...]:
    """The sequence dims besides T that the program's Seq/GroupSeq parameters run along (``Seq.along``),
    sorted: runtime sizes the kernel takes after T, H and G."""
    return tuple(sorted({p.spec.length for p in program.params if p.spec.kind in ("seq", "group_seq")} - {"T"}))


def packed_offsets(dim: str) -> str:
    """The kernel argument (and the launch's argument name) holding a packed batch's int32 offsets
    along sequence dim ``dim``: ``cu_seqlens`` for T, ``cu_seqlens_S`` for a ``Seq.along("S")``."""
    return "cu_seqlens" if dim == "T" else f"cu_seqlens_{dim}"


def packed_start(dim: str) -> str:
    """The C++ name of a packed instance's first token along ``dim`` (read from ``packed_offsets``)."""
    return "bos" if dim == "T" else f"bos_{dim}"


def _check_consumers(target: str, program: Program, schedule: Schedule, matrix: bool, consumer_heads: bool):
    axis = schedule.consumer_axis
    if axis not in ("columns", "blocks", "heads"):
        fail(target, f"consumer_axis is 'columns', 'blocks' or 'heads', not {axis!r}", program)
    if axis == "heads":
        if not consumer_heads:  # a target whose loads are issued per consumer group
            fail(target, "consumer_axis='heads' is lowered for sm_90a only", program)
        if matrix:
            fail(target, "consumer_axis='heads' needs a batch x head grid (a program of Seq parameters)", program)
        if schedule.split:
            fail(target, "consumer_axis='heads' takes no column split (each consumer runs a whole head)", program)


def analyze_structure(program: Program, schedule: Schedule, full_dims: Mapping[str, int], target: str,
                      consumer_heads: bool) -> KernelPlan:
    """Pass 1: the program's grid loops, per-CTA body, chunk loop and loads (``KernelPlan``);
    ``consumer_heads``: whether the target lowers ``consumer_axis="heads"``."""
    check_lowerable(program, lambda message, op: fail(target, message, program, op))  # as the verifier does
    grid, body = grid_loops(program.body)
    loops = tuple(op for op in body if isinstance(op, Loop))
    tile_loads = lambda ops: tuple(op for op in ops if op.name == "load" and op.result.type.cols > 1  # noqa: E731
                                   and program.param(op.attrs["param"]).spec.kind != "chunk_state")
    loop_loads = {loop: tile_loads(loop.body) for loop in loops}
    loop_col_loads = {loop: tuple(op for op in loop.body if op.name == "load" and op.result.type.cols == 1
                                  and op.operands[0] is loop.index
                                  and program.param(op.attrs["param"]).spec.kind == "seq") for loop in loops}
    matrix = any(p.spec.kind == "matrix" for p in program.params)
    index_name = {loop.index.id: f"blk{depth}" for depth, loop in enumerate(grid)}
    _check_consumers(target, program, schedule, matrix, consumer_heads)
    split_loop = None
    if schedule.consumer_axis == "blocks" and schedule.consumers > 1:
        if not grid:
            fail(target, "consumer_axis='blocks' needs a blocks() loop", program)
        split_loop = grid[-1]
    for loop in loops:  # each loop's counters are its own (the kernel gives each loop after the first a scope)
        # the chunk index: the iteration counter c, offset by the first chunk when the loop has a start,
        # counted down from the last chunk when it runs in reverse
        index = "c" if loop.start is None else "(c_first + c)"
        index_name[loop.index.id] = f"(n_iter - 1 - {index})" if loop.reverse else index
    return KernelPlan(
        program=program, schedule=schedule, full_dims=MappingProxyType(dict(full_dims)), target=target,
        grid_loops=tuple(grid), body=body, loops=loops, prologue_loads=tile_loads(body),
        loop_loads=MappingProxyType(loop_loads), loop_col_loads=MappingProxyType(loop_col_loads),
        loaded_tiles=frozenset(op.result for ops in loop_loads.values() for op in ops),
        loaded=frozenset(op.attrs["param"] for op in program.walk() if op.name == "load"),
        scanned=frozenset(op.operands[0] for op in program.walk()
                          if op.name in ("cumsum", "segsum") and op.operands[0].type.cols == 1),
        matrix=matrix,
        size_args=tuple(sorted({d for p in program.params if p.spec.kind == "matrix" for d in p.spec.dims})
                        if matrix else ("T", "H", "G", *sequence_dims(program))),
        index_name=MappingProxyType(index_name), split_loop=split_loop, heads=schedule.consumer_axis == "heads")
