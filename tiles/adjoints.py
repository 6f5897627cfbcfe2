"""Adjoint rules: for each op of the language, the ops that carry its result's gradient back to
its operands. Used by ``tiles.autodiff``, which recomputes the forward values a rule reads before
calling it, so a rule may read the op's operands and result as primal values.

A rule takes the emitter, the op (its operands and result: primal values in the program being
built) and ``gy``, the gradient of the result: a tile broadcastable to the result's shape (the
gradient of a ``rowsum`` is a column vector, say). It returns ``{operand index: thunk}``; the
transform calls a thunk only for operands that need a gradient, and reduces what it returns to the
operand's shape (``colsum``/``rowsum`` over broadcast dims).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .errors import TileError
from .ir import Op, Value
from .rules import MASKS, ShapeError, infer
from .types import DType, TileType

__all__ = ["Emitter", "ADJOINTS", "NO_GRADIENT"]

# ops whose result carries no gradient to its operands: constants (``position`` reads only a loop
# index), comparisons (bool tiles) and ``floor`` (piecewise constant)
NO_GRADIENT = ("full", "iota", "eye", "position", "floor", "lt", "le", "gt", "ge", "eq", "ne")


class Emitter:
    """Appends ops to ``self.ops`` (switchable: the transform builds several regions), each
    carrying ``self.loc``, the forward line it derives from, so a type error names that line."""

    def __init__(self):
        self.ops: list[Op] = []
        self.loc = None

    def op(self, name: str, operands: list[Value], attrs: dict | None = None,
           type: TileType | None = None) -> Value | None:
        attrs = attrs or {}
        if type is None:
            try:
                type = infer(name, tuple(v.type for v in operands), attrs)
            except ShapeError as e:
                raise TileError(f"differentiating this line built an ill-typed {name}: {e}", self.loc) from None
        result = Value(type) if type is not None else None
        self.ops.append(Op(name, tuple(operands), attrs, result, self.loc))
        return result

    def const(self, value: float, rows: int = 1, cols: int = 1) -> Value:
        return self.op("full", [], {"rows": rows, "cols": cols, "value": float(value)})

    def add(self, a: Value, b: Value) -> Value:
        return self.op("add", [a, b])

    def mul(self, a: Value, b: Value) -> Value:
        return self.op("mul", [a, b])

    def neg(self, a: Value) -> Value:
        return self.op("neg", [a])

    def select(self, cond: Value, a: Value, b: Value) -> Value:
        return self.op("where", [cond, a, b])

    def expand(self, g: Value, shape: tuple[int, int]) -> Value:
        """``g`` broadcast to ``shape`` (a matmul operand, a store, a carried value need it whole)."""
        return g if g.type.shape == shape else self.add(g, self.const(0.0, *shape))

    def reduce_to(self, g: Value, shape: tuple[int, int]) -> Value:
        """Sum ``g`` over the dims that broadcasting stretched from ``shape``."""
        if shape[0] == 1 and g.type.rows > 1:
            g = self.op("colsum", [g])
        if shape[1] == 1 and g.type.cols > 1:
            g = self.op("rowsum", [g])
        return g

    def positioned_like(self, g: Value, ref: Value) -> Value:
        """``g`` expanded to ``ref``'s shape, its rows and columns tagged with ``ref``'s sequence
        positions (what a mask reads); ``where(ref < ref, ref, g)`` is ``g`` itself (false even
        for NaN), typed with ``ref``'s axes."""
        g = self.expand(g, ref.type.shape)
        t = ref.type
        if (g.type.row_axis, g.type.col_axis) == (t.row_axis, t.col_axis):
            return g
        return self.select(self.op("lt", [ref, ref]), ref, g)


Rule = Callable[[Emitter, Op, Value], dict[int, Callable[[], Value]]]


def _mul(em, op, gy):
    a, b = op.operands
    return {0: lambda: em.mul(gy, b), 1: lambda: em.mul(gy, a)}


def _div(em, op, gy):
    a, b = op.operands  # y = a / b: dy/db = -y / b
    return {0: lambda: em.op("div", [gy, b]), 1: lambda: em.neg(em.op("div", [em.mul(gy, op.result), b]))}


