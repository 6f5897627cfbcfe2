"""Pass 2, accumulation and liveness: who reads each value, and when it dies (``Liveness``).

The emitters decide from it whether an op may take over an operand's registers (its last reader,
in the scope defining it), which adds a matmul accumulates into, and which transposed per-token
vectors stay views of the ring; the issue order counts registers with ``thread_registers``."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tilemix.tiles.ir import Loop, Op, Program, Value

from .structure import KernelPlan

__all__ = ["Liveness", "plan_liveness", "registers_at", "thread_registers"]


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
        op.result for loop in plan.loops for op in loop.body
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


def registers_at(order: list[Op], reads: Mapping[Op, set[Value]], in_registers: Callable[[Value], int]) -> list[int]:
    """The registers the values of a loop body walked in ``order`` hold at each op (``reads``: what
    each op reads): each value from its op (or, made before the loop, from the start) to its last
    reader there (to the end if nothing there reads it: the loop's carried update). An op's operands
    that it reads last free their registers for its result, as an in-place update does."""
    last = {v: i for i, u in enumerate(order) for v in reads[u]}
    made = {u.result for u in order if u.result is not None}
    live = {v for v in last if v not in made}
    held = []
    for i, u in enumerate(order):
        live = {v for v in live if last.get(v, len(order)) > i}
        if u.result is not None:
            live.add(u.result)
        held.append(sum(in_registers(v) for v in live))
    return held
