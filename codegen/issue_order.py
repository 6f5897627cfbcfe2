"""The order the sm_90a lowering walks a chunk loop's body in: wgmma groups first, waits last.

The lowering emits ops in the order it is given and waits for a wgmma group where the group's
result is first read (``wgmma_wait<n>``, groups completing in issue order). In program order a
scan's chunk waits three or four times, each wait stalling on one small matmul: linear attention
reads ``q·kᵀ`` (to mask it) before it issues ``q·S``, and issues the state update ``S + kᵀ·v`` last,
after the output's store. Walked so that each step takes the ready op that issues a group without
waiting (else one that feeds such an op, else the next in program order), the independent matmuls
are in flight before the first wait: linear attention's chunk waits twice, the state update
running beside the rest. With one consumer warpgroup per CTA the state update (a group only the
next iteration reads) is issued after the chunk's other groups instead, so it runs while the
output is waited for and stored, when nothing else would keep the tensor cores busy.

Data dependences order the walk, and three more rules keep the lowering's decisions as in program
order: stores keep their order; an op that reads a value last (and so may take its registers, or
accumulate into them) stays after the value's other readers; an absorbed matmul (emitted with the
add it accumulates into) is walked where that add is. Earlier matmuls keep their accumulators live
longer, so by default (``Schedule.issue == "fit"``) an order is taken only if it keeps no more
register tiles live at once than program order does: hoisting every ready op that feeds a matmul
first, else matmuls alone, else none (the SSD backward's fifteen matmuls a chunk spill otherwise);
and a body whose tiles fill the consumer's registers in program order already keeps it. The
lowering counts registers per thread, as ``peak_registers`` walks the ops ``unit_reads`` lists,
and asks the same of the chunk overlap (``Schedule.overlap``).
``"early"`` takes the first regardless; the tuner tries both, and ``"program"``.

``plan_issue`` is the lowering's pass 3: for each chunk loop it asks ``issue_order`` with answers
from the earlier plans, decides ``Schedule.overlap``, and where the order's peak of registers
holds register copies of loaded tiles, which readers read them afresh (``reload.plan_reloads``),
and which register tiles are staged for their matmuls at their last register reader
(``staging.plan_early_staging``), all in an ``IssuePlan``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from tilemix.tiles.ir import Loop, Op, Value
from tilemix.tiles.lowerable import vector_product

from .knobs import ISSUE_ORDERS, OVERLAPS
from .liveness import Liveness, registers_at, thread_registers
from .reload import plan_reloads
from .staging import plan_early_staging
from .structure import KernelPlan

__all__ = ["IssuePlan", "plan_issue", "issue_order", "peak_registers", "tile_registers", "unit_reads",
           "OVERLAP_RESERVE"]

OVERLAP_RESERVE = 24  # registers a consumer keeps beside its tiles (addresses, indices): see Schedule.overlap

_SIDE_EFFECTS = ("store", "store_state")


def unit_reads(units: list[Op], absorbed: dict[Op, Op]) -> dict[Op, set[Value]]:
    """What each op of a walk over ``units`` (the body less its absorbed matmuls; ``absorbed``:
    matmul -> the add it is emitted with) reads: an add with its matmul reads the matmul's operands
    and the accumulator, the product being no tile of its own."""
    merged = {add: mm for mm, add in absorbed.items()}
    return {u: {*u.operands, *merged[u].operands} - {merged[u].result} if u in merged else {*u.operands}
            for u in units}


def issue_order(body: list[Op], *, absorbed: dict[Op, Op], last_reader: dict[Value, Op],
                issues_group: Callable[[Op], bool], waits_for: Callable[[Op], Iterable[Value]],
                in_registers: Callable[[Value], int] | None, capacity: int,
                state_last: Iterable[Value] = ()) -> list[Op]:
    """``body`` reordered (see the module docstring). ``absorbed``: matmul -> the add it is emitted
    with; ``issues_group(op)``: whether lowering ``op`` commits a wgmma group (its result is then in
    flight); ``waits_for(op)``: the values ``op`` waits for if a group is still writing them;
    ``in_registers(v)``: the registers a value takes (0 for tiles in shared memory), or None to take
    the first order whatever it holds; ``capacity``: the registers a thread has for tiles (a body
    whose tiles take more in program order keeps it); ``state_last``: loop updates (what the next
    iteration reads) whose groups are issued after this iteration's others (see ``_walk``)."""
    units = [op for op in body if op not in absorbed]
    merged = {add: mm for mm, add in absorbed.items()}
    reads = unit_reads(units, absorbed)
    defined = {u.result: u for u in units if u.result is not None}
    defined.update({mm.result: absorbed[mm] for mm in absorbed if mm.result is not None})
    after: dict[Op, set[Op]] = {u: {defined[v] for v in reads[u] if v in defined and defined[v] is not u}
                                for u in units}
    effects = [u for u in units if u.name in _SIDE_EFFECTS]
    for earlier, later in zip(effects, effects[1:]):
        after[later].add(earlier)
    for u in units:
        for v in reads[u]:
            last = last_reader.get(v)
            if last is not None and last is not u and last in after:
                after[last].add(u)  # the value's last reader stays last
    budget = peak_registers(units, reads, in_registers) if in_registers else 0
    if in_registers and budget > capacity:
        return body
    feeds = _feeders(units, after, issues_group)
    read_here = {v for u in units for v in reads[u]}
    next_only = {u for u in units if issues_group(u) and u.result in set(state_last) and u.result not in read_here}
    walk = lambda hoist: _walk(units, after, hoist, issues_group, waits_for, next_only)  # noqa: E731
    for hoist in (lambda u: u in feeds, lambda u: False):
        order = walk(hoist)
        if in_registers is None or peak_registers(order, reads, in_registers) <= budget:
            return [op for u in order for op in ((merged[u], u) if u in merged else (u,))]
    return body


