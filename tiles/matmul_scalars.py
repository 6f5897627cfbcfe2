"""Scalar factors moved out of matmul operands (an IR→IR rewrite of derived programs).

An adjoint often scales an incoming gradient before its matmuls (``mul(do, scale)`` from
``o = (...) * scale``): the scaled tile is a new fp32 register tile as wide as the gradient, held
until its matmuls read it, and rounded again to the operand dtype on the way in. ``(x·s) @ y =
(x @ y)·s`` with ``s`` a 1x1 tile and ``x`` a loaded tile: the matmul reads ``x`` as loaded (shared
memory, exact) and its accumulator is scaled in place instead. A row or column scaling
on the way takes the factor instead (``(x·s)·r = x·(r·s)``, ``r`` a decay's per-token vector):
retention's dq and dk read ``do·scale`` in one matmul and ``do·scale·decay`` in another, two 64x128
fp32 tiles where one is left."""

from __future__ import annotations

from .ir import Loop, Op, Value
from .types import Space

__all__ = ["scalars_after_matmuls"]


def _scalar(v: Value) -> bool:
    return v.type.rows == 1 and v.type.cols == 1


def _vector(v: Value) -> bool:
    return (v.type.rows == 1) != (v.type.cols == 1)


def _loaded(x: Value, op: Op) -> bool:
    """``x`` is a tile in shared memory as loaded, scaled whole by ``op`` (a register tile gains
    nothing: its scaled copy may simply replace it)."""
    return x.type.space is Space.shared and x.type.shape == op.result.type.shape


def _readers(ops: list[Op]) -> dict[Value, list[Op | None]]:
    """value -> the ops of ``ops`` reading it; ``None`` where a loop among them reads it (inside its
    body, or as a carried value or update): such a reader is rewritten, if at all, on its own level."""
    readers: dict[Value, list[Op | None]] = {}
    for op in ops:
        if isinstance(op, Loop):
            for inner in op.walk():
                carried = (*inner.init, *inner.update) if isinstance(inner, Loop) else ()
                for v in (*inner.operands, *carried):
                    readers.setdefault(v, []).append(None)
            continue
        for v in op.operands:
            readers.setdefault(v, []).append(op)
    return readers


def _commutes(mm: Op, v: Value, factor: Value) -> bool:
    """Whether matmul ``mm``'s operand ``v`` scaled by ``factor`` equals its product scaled by it:
    a 1x1 factor anywhere, a column vector scaling the rows of an A that is not transposed (the
    product's rows), a row vector scaling the columns of such a B (its columns)."""
    a, b = mm.operands
    if _scalar(factor):
        return True
    if a is v and b is not v and not mm.attrs.get("ta"):
        return factor.type.cols == 1 and factor.type.rows == v.type.rows
    if b is v and a is not v and not mm.attrs.get("tb"):
        return factor.type.rows == 1 and factor.type.cols == v.type.cols
    return False


class _Chains:
    """Tiles that are a loaded tile times factors (1x1 tiles or vectors): ``mul(mul(x, s), r)``."""

    def __init__(self, readers: dict[Value, list[Op | None]]):
        self.readers = readers
        self.of: dict[Value, tuple[Value, tuple[Value, ...]]] = {}  # tile -> (loaded tile, factors)

    def add(self, op: Op) -> None:
        if op.name != "mul" or _scalar(op.result) or _vector(op.result):
            return
        for tile, factor in (op.operands, op.operands[::-1]):
            if (_scalar(factor) or _vector(factor)) and factor not in self.of and \
                    tile.type.shape == op.result.type.shape and (tile in self.of or _loaded(tile, op)):
                root, factors = self.of.get(tile, (tile, ()))
                self.of[op.result] = (root, (*factors, factor))
                return

    def goes(self, v: Value) -> bool:
        """Whether no reader needs ``v`` itself: each is a matmul its factors commute with, or a
        product that goes as well."""
        uses = self.readers.get(v, [])
        return v in self.of and bool(uses) and all(
            u is not None and (u.name == "matmul" and all(_commutes(u, v, f) for f in self.of[v][1])
                               or u.name == "mul" and u.result in self.of and self.goes(u.result))
            for u in uses)

    def absorbed(self, v: Value) -> bool:
        """Whether ``v`` is a loaded tile times one 1x1 factor, read by matmuls (the factor then
        scales their products) and products by vectors (which take the factor) alone."""
        uses = self.readers.get(v, [])
        return v in self.of and len(self.of[v][1]) == 1 and _scalar(self.of[v][1][0]) and bool(uses) and all(
            u is not None and (u.name == "matmul" or u.name == "mul" and any(
                _vector(x) and x is not v for x in u.operands)) for u in uses)


def scalars_after_matmuls(ops: list[Op]) -> None:
    """Rewrite ``matmul(mul(x, f), y)`` (``x`` a loaded tile, ``f`` a 1x1 tile or a vector that
    scales the product's rows or columns, through any chain of such products) as
    ``mul(matmul(x, y), f)``, and ``mul(mul(x, s), r)`` (``s`` 1x1, ``r`` a vector) as
    ``mul(x, mul(r, s))``, in place, in ``ops`` and the loops inside them; only where the scaled
    tile then goes."""
    for op in ops:
        if isinstance(op, Loop):
            scalars_after_matmuls(op.body)
    chains = _Chains(_readers(ops))
    for op in ops:  # all chains first: whether a tile goes may depend on its later products
        chains.add(op)
    gone: set[Value] = set()
    out: list[Op] = []
    for op in ops:
        if op.result in chains.of and (chains.goes(op.result) or chains.absorbed(op.result)):
            gone.add(op.result)
            continue
        taken = [x for x in op.operands if x in gone]
        if op.name == "mul" and taken:  # by a vector, which takes the factor
            tile, = taken
            vector = op.operands[1] if op.operands[0] is tile else op.operands[0]
            (unscaled, (factor,)), scaled_vector = chains.of[tile], Value(vector.type)
            out.append(Op("mul", (vector, factor), {}, scaled_vector, op.loc))
            out.append(Op("mul", (unscaled, scaled_vector), op.attrs, op.result, op.loc))
            continue
        if op.name != "matmul" or not taken:
            out.append(op)
            continue
        factors = [f for x in op.operands if x in gone for f in chains.of[x][1]]
        product = Value(op.result.type)
        out.append(Op("matmul", tuple(chains.of[x][0] if x in gone else x for x in op.operands), op.attrs, product,
                      op.loc))
        for i, factor in enumerate(factors):
            result = op.result if i == len(factors) - 1 else Value(op.result.type)
            out.append(Op("mul", (product, factor), {}, result, op.loc))
            product = result
    ops[:] = out
