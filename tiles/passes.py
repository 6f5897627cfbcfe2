"""Clean-up passes run on every traced program: common-subexpression
elimination (``x[c]`` written twice loads once) and dead-code elimination
(a ``.T`` folded into a matmul leaves an unused transpose)."""

from __future__ import annotations

from .ir import Loop, Op, Value

__all__ = ["simplify", "drop_dead_carries"]

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


def drop_dead_carries(body: list[Op]) -> None:
    """Remove, in place, the carried values of ``body``'s loops that nothing reads but their own
    updates: no op outside that chain and nothing after the loop (a derived gradient beside a
    recurrence it does not read, such as SSD's dD beside the state). ``simplify`` then drops
    their ops. Not run on traced programs: a user's dead state is theirs to keep."""
    for loop in [op for op in body if isinstance(op, Loop)]:
        drop_dead_carries(loop.body)
        used = _used(body)  # a loop's results are read only after it
        live = {i for i, r in enumerate(loop.results) if r in used}
        while True:
            needed = _needed(loop, live)
            more = {i for i, c in enumerate(loop.carried) if c in needed} - live
            if not more:
                break
            live |= more
        keep = sorted(live)
        loop.init, loop.carried, loop.update, loop.results = ([xs[i] for i in keep] for xs in
                                                              (loop.init, loop.carried, loop.update, loop.results))


def _needed(loop: Loop, live: set[int]) -> set[Value]:
    """The values ``loop``'s body needs for its side effects and the updates of carried ``live``."""
    made = {op.result: op for op in loop.walk() if op.result is not None}
    needed: set[Value] = set()
    todo = [loop.update[i] for i in live]
    todo += [v for op in loop.walk() if op.name in _SIDE_EFFECTS for v in op.operands]
    while todo:
        v = todo.pop()
        if v in needed:
            continue
        needed.add(v)
        if v in made:
            todo += list(made[v].operands)
    return needed
