"""Clean-up passes run on every traced program: common-subexpression
elimination (``x[c]`` written twice loads once), dead-code elimination
(a ``.T`` folded into a matmul leaves an unused transpose) and
rematerialisation (a tile made of vectors alone is recomputed where it is
read again rather than held in registers between its readers)."""

from __future__ import annotations

from .ir import Loop, Op, Value
from .rules import BINARY, UNARY

__all__ = ["simplify"]

_SIDE_EFFECTS = ("store", "store_state")
_OUTER = (*UNARY, *BINARY, "segsum")  # per-element arithmetic of its operands' elements, nothing exchanged


def _key(op: Op) -> tuple:
    attrs = tuple(sorted((k, repr(v)) for k, v in op.attrs.items()))
    return (op.name, tuple(v.id for v in op.operands), attrs)


def _cse(ops: list[Op], seen: dict[tuple, Value], mapping: dict[Value, Value]) -> None:
    for op in list(ops):
        op.operands = tuple(mapping.get(v, v) for v in op.operands)
        if isinstance(op, Loop):
            op.init = [mapping.get(v, v) for v in op.init]
            _cse(op.body, dict(seen), mapping)  # the body sees outer values; nothing leaks out
            op.update = [mapping.get(v, v) for v in op.update]
            continue
        if op.name in _SIDE_EFFECTS or op.result is None:
            continue
        key = _key(op)
        if key in seen:
            mapping[op.result] = seen[key]
            ops.remove(op)
        else:
            seen[key] = op.result


def _used(body: list[Op]) -> set[Value]:
    used = set()
    for top in body:
        for op in top.walk():
            used.update(op.operands)
            if isinstance(op, Loop):
                used.update(op.init)
                used.update(op.update)
    return used


def _remove_unused(ops: list[Op], used: set[Value]) -> bool:
    removed = False
    for op in list(ops):
        if isinstance(op, Loop):
            removed |= _remove_unused(op.body, used)
        elif op.name not in _SIDE_EFFECTS and op.result not in used:
            ops.remove(op)
            removed = True
    return removed


def _rematerialise(ops: list[Op]) -> None:
    """Give each reader of an outer-product tile after its first one a copy of the ops making it,
    placed just before that reader. Such a tile (``exp(segsum(a))``, ``u * v.T``: elementwise maps
    and segsums of vectors) costs a few instructions per element to make again, but a 64x64 fp32
    tile held from one reader to the next is 32 registers per thread of a warpgroup beside
    everything else live there (ssd_bwd_dx's decay matrix, read for dB and again for du). Copies go
    only into the op list that made the tile: never into a loop, where they would run per
    iteration."""
    producer: dict[Value, Op] = {}
    read: set[Value] = set()

    def outer(v: Value) -> bool:
        op = producer.get(v)
        return (op is not None and op.name in _OUTER and v.type.rows > 1 and v.type.cols > 1
                and all(x.type.rows == 1 or x.type.cols == 1 or outer(x) for x in op.operands))

    def copy(v: Value, before: int) -> tuple[Value, int]:
        op = producer[v]
        operands = []
        for x in op.operands:
            if outer(x):
                x, before = copy(x, before)
            operands.append(x)
        clone = Op(op.name, tuple(operands), dict(op.attrs), Value(v.type), op.loc)
        ops.insert(before, clone)
        return clone.result, before + 1

    i = 0
    while i < len(ops):
        op = ops[i]
        if isinstance(op, Loop):
            _rematerialise(op.body)
        else:
            operands = []
            for v in op.operands:
                if v in read and outer(v):
                    v, i = copy(v, i)
                operands.append(v)
            op.operands = tuple(operands)
            read.update(op.operands)
            if op.result is not None:
                producer[op.result] = op
        i += 1


def simplify(body: list[Op]) -> None:
    """CSE, DCE, then rematerialisation, in place."""
    _cse(body, {}, {})
    while _remove_unused(body, _used(body)):
        pass
    _rematerialise(body)
