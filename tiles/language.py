"""The primitive operations of the tile language.

All arithmetic is fp32; tiles loaded from bf16/fp16 tensors are widened
exactly. A matmul rounds both operands to the program's compute dtype
(the dtype of the tensors that feed matmuls) and accumulates in fp32, as
tensor cores do — so a bf16 program predicts GPU numerics on the CPU.
"""

from __future__ import annotations

from .builder import ChunkIndex, LoopIter, Tile, current_builder
from .errors import TileError, user_loc
from .types import DType, TileType, dtype_of

__all__ = [
    "chunks", "blocks", "zeros", "full", "exp", "exp2", "log", "sqrt", "sigmoid", "softplus", "tanh",
    "where", "maximum", "minimum", "causal", "window", "in_seq", "rowsum", "rowmax", "colsum",
    "colmax", "cumsum", "segsum", "cast", "sin", "cos", "iota", "eye", "position", "concat", "linrec",
    "trisolve", "outer", "floor",
]


# -- loops --------------------------------------------------------------------
def chunks(size: int = 64, dim: str = "T", through: ChunkIndex | None = None,
           start: ChunkIndex | None = None, reverse: bool = False, window: int | None = None) -> LoopIter:
    """Sequential loop over ``dim`` in chunks of ``size`` rows; variables
    rebound in the body are carried to the next chunk. ``through=i`` stops
    after the chunks that overlap block ``i`` (the causal key range);
    ``start=i`` begins at the chunk that holds block ``i``'s first row (the
    queries that see key block ``i`` under a causal mask). ``reverse=True``
    visits the chunks last to first (a backward pass carrying a gradient back
    in time); the rows within a chunk keep their order.
    ``window=W`` (a positive int) bounds the other end by a causal sliding
    window of ``W`` rows, so the loop visits only the chunks inside it:
    with ``through=i`` it begins at the chunk holding row ``i·bs - W + 1``
    (``bs`` block ``i``'s size; row 0 at the least), the keys block ``i``'s
    queries see under ``window(s, W)``; with ``start=i`` it stops after the
    chunk holding row ``(i+1)·bs + W - 2`` (the end at the most), the queries
    that see key block ``i`` (``window(s, W, transposed=True)``).
    ``through``/``start`` from a loop over another dim (queries over T bounding keys over S) align
    the two dims' ends: the bound's row moves by ``len(dim) - len(its dim)`` (FlashAttention's causal
    cross-attention). A partial last chunk reads zeros past the end and writes nothing there."""
    _check_size(size, "chunks")
    for what, index in (("through", through), ("start", start)):
        if index is not None and not isinstance(index, ChunkIndex):
            raise TileError(f"chunks({what}=...) takes a loop index, got {type(index).__name__}", user_loc())
    if reverse and (through is not None or start is not None):
        raise TileError("chunks(reverse=True) runs over the whole dim: through= and start= are not supported with it",
                        user_loc())
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            raise TileError(f"chunks(window={window!r}): the window must be a positive int (rows)", user_loc())
        if (through is None) == (start is None):
            raise TileError("chunks(window=...) bounds a loop from one end: give it through=i (the keys a query "
                            "block sees) or start=i (the queries that see a key block), not "
                            + ("both" if through is not None else "neither"), user_loc())
    return LoopIter("chunks", size, dim, through, start, bool(reverse), window)


def blocks(size: int = 64, dim: str = "T") -> LoopIter:
    """The parallel grid over ``dim``: one program instance per block of
    ``size`` rows (besides the implicit one per batch and head)."""
    _check_size(size, "blocks")
    return LoopIter("blocks", size, dim, None, None, False)


def _check_size(size, what: str) -> None:
    if not isinstance(size, int) or size <= 0 or size % 16:
        raise TileError(f"{what}({size!r}): the chunk size must be a positive multiple of 16", user_loc())