def _walk(units: list[Op], after: dict[Op, set[Op]], hoist: Callable[[Op], bool],
          issues_group: Callable[[Op], bool], waits_for: Callable[[Op], Iterable[Value]],
          next_only: set[Op]) -> list[Op]:
    """List-schedule ``units``: each step the ready unit that issues a wgmma group without waiting,
    else one ``hoist`` picks, else the first in program order. A group only the next iteration
    reads (``next_only``: a state update's) waits until this iteration's other groups are issued, so
    it is the one still running while the chunk's outputs are waited for and stored. (The lowering
    asks for that with one consumer warpgroup per CTA, where nothing else keeps the tensor cores
    busy through a store; with two the other warpgroup does, and the later issue measured slower.)"""
    position = {u: i for i, u in enumerate(units)}
    in_flight: list[Value] = []  # results of the groups not yet waited for, oldest first
    order: list[Op] = []
    done: set[Op] = set()

    def key(u: Op):
        waits = any(v in in_flight for v in waits_for(u))
        later = u in next_only and any(g not in done and g not in next_only and issues_group(g) for g in units)
        kind = 0 if u.name == "load" else 4 if later else 1 if issues_group(u) and not waits \
            else 2 if hoist(u) and not waits else 3
        return (kind, position[u])

    while len(order) < len(units):
        chosen = min((u for u in units if u not in done and after[u] <= done), key=key)
        waited = [in_flight.index(v) for v in waits_for(chosen) if v in in_flight]
        if waited:
            del in_flight[:max(waited) + 1]
        if issues_group(chosen) and chosen.result is not None:
            in_flight.append(chosen.result)
        done.add(chosen)
        order.append(chosen)
    return order


def _feeders(units: list[Op], after: dict[Op, set[Op]], issues_group: Callable[[Op], bool]) -> set[Op]:
    """The ops some group-issuing op depends on, directly or not."""
    feeds: set[Op] = set()
    stack = [u for u in units if issues_group(u)]
    while stack:
        for dep in after[stack.pop()]:
            if dep not in feeds:
                feeds.add(dep)
                stack.append(dep)
    return feeds


def peak_registers(order: list[Op], reads: dict[Op, set[Value]], in_registers: Callable[[Value], int]) -> int:
    """The most registers the body's values hold at once in ``order`` (``liveness.registers_at``)."""
    return max(registers_at(order, reads, in_registers), default=0)


