"""Scalar factors moved out of matmul operands (an IR→IR rewrite of derived programs).

An adjoint often scales an incoming gradient before its matmuls (``mul(do, scale)`` from
``o = (...) * scale``): the scaled tile is a new fp32 register tile as wide as the gradient, held
until its matmuls read it, and rounded again to the operand dtype on the way in. ``(x·s) @ y =
(x @ y)·s`` with ``s`` a 1x1 tile and ``x`` a loaded tile: the matmul reads ``x`` as loaded (shared
memory, exact) and its accumulator is scaled in place instead."""

from __future__ import annotations

from .ir import Loop, Op, Value
from .types import Space

__all__ = ["scalars_after_matmuls"]


def _scalar(v: Value) -> bool:
    return v.type.rows == 1 and v.type.cols == 1


def _loaded(x: Value, op: Op) -> bool:
    """``x`` is a tile in shared memory as loaded, scaled whole by ``op`` (a register tile gains
    nothing: its scaled copy may simply replace it)."""
    return x.type.space is Space.shared and x.type.shape == op.result.type.shape


def scalars_after_matmuls(ops: list[Op]) -> None:
    """Rewrite ``matmul(mul(x, s), y)`` (either operand, ``s`` 1x1, ``x`` a loaded tile, the product
    read by matmuls only, so that it goes) as ``mul(matmul(x, y), s)``, in place, in ``ops`` and the
    loops inside them."""
    scaled: dict[Value, tuple[Value, Value]] = {}  # mul result -> (tile, scalar)
    readers = [op for top in ops for op in top.walk()]
    other = {v for op in readers if op.name != "matmul" for v in op.operands}
    other |= {v for op in readers if isinstance(op, Loop) for v in (*op.init, *op.update)}
    out: list[Op] = []
    for op in ops:
        if isinstance(op, Loop):
            scalars_after_matmuls(op.body)
        if op.name == "mul" and not _scalar(op.result) and op.result not in other:
            a, b = op.operands
            if _scalar(b) and _loaded(a, op):
                scaled[op.result] = (a, b)
            elif _scalar(a) and _loaded(b, op):
                scaled[op.result] = (b, a)
        if op.name != "matmul" or not any(x in scaled for x in op.operands):
            out.append(op)
            continue
        factors = [scaled[x][1] for x in op.operands if x in scaled]
        product = Value(op.result.type)
        out.append(Op("matmul", tuple(scaled[x][0] if x in scaled else x for x in op.operands), op.attrs, product,
                      op.loc))
        for i, factor in enumerate(factors):
            result = op.result if i == len(factors) - 1 else Value(op.result.type)
            out.append(Op("mul", (product, factor), {}, result, op.loc))
            product = result
    ops[:] = out