def _abs(em, op, gy):
    (x,) = op.operands
    zero = em.const(0.0)
    return {0: lambda: em.select(em.op("gt", [x, zero]), gy,
                                 em.select(em.op("lt", [x, zero]), em.neg(gy), zero))}


def _scaled_by(factor: Callable[[Emitter, Op], Value]) -> Rule:
    """``dx = gy * factor`` for an elementwise unary op."""
    return lambda em, op, gy: {0: lambda: em.mul(gy, factor(em, op))}


def _pow(em, op, gy):
    (x,) = op.operands
    n = op.attrs["n"]
    if n == 1:
        return {0: lambda: gy}
    return {0: lambda: em.mul(gy, em.mul(x if n == 2 else em.op("pow", [x], {"n": n - 1}), em.const(n)))}


def _select_by(compare: str) -> Rule:
    """maximum/minimum: the gradient goes to the operand that was chosen (``a`` on ties)."""
    def rule(em, op, gy):
        a, b = op.operands
        zero = em.const(0.0)
        take_a = em.op(compare, [a, b])
        return {0: lambda: em.select(take_a, gy, zero), 1: lambda: em.select(take_a, zero, gy)}
    return rule


def _where(em, op, gy):
    cond = op.operands[0]
    zero = em.const(0.0)
    return {1: lambda: em.select(cond, gy, zero), 2: lambda: em.select(cond, zero, gy)}


def _mask(em, op, gy):
    (x,) = op.operands
    attrs = {**op.attrs, "fill": 0.0}
    return {0: lambda: em.op(op.name, [em.positioned_like(gy, x)], attrs)}


def _passthrough(em, op, gy):
    """rowsum, colsum (the column/row vector gradient broadcasts back) and cast (rounding passes the
    gradient straight through, as torch's ``.to()`` does)."""
    return {0: lambda: gy}


def _extreme(reduce_sum: str) -> Rule:
    """rowmax/colmax: the gradient split evenly among the entries equal to the maximum (torch's
    ``amax``), a subgradient."""
    def rule(em, op, gy):
        (x,) = op.operands

        def dx():
            hit = em.op("ge", [x, op.result])
            count = em.op(reduce_sum, [em.select(hit, em.const(1.0), em.const(0.0))])
            return em.select(hit, em.op("div", [gy, count]), em.const(0.0))
        return {0: dx}
    return rule


def _cumsum(em, op, gy):
    attrs = {"reverse": not op.attrs["reverse"], "exclusive": op.attrs["exclusive"]}
    return {0: lambda: em.op("cumsum", [em.expand(gy, op.result.type.shape)], attrs)}


def _segsum(em, op, gy):
    """``y[i, j] = x[j+1] + ... + x[i]`` (j <= i): ``dx[k] = Σ_{j < k} Σ_{i >= k} gy[i, j]``, the
    reverse cumsum down the rows (``i >= k``) summed over the columns strictly left of the
    diagonal (``j < k``: a strict causal mask). The -inf entries above the diagonal are constant:
    their gradient never enters the sums. No transposed tile: the code generator transposes tiles
    only as matmul operands."""
    def dx():
        later = em.op("cumsum", [em.expand(gy, op.result.type.shape)], {"reverse": True, "exclusive": False})
        left = em.op("causal", [later], {"fill": 0.0, "transposed": False, "strict": True})
        return em.op("rowsum", [left])
    return {0: dx}


def _zeros_beside(em: Emitter, g: Value, axis: int, before: int, after: int) -> Value:
    """``g`` with ``before`` and ``after`` zero rows (``axis=0``) or columns (``axis=1``) around it."""
    def zeros(width):
        return em.const(0.0, *((g.type.rows, width) if axis == 1 else (width, g.type.cols)))
    parts = ([zeros(before)] if before else []) + [g] + ([zeros(after)] if after else [])
    return g if len(parts) == 1 else em.op("concat", parts, {"axis": axis})