@dataclass(frozen=True)
class IssuePlan:
    """How the chunk loop's body is walked: ``order`` (the ops as emitted), ``overlapped``, the
    carried tiles whose last groups run on into the next chunk (empty: the chunk waits for all of
    its groups and releases its own stage), ``reloads``: reader -> the loaded tiles it reads
    afresh from the stage, their earlier register copy dropped (``reload.plan_reloads``), and
    ``early_staging``: reader -> the register tiles staged before it, its last register read of
    them (``staging.plan_early_staging``)."""

    order: tuple[Op, ...]
    overlapped: frozenset[Value]
    reloads: Mapping[Op, frozenset[Value]] = field(default_factory=lambda: MappingProxyType({}))
    early_staging: Mapping[Op, tuple[Value, ...]] = field(default_factory=lambda: MappingProxyType({}))


def plan_issue(plan: KernelPlan, live: Liveness, loop: Loop, *, asynchronous: bool, registers: int,
               views: frozenset[str] = frozenset(), in_place: frozenset[str] = frozenset()) -> IssuePlan:
    """Pass 3: chunk loop ``loop``'s issue order, overlap, reloads of loaded tiles and early staging.
    ``asynchronous``: matmuls are groups waited for where their results are read (else program
    order, no overlap); ``registers``: a consumer thread's registers (``setmaxnreg``; 0: no
    reloads); ``views``: the ops that read a loaded tile in place where it has no register copy;
    ``in_place``: the ops that may write their result over an operand they read last."""
    walk = _IssueWalk(plan, live, loop, registers, views)
    order = walk.body_order() if asynchronous else loop.body
    # Leave a chunk's groups running (and release its stage next time) only when they write
    # carried accumulators that nothing but the matmul touches; if other instructions define those
    # registers inside the loop, ptxas serialises every wgmma of the kernel. (And only with two
    # stages or more: with one, the producer needs this stage back before it can load the chunk
    # the next iteration waits for — a deadlock the tuner found.)
    only_matmuls = frozenset(v for v in loop.carried if live.uses.get(v, 0) == 1
                             and any(x is v and walk.reuses(x, add) for add, (_, x) in live.accumulate.items()))
    overlap = asynchronous and plan.schedule.stages > 1 and walk.overlaps(order, only_matmuls)
    units = [op for op in order if op not in live.absorbed]
    reads = unit_reads(units, dict(live.absorbed_by))
    reloads = walk.reloads(units, reads) if registers else MappingProxyType({})
    # a buffer staged early is held longer: where buffers are shared (shared memory is short) it
    # would take one of its own
    early = MappingProxyType({}) if plan.schedule.share_staging else plan_early_staging(
        loop, units, reads, live, plan.shared_tiles, in_place, register_a=plan.schedule.stage_a)
    return IssuePlan(tuple(order), only_matmuls if overlap else frozenset(), reloads, early)


def tile_registers(plan: KernelPlan, live: Liveness, v: Value) -> int:
    """Registers a thread holds of ``v``: none for tiles in shared memory (loads, row views)."""
    return 0 if v in live.shared_rows or v in plan.loaded_tiles else thread_registers(v.type)


