"""Typing rules: the result type of each IR op from its operand types.

The tracer applies them as the program is built (so an error names the
user's line) and the verifier applies them again over the finished IR.
A rule raises ``ShapeError`` with a message; the caller attaches the line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .types import DType, Space, TileType

__all__ = ["ShapeError", "infer", "UNARY", "BINARY", "COMPARE", "REDUCE", "MASKS"]

UNARY = ("neg", "abs", "exp", "exp2", "log", "sqrt", "floor", "sin", "cos", "sigmoid", "softplus", "tanh", "pow")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")
COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
REDUCE = ("rowsum", "rowmax", "colsum", "colmax")
MASKS = ("causal", "window", "in_seq")


class ShapeError(Exception):
    pass


def _f32(t: TileType, **changes) -> TileType:
    return replace(t, dtype=DType.f32, space=Space.register, **changes)


def _broadcast(types: list[TileType], what: str) -> TileType:
    rows = {t.rows for t in types} - {1}
    cols = {t.cols for t in types} - {1}
    if len(rows) > 1 or len(cols) > 1:
        shapes = " and ".join(f"{t.rows}x{t.cols}" for t in types)
        raise ShapeError(f"{what}: shapes {shapes} do not broadcast (each dimension must match or be 1)")
    r = rows.pop() if rows else 1
    c = cols.pop() if cols else 1
    row_axis = next((t.row_axis for t in types if t.rows == r and t.row_axis), None)
    col_axis = next((t.col_axis for t in types if t.cols == c and t.col_axis), None)
    return TileType(r, c, DType.f32, Space.register, row_axis, col_axis)


def _float(t: TileType, what: str) -> None:
    if t.dtype in (DType.bool, DType.index):
        raise ShapeError(f"{what}: expected a float tile, got {t}")


def _unary(ts, attrs):
    _float(ts[0], attrs["_name"])
    return _f32(ts[0])


def _binary(ts, attrs):
    for t in ts:
        _float(t, attrs["_name"])
    return _broadcast(list(ts), attrs["_name"])


def _compare(ts, attrs):
    return replace(_binary(ts, attrs), dtype=DType.bool)


def _where(ts, attrs):
    cond, a, b = ts
    if cond.dtype is not DType.bool:
        raise ShapeError(f"where: the condition must be a comparison (bool tile), got {cond}")
    _float(a, "where")
    _float(b, "where")
    return _broadcast([cond, a, b], "where")


def _matmul(ts, attrs):
    a, b = ts
    for t in ts:
        _float(t, "@")
    m, k = (a.cols, a.rows) if attrs["ta"] else (a.rows, a.cols)
    k2, n = (b.cols, b.rows) if attrs["tb"] else (b.rows, b.cols)
    if k != k2:
        left = f"{m}x{k}" + (" (transposed)" if attrs["ta"] else "")
        right = f"{k2}x{n}" + (" (transposed)" if attrs["tb"] else "")
        raise ShapeError(f"shape mismatch in @: {left} @ {right} (inner dimensions {k} and {k2} differ)")
    row_axis = a.col_axis if attrs["ta"] else a.row_axis
    col_axis = b.row_axis if attrs["tb"] else b.col_axis
    return TileType(m, n, DType.f32, Space.register, row_axis, col_axis)


def _transpose(ts, attrs):
    t = ts[0]
    return replace(t, rows=t.cols, cols=t.rows, row_axis=t.col_axis, col_axis=t.row_axis, space=Space.register)


def _mask(ts, attrs):
    t = ts[0]
    name = attrs["_name"]
    _float(t, name)
    needs = ("col_axis",) if name == "in_seq" else ("row_axis", "col_axis")
    for axis in needs:
        if getattr(t, axis) is None:
            side = "rows" if axis == "row_axis" else "columns"
            raise ShapeError(
                f"{name}() needs a tile whose {side} are sequence positions (e.g. q[c] @ k[c].T); "
                f"the {side} of this {t} are not"
            )
    return _f32(t)


def _reduce(ts, attrs):
    t = ts[0]
    _float(t, attrs["_name"])
    if attrs["_name"].startswith("row"):
        return _f32(t, cols=1, col_axis=None)
    return _f32(t, rows=1, row_axis=None)


def _cumsum(ts, attrs):
    _float(ts[0], "cumsum")
    return _f32(ts[0])


def _segsum(ts, attrs):
    t = ts[0]
    _float(t, "segsum")
    if t.cols != 1:
        raise ShapeError(f"segsum: expected a column vector (one value per row), got {t}")
    return TileType(t.rows, t.rows, DType.f32, Space.register, t.row_axis, t.row_axis)


def _slice(ts, attrs):
    t = ts[0]
    r0, rows, c0, cols = attrs["row0"], attrs["rows"], attrs["col0"], attrs["cols"]
    for start, size, n, what in ((r0, rows, t.rows, "rows"), (c0, cols, t.cols, "columns")):
        if size <= 0:
            raise ShapeError(f"slice of {t}: empty range of {what}")
        if (start, size) != (0, n) and (start % 16 or size % 16) and size != 1:
            raise ShapeError(f"slice of {t}: {what} {start}:{start + size} do not start and end at "
                             "multiples of 16 (or take one row or column)")
    row_axis = t.row_axis if r0 == 0 else None  # positions stay right where the rows start at 0
    col_axis = t.col_axis if c0 == 0 else None
    return TileType(rows, cols, DType.f32, Space.register, row_axis, col_axis)


def _concat(ts, attrs):
    for t in ts:
        _float(t, "concat")
    along, other = ("rows", "cols") if attrs["axis"] == 0 else ("cols", "rows")
    if len({getattr(t, other) for t in ts}) > 1:
        shapes = ", ".join(f"{t.rows}x{t.cols}" for t in ts)
        raise ShapeError(f"concat(axis={attrs['axis']}): the {other} of {shapes} differ")
    size = sum(getattr(t, along) for t in ts)
    # positions stay along the dim the tiles share (where they all agree), not along the joined one
    first = ts[0]
    if attrs["axis"] == 0:
        col_axis = first.col_axis if all(t.col_axis == first.col_axis for t in ts) else None
        return TileType(size, first.cols, DType.f32, Space.register, None, col_axis)
    row_axis = first.row_axis if all(t.row_axis == first.row_axis for t in ts) else None
    return TileType(first.rows, size, DType.f32, Space.register, row_axis, None)


def _linrec(ts, attrs):
    a, b, h0 = ts
    out = _binary((a, b), {"_name": "linrec"})
    _float(h0, "linrec")
    if h0.rows != 1 or h0.cols not in (1, out.cols):
        raise ShapeError(f"linrec: h0 must be a row vector of the result's width (1x{out.cols}), got {h0}")
    return out


def _trisolve(ts, attrs):
    a, b = ts
    _float(a, "trisolve")
    _float(b, "trisolve")
    if a.rows != a.cols or b.rows != a.rows:
        raise ShapeError(f"trisolve: expected a square tile and a right-hand side of as many rows, "
                         f"got {a.rows}x{a.cols} and {b.rows}x{b.cols}")
    return _f32(b)  # row i of x answers row i of b


def _outer(ts, attrs):
    x, y = ts
    _float(x, "outer")
    _float(y, "outer")
    if x.rows != y.rows:
        raise ShapeError(f"outer: x and y need as many rows, got {x.rows}x{x.cols} and {y.rows}x{y.cols}")
    return TileType(x.rows, x.cols * y.cols, DType.f32, Space.register, x.row_axis or y.row_axis, None)


def _cast(ts, attrs):
    _float(ts[0], "cast")
    return replace(ts[0], dtype=attrs["dtype"], space=Space.register)


def _full(ts, attrs):
    return TileType(attrs["rows"], attrs["cols"], DType.f32)


def _eye(ts, attrs):
    return TileType(attrs["n"], attrs["n"], DType.f32)


_RULES: dict[str, Callable[[tuple[TileType, ...], dict[str, Any]], TileType]] = {
    **{n: _unary for n in UNARY},
    **{n: _binary for n in BINARY},
    **{n: _compare for n in COMPARE},
    **{n: _reduce for n in REDUCE},
    **{n: _mask for n in MASKS},
    "where": _where,
    "matmul": _matmul,
    "transpose": _transpose,
    "cumsum": _cumsum,
    "segsum": _segsum,
    "cast": _cast,
    "slice": _slice,
    "concat": _concat,
    "linrec": _linrec,
    "trisolve": _trisolve,
    "outer": _outer,
    "full": _full,
    "iota": _full,
    "eye": _eye,
}


def infer(name: str, types: tuple[TileType, ...], attrs: dict[str, Any]) -> TileType | None:
    """Result type of a compute op, or None for ops typed by the builder
    (loads, stores, parameter reads), whose types come from the parameters."""
    rule = _RULES.get(name)
    if rule is None:
        return None
    return rule(types, {**attrs, "_name": name})