# -- creation -----------------------------------------------------------------
def full(rows: int, cols: int, value: float) -> Tile:
    """A ``rows x cols`` fp32 tile filled with ``value`` (a dim may be 0: a head dim of 0 is valid)."""
    for d in (rows, cols):
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise TileError(f"full({rows!r}, {cols!r}, ...): dims must be non-negative ints", user_loc())
    return current_builder().emit("full", [], {"rows": rows, "cols": cols, "value": float(value)})


def zeros(rows: int, cols: int) -> Tile:
    return full(rows, cols, 0.0)


def _check_dims(what: str, *dims) -> None:
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
            raise TileError(f"{what}: dims must be positive ints, got {dims!r}", user_loc())


def iota(rows: int, cols: int = 1, axis: int = 0) -> Tile:
    """A ``rows x cols`` tile holding each entry's row index (``axis=0``) or column index
    (``axis=1``) within the tile: ``iota(64)`` is the column vector 0, 1, ..., 63."""
    _check_dims("iota", rows, cols)
    if axis not in (0, 1):
        raise TileError(f"iota(axis={axis!r}): axis must be 0 (rows) or 1 (columns)", user_loc())
    return current_builder().emit("iota", [], {"rows": rows, "cols": cols, "axis": axis})


def eye(n: int) -> Tile:
    """The ``n x n`` identity tile."""
    _check_dims("eye", n)
    return current_builder().emit("eye", [], {"n": n})


def position(c: ChunkIndex) -> Tile:
    """The sequence position of each row of chunk ``c`` (``c`` from ``chunks``/``blocks``), as a
    ``size x 1`` column vector: ``c * size + row`` (rotary angles, ALiBi biases, DFT phases)."""
    if not isinstance(c, ChunkIndex):
        raise TileError(f"position(c) takes a loop index, got {type(c).__name__}", user_loc())
    return current_builder().emit("position", [c.value], {}, TileType(c.size, 1, DType.f32, row_axis=c.axis))


def concat(tiles, axis: int = 1) -> Tile:
    """The tiles side by side (``axis=1``: along the columns) or stacked (``axis=0``); the other
    dim must agree. ``x[r0:r1, c0:c1]`` slices a tile back into blocks."""
    if axis not in (0, 1):
        raise TileError(f"concat(axis={axis!r}): axis must be 0 (rows) or 1 (columns)", user_loc())
    if not isinstance(tiles, (list, tuple)) or not tiles:
        raise TileError("concat(tiles): expected a non-empty list of tiles", user_loc())
    b = current_builder()
    return b.emit("concat", [b.as_tile(t) for t in tiles], {"axis": axis})


def outer(x, y) -> Tile:
    """Row by row outer product, flattened: ``out[t, i * y.cols + j] = x[t, i] * y[t, j]``
    (Based's second-order features: ``outer(x, x)`` takes 16 features to 256)."""
    builder = current_builder()
    return builder.emit("outer", [builder.as_tile(x), builder.as_tile(y)],
                        {"operand_dtype": builder.binding.compute_dtype})


# -- elementwise --------------------------------------------------------------
def _unary(name: str, x, **attrs) -> Tile:
    b = current_builder()
    return b.emit(name, [b.as_tile(x)], attrs)


def _nary(name: str, *xs) -> Tile:
    b = current_builder()
    return b.emit(name, [b.as_tile(x) for x in xs], {})


def exp(x) -> Tile:
    return _unary("exp", x)


def exp2(x) -> Tile:
    """``2 ** x``: one hardware instruction. ``exp2(s * c - m * c)`` with ``c = scale · log2(e)``
    is one fused multiply-add and that instruction per element, where ``exp(s * scale - m)``
    takes two more (softmax's inner loop)."""
    return _unary("exp2", x)


def log(x) -> Tile:
    return _unary("log", x)


def floor(x) -> Tile:
    """The largest integer at most ``x``, elementwise; no gradient (block ids from ``iota``:
    ``floor(iota(64) / 16)`` numbers a chunk's 16-row blocks)."""
    return _unary("floor", x)