class _IssueWalk:
    """The questions ``issue_order`` asks of a chunk loop, answered from the plans."""

    def __init__(self, plan: KernelPlan, live: Liveness, loop: Loop, registers: int, views: frozenset[str]):
        self.plan, self.live, self.loop, self.registers, self.views = plan, live, loop, registers, views

    def reuses(self, x: Value, op: Op) -> bool:
        """Whether ``op`` updates ``x`` in place (the emitter's ``reuses`` as it stands when the loop
        starts: of the values scoped to the body only the carried ones have registers yet)."""
        live = self.live
        return (x in self.loop.carried and live.last_reader.get(x) is op
                and live.scope.get(op.result) is self.loop.body and x not in live.shared_rows
                and (x.type.rows, x.type.cols) == (op.result.type.rows, op.result.type.cols))

    def body_order(self) -> list[Op]:
        """The chunk loop's ops with wgmma groups issued early and waited for late (``issue_order``)."""
        plan, live = self.plan, self.live
        issue = plan.schedule.issue
        if issue not in ISSUE_ORDERS:
            plan.fail(f"Schedule.issue is one of {', '.join(map(repr, ISSUE_ORDERS))}, not {issue!r}")
        if issue == "program":
            return self.loop.body
        return issue_order(self.loop.body, absorbed=dict(live.absorbed_by),
                           last_reader={v: op for v, op in live.last_reader.items() if self.tile_registers(v)},
                           issues_group=self.issues_group, waits_for=self.waits_for,
                           in_registers=self.tile_registers if issue == "fit" else None,
                           capacity=self.registers - OVERLAP_RESERVE,
                           state_last=self.loop.update if plan.schedule.consumers == 1 else ())

    def tile_registers(self, v: Value) -> int:
        return tile_registers(self.plan, self.live, v)

    def overlaps(self, order: list[Op], carried: frozenset[Value]) -> bool:
        """``Schedule.overlap`` for the chunk loop walked in ``order``, whose groups writing the
        ``carried`` tiles may run on into the next chunk ("fit": where ``overlap_registers`` and
        ``OVERLAP_RESERVE`` for addresses and indices fit the consumer's registers)."""
        overlap = self.plan.schedule.overlap
        if overlap not in OVERLAPS:
            self.plan.fail(f"Schedule.overlap is one of {', '.join(map(repr, OVERLAPS))}, not {overlap!r}")
        if overlap != "fit":
            return overlap == "on"
        return self.overlap_registers(order, carried) + OVERLAP_RESERVE <= self.registers

    def overlap_registers(self, order: list[Op], carried: frozenset[Value]) -> int:
        """Registers a thread's tiles need with the chunk's last groups overlapping the next chunk:
        the body's peak of register tiles (``peak_registers``) and those groups' register operands
        (bf16 fragments, live until the next chunk's first wait)."""
        units = [op for op in order if op not in self.live.absorbed]
        reads = unit_reads(units, dict(self.live.absorbed_by))
        held = [mm.operands[0] for add, (mm, x) in self.live.accumulate.items()
                if add in reads and x in carried and not mm.attrs["ta"]]
        return peak_registers(units, reads, self.tile_registers) + sum(map(self.tile_registers, held)) // 2

    def reloads(self, units: list[Op], reads: Mapping[Op, set[Value]]) -> Mapping[Op, frozenset[Value]]:
        """``plan_reloads`` for the body walked as ``units`` (its ops less the absorbed matmuls;
        ``reads``: ``unit_reads``), within the registers the issue order fits."""
        loaded = frozenset(op.result for op in self.plan.loop_loads[self.loop])
        return plan_reloads(units, reads, loaded, self.tile_registers,
                            lambda v: thread_registers(v.type), self.reads_copy, self.registers)

    def reads_copy(self, op: Op, v: Value) -> bool | None:
        """How the emitters read loaded tile ``v`` at ``op``: True through its register copy
        (``Emitter.reg``), False from shared memory (a tensor-core matmul's operand), None through
        the copy if one is live, else in place (``Emitter.elementwise``: a binary map, a column)."""
        if op in self.live.accumulate:
            mm, x = self.live.accumulate[op]
            if v is not x:
                return vector_product(mm)
        elif op.name == "matmul":
            return vector_product(op)
        if (op.name in self.views and len(op.operands) == 2) or (op.name == "slice" and op.attrs["cols"] == 1):
            return None
        return True

    def issues_group(self, op: Op) -> bool:
        """Whether lowering ``op`` commits a wgmma group (a vector product is a reduction, done at once)."""
        mm = self.live.accumulate[op][0] if op in self.live.accumulate else op
        return mm.name == "matmul" and not vector_product(mm)

    def waits_for(self, op: Op) -> list[Value]:
        """The values lowering ``op`` waits for if a wgmma group is still writing them: its operands,
        an accumulating add's matmul operands, less the accumulator it adds into in place."""
        if op in self.live.accumulate:
            mm, x = self.live.accumulate[op]
            return [*mm.operands, *([] if self.reuses(x, op) else [x])]
        return list(op.operands)