def _slice(em, op, gy):
    """The gradient back in its block of the operand's shape, zeros around it; a one-row block (the
    row a recurrence carries) or a one-column block (a picked column) as a select on the row or
    column index, which the code generators lower at any row and column."""
    def dx():
        a, (rows, cols) = op.attrs, op.operands[0].type.shape
        g = em.expand(gy, op.result.type.shape)
        if a["cols"] == 1 and cols > 1:
            index = em.op("iota", [], {"rows": 1, "cols": cols, "axis": 1})
            g = em.select(em.op("eq", [index, em.const(a["col0"])]), g, em.const(0.0))
        else:
            g = _zeros_beside(em, g, 1, a["col0"], cols - a["col0"] - a["cols"])
        if a["rows"] == 1 and rows > 1:
            index = em.op("iota", [], {"rows": rows, "cols": 1, "axis": 0})
            return em.select(em.op("eq", [index, em.const(a["row0"])]), g, em.const(0.0))
        return _zeros_beside(em, g, 0, a["row0"], rows - a["row0"] - a["rows"])
    return {0: dx}


def _concat(em, op, gy):
    """Each operand's block of the gradient."""
    thunks, offset = {}, 0
    for i, x in enumerate(op.operands):
        rows, cols = x.type.shape
        corner = (offset, 0) if op.attrs["axis"] == 0 else (0, offset)
        attrs = {"row0": corner[0], "rows": rows, "col0": corner[1], "cols": cols}
        thunks[i] = lambda attrs=attrs: em.op("slice", [em.expand(gy, op.result.type.shape)], attrs)
        offset += rows if op.attrs["axis"] == 0 else cols
    return thunks


def _linrec(em, op, gy):
    """``h = linrec(a, b, h0)``: the gradient ``g`` of each row's state runs the recurrence the other
    way, ``g_t = gy_t + a_{t+1} g_{t+1}``; as an exclusive reverse scan (no row shifts):
    ``g = gy + linrec(a, a * gy, 0, reverse, exclusive)`` (inclusive ``h``) or
    ``g = linrec(a, gy, 0, reverse, exclusive)`` (exclusive ``h``: row t reads the state before it,
    and ``h0`` gets the first row's ``gy`` directly). Then ``db = g``, ``da = g * h_{t-1}`` and
    ``dh0`` is the first row (in scan order) of ``a * g`` (plus ``gy`` there when exclusive)."""
    a, b, h0 = op.operands
    rev, excl = op.attrs["reverse"], op.attrs["exclusive"]
    shape = op.result.type.shape

    def g():
        full_gy, zero = em.expand(gy, shape), em.const(0.0, 1, shape[1])
        back = {"reverse": not rev, "exclusive": True}
        if excl:
            return em.op("linrec", [a, full_gy, zero], back)
        return em.add(full_gy, em.op("linrec", [a, em.mul(a, full_gy), zero], back))

    def dh0():
        into_h0 = em.mul(a, g())
        if excl:
            into_h0 = em.add(into_h0, gy)
        first = em.op("eq", [em.op("iota", [], {"rows": shape[0], "cols": 1, "axis": 0}),
                             em.const(shape[0] - 1 if rev else 0)])
        return em.op("colsum", [em.select(first, into_h0, em.const(0.0))])

    def da():
        before = op.result if excl else em.op("linrec", [a, b, h0], {"reverse": rev, "exclusive": True})
        return em.mul(g(), before)
    return {0: da, 1: g, 2: dh0}


def _trisolve(em, op, gy):
    """``x = M⁻¹ b`` with ``M = I + tril(a, -1)`` (``transposed``: ``M⁻ᵀ b``): ``db = y = M⁻ᵀ gy``
    (``M⁻¹ gy``) and ``da = -tril(y xᵀ, -1)`` (``-tril(x yᵀ, -1)``): the strictly lower triangle
    is all of ``a`` that ``x`` reads. With 16-bit matmul operands, x enters that product as
    ``hi + lo`` (``hi`` its bf16 rounding): a solution's entries cancel where ``M`` is ill-conditioned
    (correlated keys), so one rounding of x costs the gradient bits the forward kept."""
    a, b = op.operands
    x, flip, dtype = op.result, op.attrs["transposed"], op.attrs["operand_dtype"]

    def y():
        return em.op("trisolve", [a, em.expand(gy, x.type.shape)], {"transposed": not flip, "operand_dtype": dtype})

    def da():
        gy_solved = y()
        outer = None
        for part in _two_term(em, x, dtype):
            left, right = (part, gy_solved) if flip else (gy_solved, part)
            term = em.op("matmul", [left, right], {"operand_dtype": dtype, "ta": False, "tb": True})
            outer = term if outer is None else em.add(outer, term)
        rows = a.type.rows
        below = em.op("gt", [em.op("iota", [], {"rows": rows, "cols": 1, "axis": 0}),
                             em.op("iota", [], {"rows": 1, "cols": rows, "axis": 1})])
        return em.select(below, em.neg(outer), em.const(0.0))
    return {0: da, 1: y}


