"""The op -> emitter table: the consumer code of each tile-IR op, one small function per op.

Each emitter is ``(lowering, op, decl, out, ind)``: ``decl`` declares the result's register tile
(empty where the result takes over an operand's registers), ``out`` is the result's name, ``ind``
the indentation. Register tiles have one layout on every target (hopper.cuh's ``tm::rt``), so a
target overrides only the entries it lowers otherwise (``Lowering.emitters``): stores, and the
matmul entry points through ``Lowering.matmul_ss``/``matmul_rs``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tilemix.tiles.ir import Op
from tilemix.tiles.types import DType

from .emit import ctype, float_literal
from .structure import token_by_token

if TYPE_CHECKING:
    from .lowering import Lowering

__all__ = ["OP_EMITTERS", "MAPS", "BINARY", "emit_matmul"]

UNARY = {
    "neg": "[](float a) { return -a; }",
    "abs": "[](float a) { return fabsf(a); }",
    "exp": "[](float a) { return tm::f_exp(a); }",
    "exp2": "[](float a) { return tm::ex2(a); }",
    "log": "[](float a) { return tm::f_log(a); }",
    "sqrt": "[](float a) { return tm::f_sqrt(a); }",
    "floor": "[](float a) { return floorf(a); }",
    "sin": "[](float a) { return tm::f_sin(a); }",
    "cos": "[](float a) { return tm::f_cos(a); }",
    "sigmoid": "[](float a) { return tm::f_sigmoid(a); }",
    "softplus": "[](float a) { return tm::f_softplus(a); }",
    "tanh": "[](float a) { return tm::f_tanh(a); }",
}
BINARY = {
    "add": "a + b", "sub": "a - b", "mul": "a * b", "div": "a / b",
    "maximum": "fmaxf(a, b)", "minimum": "fminf(a, b)",
    "lt": "a < b ? 1.0f : 0.0f", "le": "a <= b ? 1.0f : 0.0f",
    "gt": "a > b ? 1.0f : 0.0f", "ge": "a >= b ? 1.0f : 0.0f",
    "eq": "a == b ? 1.0f : 0.0f", "ne": "a != b ? 1.0f : 0.0f",
}
MAPS = frozenset({*UNARY, *BINARY})  # the elementwise maps: they read a ring stage's row view in place


def chunk_state_at(lw: Lowering, op: Op) -> str:
    """The address of the fp32 tile a ``ChunkState`` load or store ``op`` reads or writes: the chunk
    ``[b, h, c]`` of ``[B, H, NC, r, c]``."""
    name, index = op.attrs["param"], op.operands[-1]
    prefix = "out" if lw.program.param(name).spec.output else "ptr"
    size = next(loop.size for loop in lw.plan.loops if loop.index is index)  # the chunk loop it indexes
    chunks = f"((T + {size - 1}) / {size})"
    return (f"{prefix}_{name} + (((long)b * H + h) * {chunks} + {lw.plan.index_name[index.id]}) * "
            f"{_state_size(lw, name)} + {_state_block0(lw, name)}")


def emit_store_chunk_state(lw: Lowering, op: Op, ind: int):
    """A carried tile saved for its chunk (``ChunkState`` output): plain fp32 stores from registers."""
    value = op.operands[0]
    lw.wait_for([value], ind)
    lw.emit(f"tm::store_f32({chunk_state_at(lw, op)}, {_state_ld(lw, op.attrs['param'])}, {lw.reg(value, ind)});",
            ind)


def emit_load(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    """A tile load is a view of its shared memory (ring stage or loaded once); a per-token vector
    is read from the ring where the producer copied it, else from global memory; a saved chunk
    state (``ChunkState``, fp32) straight into registers."""
    param, t, layout = lw.program.param(op.attrs["param"]), op.result.type, lw.layout
    if param.spec.kind == "chunk_state":
        lw.emit(f"{decl} tm::load_f32({out}, {chunk_state_at(lw, op)}, {_state_ld(lw, param.name)});", ind)
        return
    if t.cols > 1:
        mine = f" + wg * {t.rows * t.cols * 2}" if lw.plan.per_consumer(op) else ""
        if op in layout.prologue_offset:
            if not lw.prologue_waited:
                lw.wait_prologue(ind)
                lw.prologue_waited = True
            base = f"smem + {layout.prologue_offset[op]}"
        else:
            base = f"smem + stage * stage_bytes + {layout.load_offset[op]}"
        lw.smem_of[op.result] = (f"({base}{mine})", t.rows)
        return
    if op in layout.col_offset:  # copied into the ring with the chunk's tiles
        mine = f" + wg * {t.rows * 4}" if lw.plan.per_consumer(op) else ""
        at = f"smem + {layout.col_ring} + stage * {layout.col_stage_bytes} + {layout.col_offset[op]}{mine}"
        lw.emit(f"{decl} tm::load_col_shared({out}, (const float*)({at}));", ind)
        lw.ring_vector[op.result] = at
        return
    row0 = f"{lw.plan.index_name[op.operands[0].id]} * {t.rows}"
    length = param.spec.length
    lw.emit(f"{decl} tm::load_col({out}, ptr_{param.name} + {lw.token_base(length)} * H + h, H, {row0}, {length});",
            ind)


def emit_read_param(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    """A ``Head`` parameter: a scalar broadcast, or this head's row of an ``[H, D]`` fp32 tensor
    (the consumer's column block of it under a split of ``D``)."""
    name = op.attrs["param"]
    if op.result.type.cols == 1:
        lw.emit(f"{decl} tm::fill({out}, ptr_{name}[h]);", ind)
        return
    dim = lw.program.param(name).spec.dims[0]
    width = lw.plan.full_dims[dim]
    row = f"ptr_{name} + (long)h * {width} + {_split_col0(lw, dim)}"
    if all(r.name == "slice" for r in lw.live.readers.get(op.result, ())):
        lw.head_rows[op.result] = row  # each slice loads its columns where it is read (a row whole
        return                         # in every thread takes a register per 4 columns)
    lw.emit(f"{decl} tm::load_f32({out}, {row}, {width});", ind)


def emit_scalar_param(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    lw.emit(f"{decl} tm::fill({out}, arg_{op.attrs['param']});", ind)


def _state_extent(lw: Lowering, param_name: str, axis: int) -> int:
    """A whole ``[r, c]`` state tile's rows (``axis`` 0) or columns (1): every consumer's blocks."""
    dim = lw.program.param(param_name).spec.dims[axis]
    return dim if isinstance(dim, int) else lw.plan.full_dims[dim]


def _state_ld(lw: Lowering, param_name: str) -> int:
    return _state_extent(lw, param_name, 1)


def _state_size(lw: Lowering, param_name: str) -> int:
    """The floats of a whole ``[r, c]`` state tile: one ``[b, h]`` (or chunk) apart from the next."""
    return _state_extent(lw, param_name, 0) * _state_ld(lw, param_name)


def _split_col0(lw: Lowering, dim: str) -> str:
    """Column offset of this consumer's block of feature dim ``dim`` (0 where it is not split)."""
    width = dict(lw.schedule.split).get(dim)
    return f"(colcta * {lw.schedule.consumers} + wg) * {width}" if width else "0"


def _state_block0(lw: Lowering, param_name: str) -> str:
    """Offset of this consumer's block in an ``[r, c]`` state tile: its rows under a split of the
    rows' dim (a gradient program whose ops all keep the state's rows apart), else its columns."""
    rows, cols = lw.program.param(param_name).spec.dims
    split = dict(lw.schedule.split)
    if rows in split and cols in split:
        lw.fail(f"state {param_name!r} cannot be split along both its rows ({rows}) and columns ({cols})")
    if rows in split:
        return f"{_split_col0(lw, rows)} * {_state_ld(lw, param_name)}"
    return _split_col0(lw, cols)


def _pairs(lw: Lowering) -> str:
    """``<true>`` (the state moved in 8-byte pairs) in a token-by-token program (a decode step), which
    moves little else; other kernels keep the scalar moves and their registers."""
    return "<true>" if token_by_token(list(lw.plan.loops)) else ""


def emit_load_state(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    param = op.attrs["param"]
    width = _state_ld(lw, param)
    if op.attrs["initial"]:
        lw.emit(f"{decl} tm::load_f32{_pairs(lw)}({out}, init_{param} + ((long)b * H + h) * "
                f"{_state_size(lw, param)} + {_state_block0(lw, param)}, {width});", ind)
    else:
        lw.emit(f"{decl} tm::fill({out}, 0.0f);", ind)


def emit_store_state(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    param, value = op.attrs["param"], op.operands[0]
    width = _state_ld(lw, param)
    lw.emit(f"if (final_{param}) tm::store_f32{_pairs(lw)}(final_{param} + ((long)b * H + h) * "
            f"{_state_size(lw, param)} + {_state_block0(lw, param)}, {width}, {lw.reg(value, ind)});", ind)


def emit_full(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    lw.emit(f"{decl} tm::fill({out}, {float_literal(op.attrs['value'])});", ind)


def emit_generated(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    """``iota``, ``eye``, ``position``: each entry a function of its row and column."""
    if op.name == "iota":
        value = "row" if op.attrs["axis"] == 0 else "col"
    elif op.name == "eye":
        value = "row == col ? 1 : 0"
    else:
        value = f"{lw.plan.index_name[op.operands[0].id]} * {op.result.type.rows} + row"
    lw.emit(f"{decl} tm::generate({out}, [&](int row, int col) {{ return (float)({value}); }});", ind)


def _register_block(lw: Lowering, op: Op, row0: int, col0: int, what: str) -> str:
    """``<row0, col0>``: a block's corner, where register tiles split (64-row blocks, 8-column ones)."""
    if row0 % 64 or col0 % 8 or any(d % 64 for d in (op.result.type.rows, *(x.type.rows for x in op.operands))
                                    if d != 1):
        lw.fail(f"{what} of register tiles take rows in multiples of 64 (columns in multiples of 16)", op)
    return f"<{row0}, {col0}>"


def emit_slice(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    a = op.attrs
    if op.operands[0] in lw.head_rows:
        lw.emit(f"{decl} tm::load_row_here({out}, {lw.head_rows[op.operands[0]]} + {a['col0']});", ind)
        return
    scan, carry = lw.linrec_carry.get(op.operands[0], (None, None))
    if scan is not None and _takes_last_row(scan, op):  # a scan's last row: its carry (emit_linrec)
        lw.emit(f"{decl} {out} = {carry};", ind)
        return
    if a["rows"] == 1 and op.operands[0].type.rows > 1:  # one row: from the warp that holds it
        if (a["col0"], a["cols"]) != (0, op.operands[0].type.cols):
            lw.fail("a one-row slice takes every column (x[r:r+1], then slice the columns)", op)
        lw.emit(f"{decl} tm::take_row<{a['row0']}>({out}, {lw.reg(op.operands[0], ind)}, scratch, {lw.bar});", ind)
        return
    if a["cols"] == 1 and op.operands[0].type.cols > 1:  # one column: where it lies, in shared memory or a lane
        if (a["row0"], a["rows"]) != (0, op.operands[0].type.rows):
            lw.fail("a one-column slice takes every row (x[:, c:c+1], then slice the rows)", op)
        lw.emit(f"{decl} tm::take_col<{a['col0']}>({out}, {lw.elementwise(op.operands[0], ind)});", ind)
        return
    corner = _register_block(lw, op, op.attrs["row0"], op.attrs["col0"], "slices")
    lw.emit(f"{decl} tm::slice{corner}({out}, {lw.reg(op.operands[0], ind)});", ind)


def emit_concat(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    lw.emit(decl, ind)
    offset = 0
    for x in op.operands:
        corner = (offset, 0) if op.attrs["axis"] == 0 else (0, offset)
        lw.emit(f"tm::place{_register_block(lw, op, *corner, 'concat')}({out}, {lw.reg(x, ind)});", ind)
        offset += x.type.rows if op.attrs["axis"] == 0 else x.type.cols


def emit_linrec(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    if op.result.type.rows % 64:
        lw.fail("linrec runs down register tiles of rows in multiples of 64", op)
    flags = f"{str(op.attrs['reverse']).lower()}, {str(op.attrs['exclusive']).lower()}"
    args = ", ".join(lw.reg(x, ind) for x in op.operands)
    carry = ""
    if not op.attrs["exclusive"] and any(_takes_last_row(op, r) for r in lw.live.readers.get(op.result, ())):
        lw.linrec_carry[op.result] = (op, f"{out}_carry")  # the scan's last row, every thread's at its end
        lw.emit(f"tm::rt<1, {op.result.type.cols}> {out}_carry;", ind)
        carry = f", &{out}_carry"
    lw.emit(f"{decl} tm::linrec_rows<{flags}>({out}, {args}, scratch, {lw.bar}{carry});", ind)


def _takes_last_row(scan: Op, reader: Op) -> bool:
    """Whether ``reader`` slices the whole row of ``scan``'s result that its scan order ends on."""
    rows, cols = scan.result.type.shape
    a = reader.attrs
    return reader.name == "slice" and (a["rows"], a["col0"], a["cols"]) == (1, 0, cols) \
        and a["row0"] == (0 if scan.attrs["reverse"] else rows - 1)


def emit_trisolve(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    a, b = op.operands
    if a.type.rows % 64:
        lw.fail("trisolve takes square tiles of rows in multiples of 64", op)
    lw.emit(f"{decl} tm::trisolve<{str(op.attrs['transposed']).lower()}>({out}, {lw.reg(a, ind)}, "
            f"{lw.reg(b, ind)}, scratch, {lw.bar});", ind)


def emit_outer(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    x, y = op.operands
    if y.type.cols % 8 or (x.type.cols > 1 and x.type.cols % 8):
        lw.fail("outer lowers for operands of 1 or a multiple of 8 columns", op)
    lw.emit(f"{decl} tm::outer_rows({out}, {lw.reg(x, ind)}, {lw.reg(y, ind)});", ind)


def emit_unary(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    lw.emit(f"{decl} tm::map1({out}, {UNARY[op.name]}, {lw.reg(op.operands[0], ind)});", ind)


def emit_pow(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    body = " * ".join(["a"] * op.attrs["n"])
    lw.emit(f"{decl} tm::map1({out}, [](float a) {{ return {body}; }}, {lw.reg(op.operands[0], ind)});", ind)


def emit_binary(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    a, b = op.operands
    lw.emit(f"{decl} tm::map2({out}, [](float a, float b) {{ return {BINARY[op.name]}; }}, "
            f"{lw.elementwise(a, ind)}, {lw.elementwise(b, ind)});", ind)


def emit_where(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    lw.emit(f"{decl} tm::map3({out}, [](float c, float a, float b) {{ return c != 0.0f ? a : b; }}, "
            f"{', '.join(lw.reg(x, ind) for x in op.operands)});", ind)


def emit_cast(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    dtype = op.attrs["dtype"]
    flag = "true" if dtype is DType.bf16 else "false"
    fn = "[](float a) { return a; }" if dtype is DType.f32 else f"[](float a) {{ return tm::round16<{flag}>(a); }}"
    lw.emit(f"{decl} tm::map1({out}, {fn}, {lw.reg(op.operands[0], ind)});", ind)


def emit_mask(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    """``causal``, ``window``, ``in_seq``. The masks keep a corner-bounded region, so a tile whose
    two far corners are kept is kept whole: most chunks skip the per-element test."""
    t, index_name = op.result.type, lw.plan.index_name
    col = f"({index_name[t.col_axis.index]} * {t.col_axis.size} + col)"
    if op.name == "in_seq":
        keep = f"{col} < {t.col_axis.dim}"
    else:
        # rows on another dim than the columns (queries on T, keys on S): moved onto the columns' dim,
        # the two aligned at their ends
        shift = "" if t.row_axis.dim == t.col_axis.dim else f" + ({t.col_axis.dim} - {t.row_axis.dim})"
        row = f"({index_name[t.row_axis.index]} * {t.row_axis.size} + row{shift})"
        query, key = (col, row) if op.attrs.get("transposed") else (row, col)
        keep = f"{key} {'<' if op.attrs.get('strict') else '<='} {query}"
        if op.name == "window":
            keep += f" && {key} > {query} - {op.attrs['size']}"
    src, fn = lw.reg(op.operands[0], ind), f"keep{op.result.id}"
    lw.emit(f"auto {fn} = [&](int row, int col) {{ return {keep}; }};", ind)
    whole = f"{fn}(0, {t.cols - 1}) && {fn}({t.rows - 1}, 0)"
    masked = f"tm::mask({out}, {src}, {fn}, {float_literal(op.attrs['fill'])});"
    if out == src:
        lw.emit(f"if (!({whole})) {masked}", ind)
    else:
        lw.emit(decl, ind)
        lw.emit(f"if ({whole}) {out} = {src}; else {masked}", ind)


def emit_reduce_rows(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    red = "tm::op_sum()" if op.name == "rowsum" else "tm::op_max()"
    lw.emit(f"{decl} tm::reduce_rows({out}, {lw.reg(op.operands[0], ind)}, {red});", ind)


def emit_reduce_cols(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    x = op.operands[0]
    if op.name == "colsum" and x in lw.plan.scanned:  # the scan's last row: no exchange of its own
        lw.emit(f"{decl} tm::fill({out}, {lw.scan(x, ind)}[{2 * x.type.rows - 1}]);", ind)
        return
    red = "tm::op_sum()" if op.name == "colsum" else "tm::op_max()"
    lw.emit(f"{decl} tm::reduce_cols({out}, {lw.reg(x, ind)}, {red}, scratch, {lw.bar});", ind)


def emit_transpose(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    x = op.operands[0]
    t = x.type  # a vector (tiles.lowerable)
    if t.rows == 1 and t.cols == 1:
        lw.emit(f"{decl} {out} = {lw.reg(x, ind)};", ind)
    elif op.result in lw.live.shared_rows:
        lw.emit(f"const tm::shared_row<{t.rows}> {out}{{(const float*)({lw.ring_vector[x]})}};", ind)
    else:
        lw.emit(f"{decl} tm::transpose({out}, {lw.reg(x, ind)}, transposed, {lw.bar});", ind)


def emit_cumsum(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    x, a = op.operands[0], op.attrs
    flags = f"{str(a['reverse']).lower()}, {str(a['exclusive']).lower()}"
    if x.type.cols > 1:
        lw.emit(f"{decl} tm::cumsum_rows({out}, {lw.reg(x, ind)}, {flags}, scratch, {lw.bar});", ind)
    else:
        lw.emit(f"{decl} tm::cumsum({out}, {lw.scan(x, ind)}, {flags});", ind)


def emit_segsum(lw: Lowering, op: Op, decl: str, out: str, ind: int):
    lw.emit(f"{decl} tm::segsum({out}, {lw.scan(op.operands[0], ind)});", ind)


def emit_matvec(lw: Lowering, op: Op, decl: str, out: str, ind: int, accumulate: bool):
    """``a @ x`` with x a column (or ``a @ y.T``, y a row): products along the rows and a row sum,
    operands rounded to 16 bits as a matmul's are."""
    a, b = op.operands
    lw.wait_for([a, b], ind)
    k, tag = a.type.cols, f"mv{op.result.id}"
    round16 = f"[](float v) {{ return tm::round16<{lw.is_bf16}>(v); }}"
    row = lw.reg(b, ind)
    if not op.attrs["tb"]:  # a column: as a row
        lw.emit(f"tm::rt<1, {k}> {tag}_row; tm::transpose({tag}_row, {row}, transposed, {lw.bar});", ind)
        row = f"{tag}_row"
    lw.emit(f"tm::rt<1, {k}> {tag}_b; tm::map1({tag}_b, {round16}, {row});", ind)
    lw.emit(f"{ctype(a.type)} {tag}_p; tm::map1({tag}_p, {round16}, {lw.reg(a, ind)});", ind)
    lw.emit(f"tm::map2({tag}_p, [](float x, float y) {{ return x * y; }}, {tag}_p, {tag}_b);", ind)
    if accumulate:
        lw.emit(f"{ctype(op.result.type)} {tag}_s; tm::reduce_rows({tag}_s, {tag}_p, tm::op_sum());", ind)
        lw.emit(f"tm::map2({out}, [](float x, float y) {{ return x + y; }}, {out}, {tag}_s);", ind)
    else:
        lw.emit(decl, ind)
        lw.emit(f"tm::reduce_rows({out}, {tag}_p, tm::op_sum());", ind)


def emit_vecmat(lw: Lowering, op: Op, decl: str, out: str, ind: int, accumulate: bool):
    """``x @ b`` with x a row (or ``a.T @ b``, a a column): without ``tb``, b's rows scaled by x as a
    column and summed down the columns; with it, b's rows times x summed along them and the column
    transposed. Operands are rounded to 16 bits as a matmul's are."""
    a, b = op.operands
    lw.wait_for([a, b], ind)
    ta, tb = op.attrs["ta"], op.attrs["tb"]
    k, n, tag = (a.type.rows if ta else a.type.cols), op.result.type.cols, f"mv{op.result.id}"
    round16 = f"[](float v) {{ return tm::round16<{lw.is_bf16}>(v); }}"
    x, shape = lw.reg(a, ind), f"1, {k}" if tb else f"{k}, 1"  # x as the products broadcast it
    if ta == tb:  # a row to a column, or a column to a row
        lw.emit(f"tm::rt<{shape}> {tag}_x; tm::transpose({tag}_x, {x}, transposed, {lw.bar});", ind)
        x = f"{tag}_x"
    lw.emit(f"tm::rt<{shape}> {tag}_a; tm::map1({tag}_a, {round16}, {x});", ind)
    lw.emit(f"{ctype(b.type)} {tag}_p; tm::map1({tag}_p, {round16}, {lw.reg(b, ind)});", ind)
    lw.emit(f"tm::map2({tag}_p, [](float x, float y) {{ return x * y; }}, {tag}_p, {tag}_a);", ind)
    result = f"{tag}_s" if accumulate else out
    if not accumulate:
        lw.emit(decl, ind)
    else:
        lw.emit(f"{ctype(op.result.type)} {result};", ind)
    if tb:
        lw.emit(f"tm::rt<{n}, 1> {tag}_c; tm::reduce_rows({tag}_c, {tag}_p, tm::op_sum());", ind)
        lw.emit(f"tm::transpose({result}, {tag}_c, transposed, {lw.bar});", ind)
    else:
        lw.emit(f"tm::reduce_cols({result}, {tag}_p, tm::op_sum(), scratch, {lw.bar});", ind)
    if accumulate:
        lw.emit(f"tm::map2({out}, [](float x, float y) {{ return x + y; }}, {out}, {result});", ind)


def emit_matmul(lw: Lowering, op: Op, decl: str, out: str, ind: int, accumulate: bool = False):
    """A matmul through the target's entry points: A from registers (``matmul_rs``) or shared
    memory (``matmul_ss``), B from shared memory; on an asynchronous target one group in flight."""
    a, b = op.operands
    ta, tb = op.attrs["ta"], op.attrs["tb"]
    m, n = op.result.type.rows, op.result.type.cols
    k = a.type.rows if ta else a.type.cols
    if n == 1 and not ta:
        emit_matvec(lw, op, decl, out, ind, accumulate)
        return
    if m == 1:
        emit_vecmat(lw, op, decl, out, ind, accumulate)
        return
    b_ptr, b_rows = lw.shared(b, ind)
    acc = str(accumulate).lower()
    if not ta and a not in lw.smem_of and a not in lw.staged_early:
        a_reg = lw.reg(a, ind)
        lw.wait_for([a], ind)
        if decl:
            lw.emit(decl, ind)
        lw.emit(f"{lw.matmul_rs}<{lw.is_bf16}, {str(tb).lower()}, {acc}, {b_rows}>({out}, {a_reg}, {b_ptr});", ind)
    else:
        a_ptr, a_rows = lw.shared(a, ind)
        if decl:
            lw.emit(decl, ind)
        lw.emit(f"{lw.matmul_ss}<{lw.is_bf16}, {str(ta).lower()}, {str(tb).lower()}, {acc}, {a_rows}, "
                f"{b_rows}, {m}, {n}, {k}>({out}, {a_ptr}, {b_ptr});", ind)
    if lw.asynchronous:
        lw.in_flight.append(out)


def emit_store_col(lw: Lowering, op: Op, ind: int):
    """A per-token fp32 value (a column stored to a ``Seq[1]`` output): plain stores."""
    value, index = op.operands[0], op.operands[1]
    row0 = f"{lw.plan.index_name[index.id]} * {value.type.rows}"
    lw.wait_for([value], ind)
    length = lw.program.param(op.attrs["param"]).spec.length
    lw.emit(f"tm::store_col(out_{op.attrs['param']} + {lw.token_base(length)} * H + h, H, {row0}, {length}, "
            f"{lw.reg(value, ind)});", ind)


def store_entry(tile_store):
    """The ``"store"`` entry of a target whose tiles leave through ``tile_store``: per-token values and
    saved chunk states are stored the same way on every target."""
    def emit_store(lw: Lowering, op: Op, decl: str, out: str, ind: int):
        kind = lw.program.param(op.attrs["param"]).spec.kind
        if op.operands[0].type.cols == 1 and kind == "seq":  # one fp32 value per token
            emit_store_col(lw, op, ind)
        elif kind == "chunk_state":
            emit_store_chunk_state(lw, op, ind)
        else:
            tile_store(lw, op, decl, out, ind)
    return emit_store


OP_EMITTERS = {
    "load": emit_load, "read_param": emit_read_param, "scalar_param": emit_scalar_param,
    "load_state": emit_load_state, "store_state": emit_store_state, "full": emit_full,
    **dict.fromkeys(("iota", "eye", "position"), emit_generated), "slice": emit_slice, "concat": emit_concat,
    "linrec": emit_linrec, "trisolve": emit_trisolve, "outer": emit_outer,
    **dict.fromkeys(UNARY, emit_unary), "pow": emit_pow, **dict.fromkeys(BINARY, emit_binary),
    "where": emit_where, "cast": emit_cast, **dict.fromkeys(("causal", "window", "in_seq"), emit_mask),
    **dict.fromkeys(("rowsum", "rowmax"), emit_reduce_rows), **dict.fromkeys(("colsum", "colmax"), emit_reduce_cols),
    "transpose": emit_transpose, "cumsum": emit_cumsum, "segsum": emit_segsum, "matmul": emit_matmul,
}
