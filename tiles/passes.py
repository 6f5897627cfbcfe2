"""Clean-up passes run on every traced program: common-subexpression
elimination (``x[c]`` written twice loads once) and dead-code elimination
(a ``.T`` folded into a matmul leaves an unused transpose)."""

from __future__ import annotations

from .ir import Loop, Op, Value

__all__ = ["simplify"]

_SIDE_EFFECTS = ("store", "store_state")


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


def simplify(body: list[Op]) -> None:
    """CSE then DCE, in place."""
    _cse(body, {}, {})
    while _remove_unused(body, _used(body)):
        pass