def _two_term(em, x: Value, operand_dtype) -> list[Value]:
    """``x`` as matmul operands that keep ~16 bits for 16-bit ``operand_dtype``: ``[hi, x - hi]``
    with ``hi`` = bf16(x) (bf16: fp16's range would overflow); ``[x]`` for f32/f64 operands."""
    if DType(operand_dtype) not in (DType.f16, DType.bf16):
        return [x]
    hi = em.op("cast", [x], {"dtype": DType.bf16})
    return [hi, em.op("sub", [x, hi])]


def _outer(em, op, gy):
    """``out[t, i * m + j] = x[t, i] y[t, j]``: ``dx = (gy * outer(1, y)) @ Gᵀ`` and
    ``dy = (gy * outer(x, 1)) @ Fᵀ`` with ``G = outer(I, 1)`` (``G[i, i' * m + j] = [i = i']``) and
    ``F = outer(1, I)`` (``F[j, i * m + j'] = [j = j']``): 0/1 matrices that sum the products over
    ``j`` and over ``i``. Their rows are padded to a multiple of 64 (zero rows, the result sliced
    back): the code generators take matmuls of N in 64-multiples, and Based's features are 16 wide."""
    x, y = op.operands
    (rows, n), m = x.type.shape, y.type.cols
    dtype = op.attrs["operand_dtype"]
    g = em.expand(gy, op.result.type.shape)

    def ones(r, c):
        return em.const(1.0, r, c)

    def sum_by(spread: Value, width: int, pick_outer) -> Value:
        """``spread @ pickᵀ`` for ``pick = pick_outer(eye)``, ``eye`` the identity's first ``width``
        columns at a padded size."""
        padded = -(-width // 64) * 64
        eye = em.op("eye", [], {"n": padded})
        if padded != width:
            eye = em.op("slice", [eye], {"row0": 0, "rows": padded, "col0": 0, "cols": width})
        summed = em.op("matmul", [spread, pick_outer(eye, padded)], {"operand_dtype": dtype, "ta": False, "tb": True})
        if padded == width:
            return summed
        return em.op("slice", [summed], {"row0": 0, "rows": rows, "col0": 0, "cols": width})

    def dx():
        spread = em.mul(g, em.op("outer", [ones(rows, n), y], {"operand_dtype": dtype}))
        return sum_by(spread, n, lambda eye, p: em.op("outer", [eye, ones(p, m)], {"operand_dtype": dtype}))

    def dy():
        spread = em.mul(g, em.op("outer", [x, ones(rows, m)], {"operand_dtype": dtype}))
        return sum_by(spread, m, lambda eye, p: em.op("outer", [ones(p, n), eye], {"operand_dtype": dtype}))
    return {0: dx, 1: dy}


def _transpose(em, op, gy):
    return {0: lambda: em.op("transpose", [gy])}


def _vector_product(em: Emitter, x: Value, y: Value, tx: bool, ty: bool) -> Value:
    """``op(x) @ op(y)`` when one of its dims is 1 (an outer product, a matrix-vector product), as
    elementwise products and a row or column sum: the code generator takes matmuls of 64-multiples
    (and ``a @ column``), and a degenerate matmul wastes a tensor core. Only vectors are
    transposed."""
    def vector(v: Value, column: bool) -> Value:
        return v if (v.type.cols == 1) == column else em.op("transpose", [v])
    p = x.type.cols if tx else x.type.rows
    q = x.type.rows if tx else x.type.cols
    if q == 1:
        return em.mul(vector(x, column=True), vector(y, column=False))
    if (y.type.rows if ty else y.type.cols) == 1:  # a column: p x 1
        if not tx:
            return em.op("rowsum", [em.mul(x, vector(y, column=False))])
        return em.op("transpose", [em.op("colsum", [em.mul(x, vector(y, column=True))])])
    assert p == 1  # a row: 1 x r
    if not ty:
        return em.op("colsum", [em.mul(y, vector(x, column=True))])
    return em.op("transpose", [em.op("rowsum", [em.mul(y, vector(x, column=False))])])


def _matmul(em, op, gy):
    """``y = A @ B`` with ``A = a`` or ``aᵀ`` (``ta``), ``B = b`` or ``bᵀ`` (``tb``): ``dA = gy Bᵀ``,
    ``dB = Aᵀ gy``, each written as one matmul with the transposes folded into its flags (or as
    elementwise products where a dim is 1)."""
    a, b = op.operands
    ta, tb, dtype = op.attrs["ta"], op.attrs["tb"], op.attrs["operand_dtype"]
    unit = 1 in op.result.type.shape or 1 in a.type.shape

    def mm(x, y, tx, ty):
        if unit:
            return _vector_product(em, x, y, tx, ty)
        return em.op("matmul", [x, y], {"operand_dtype": dtype, "ta": tx, "tb": ty})

    def full():
        return em.expand(gy, op.result.type.shape)
    return {0: lambda: mm(b, full(), tb, True) if ta else mm(full(), b, False, not tb),
            1: lambda: mm(full(), a, True, ta) if tb else mm(a, full(), not ta, False)}


def _sigmoid_of_input(em, op):
    return em.op("sigmoid", [op.operands[0]])


def _one_minus_square(em, op):
    return em.op("sub", [em.const(1.0), em.mul(op.result, op.result)])


def _sigmoid_slope(em, op):
    return em.mul(op.result, em.op("sub", [em.const(1.0), op.result]))


# the rules that read neither the op's operands nor its result (their shapes at most): the reverse
# recomputes nothing for them, so a forward value is recomputed where a rule first reads it
VALUE_FREE = frozenset({"add", "sub", "neg", "rowsum", "colsum", "cast", "cumsum", "segsum", "transpose",
                        "slice", "concat"})

ADJOINTS: dict[str, Rule] = {
    "add": lambda em, op, gy: {0: lambda: gy, 1: lambda: gy},
    "sub": lambda em, op, gy: {0: lambda: gy, 1: lambda: em.neg(gy)},
    "mul": _mul,
    "div": _div,
    "neg": lambda em, op, gy: {0: lambda: em.neg(gy)},
    "abs": _abs,
    "exp": _scaled_by(lambda em, op: op.result),
    "exp2": _scaled_by(lambda em, op: em.mul(op.result, em.const(math.log(2.0)))),
    "log": lambda em, op, gy: {0: lambda: em.op("div", [gy, op.operands[0]])},
    "sqrt": lambda em, op, gy: {0: lambda: em.op("div", [em.mul(gy, em.const(0.5)), op.result])},
    "sin": _scaled_by(lambda em, op: em.op("cos", [op.operands[0]])),
    "cos": _scaled_by(lambda em, op: em.neg(em.op("sin", [op.operands[0]]))),
    "sigmoid": _scaled_by(_sigmoid_slope),
    "softplus": _scaled_by(_sigmoid_of_input),
    "tanh": _scaled_by(_one_minus_square),
    "pow": _pow,
    "maximum": _select_by("ge"),
    "minimum": _select_by("le"),
    "where": _where,
    **{name: _mask for name in MASKS},
    "rowsum": _passthrough,
    "colsum": _passthrough,
    "cast": _passthrough,
    "rowmax": _extreme("rowsum"),
    "colmax": _extreme("colsum"),
    "cumsum": _cumsum,
    "segsum": _segsum,
    "transpose": _transpose,
    "matmul": _matmul,
    "slice": _slice,
    "concat": _concat,
    "linrec": _linrec,
    "trisolve": _trisolve,
    "outer": _outer,
}