def sin(x) -> Tile:
    return _unary("sin", x)


def cos(x) -> Tile:
    return _unary("cos", x)


def sqrt(x) -> Tile:
    return _unary("sqrt", x)


def sigmoid(x) -> Tile:
    return _unary("sigmoid", x)


def softplus(x) -> Tile:
    """``log(1 + exp(x))``, computed without overflow."""
    return _unary("softplus", x)


def tanh(x) -> Tile:
    return _unary("tanh", x)


def maximum(a, b) -> Tile:
    return _nary("maximum", a, b)


def minimum(a, b) -> Tile:
    return _nary("minimum", a, b)


def where(cond, a, b) -> Tile:
    """Elementwise select; ``cond`` is a comparison such as ``x > 0``."""
    return _nary("where", cond, a, b)


def cast(x, dtype) -> Tile:
    """Round to ``dtype`` (f16/bf16/f32) and keep computing in fp32."""
    dt = dtype_of(dtype)
    if dt not in (DType.f32, DType.f16, DType.bf16):
        raise TileError(f"unsupported dtype {dtype!r}: expected f32, f16 or bf16", user_loc())
    return _unary("cast", x, dtype=dt)


# -- masks: use the sequence positions a tile's rows and columns cover --------
def causal(x, fill: float = 0.0, transposed: bool = False, strict: bool = False) -> Tile:
    """Keep entries whose column position <= row position; others become ``fill``.
    ``transposed``: ``x`` has the keys on its rows and the queries on its columns (``k @ q.T``,
    a backward pass's transposed scores): keep row position <= column position.
    ``strict``: ``<`` instead of ``<=`` (the diagonal becomes ``fill`` too). Rows and columns on two
    dims (queries over T, keys over S) compare positions counted from the ends of their sequences."""
    return _unary("causal", x, fill=float(fill), transposed=bool(transposed), strict=bool(strict))


def window(x, size: int, fill: float = 0.0, transposed: bool = False) -> Tile:
    """Causal sliding window: keep ``row - size < col <= row`` (``transposed``: rows and
    columns swap roles, as in ``causal``)."""
    if not isinstance(size, int) or size <= 0:
        raise TileError(f"window size must be a positive int, got {size!r}", user_loc())
    return _unary("window", x, size=size, fill=float(fill), transposed=bool(transposed))


def in_seq(x, fill: float = 0.0) -> Tile:
    """Keep columns whose position lies inside the sequence (before T); the
    zero-filled tail of a partial chunk becomes ``fill`` (``-inf`` before a softmax)."""
    return _unary("in_seq", x, fill=float(fill))


# -- reductions and scans -------------------------------------------------------
def rowsum(x) -> Tile:
    """Sum along each row: ``r x c`` → column vector ``r x 1``."""
    return _unary("rowsum", x)


def rowmax(x) -> Tile:
    return _unary("rowmax", x)


def colsum(x) -> Tile:
    """Sum down each column: ``r x c`` → row vector ``1 x c``."""
    return _unary("colsum", x)


def colmax(x) -> Tile:
    return _unary("colmax", x)


def cumsum(x, reverse: bool = False, exclusive: bool = False) -> Tile:
    """Cumulative sum down the rows of a chunk (over its tokens).
    ``reverse`` sums from the end; ``exclusive`` leaves out the row itself."""
    return _unary("cumsum", x, reverse=bool(reverse), exclusive=bool(exclusive))


def linrec(a, b, h0, reverse: bool = False, exclusive: bool = False) -> Tile:
    """The elementwise linear recurrence down the rows of a chunk, ``h_t = a_t * h_{t-1} + b_t``
    from ``h_{-1} = h0`` (a row vector), every row returned: ``h[-1:]`` is the row to carry to the
    next chunk (Mamba-1's selective scan, RG-LRU, minGRU). ``a``, ``b`` broadcast to the result.
    ``reverse`` runs from the last row up (``h_t = a_t * h_{t+1} + b_t``, carry ``h[0:1]``);
    ``exclusive`` returns the state before each row (``h_{t-1}``: ``h0`` first)."""
    builder = current_builder()
    return builder.emit("linrec", [builder.as_tile(x) for x in (a, b, h0)],
                        {"reverse": bool(reverse), "exclusive": bool(exclusive)})


def trisolve(a, b, transposed: bool = False) -> Tile:
    """``x`` solving ``(I + tril(a, -1)) x = b``: ``a``'s strictly lower triangle, a unit diagonal
    (``transposed``: ``(I + tril(a, -1))ᵀ x = b``). Forward substitution, stable where an inverse
    built from matmuls is not (DeltaNet's UT transform with correlated keys):
    ``trisolve(causal(k @ k.T * beta, strict=True), v * beta)``. The substitution is serial down each
    column: for wide right-hand sides, solve ``eye(64)`` and multiply by the inverse as
    ``hi = cast(t, "bf16")`` plus ``t - hi`` (two operands keep its precision; ops/delta_rule.py)."""
    builder = current_builder()
    return builder.emit("trisolve", [builder.as_tile(a), builder.as_tile(b)],
                        {"transposed": bool(transposed), "operand_dtype": builder.binding.compute_dtype})


def segsum(x) -> Tile:
    """Segment sums of a column vector ``x`` (one value per token):
    ``out[i, j] = x[j+1] + ... + x[i]`` for ``j <= i`` (0 on the diagonal) and
    ``-inf`` above it, so ``exp(segsum(log_decay))`` is the causal decay matrix.
    Exact differences, not ``cumsum[i] - cumsum[j]``: no cancellation."""
    return _unary("segsum", x)


# -- Tile operators -------------------------------------------------------------
def _matmul(a, b) -> Tile:
    builder = current_builder()
    a, b = builder.as_tile(a), builder.as_tile(b)
    operands, attrs = [], {"operand_dtype": builder.binding.compute_dtype}
    for tile, flag in ((a, "ta"), (b, "tb")):
        producer = builder.producer(builder.resolve(tile))
        if producer is not None and producer.name == "transpose":
            operands.append(producer.operands[0])  # fold .T into the matmul operand
            attrs[flag] = True
        else:
            operands.append(builder.resolve(tile))
            attrs[flag] = False
    return builder.emit("matmul", operands, attrs)


def _pow(x, n) -> Tile:
    if not isinstance(n, int) or n < 1:
        raise TileError(f"x ** n takes a positive integer n, got {n!r}", user_loc())
    return _unary("pow", x, n=n)


Tile.__add__ = lambda a, b: _nary("add", a, b)
Tile.__radd__ = lambda a, b: _nary("add", b, a)
Tile.__sub__ = lambda a, b: _nary("sub", a, b)
Tile.__rsub__ = lambda a, b: _nary("sub", b, a)
Tile.__mul__ = lambda a, b: _nary("mul", a, b)
Tile.__rmul__ = lambda a, b: _nary("mul", b, a)
Tile.__truediv__ = lambda a, b: _nary("div", a, b)
Tile.__rtruediv__ = lambda a, b: _nary("div", b, a)
Tile.__neg__ = lambda a: _unary("neg", a)
Tile.__abs__ = lambda a: _unary("abs", a)
Tile.__pow__ = _pow
Tile.__lt__ = lambda a, b: _nary("lt", a, b)
Tile.__le__ = lambda a, b: _nary("le", a, b)
Tile.__gt__ = lambda a, b: _nary("gt", a, b)
Tile.__ge__ = lambda a, b: _nary("ge", a, b)
Tile.__eq__ = lambda a, b: _nary("eq", a, b)
Tile.__ne__ = lambda a, b: _nary("ne", a, b)
Tile.__matmul__ = _matmul
Tile.__rmatmul__ = lambda a, b: _matmul(b, a)
Tile.T = property(lambda a: _unary("transpose", a))
Tile.to = cast
