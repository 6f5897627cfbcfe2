"""The NumPy interpreter: the reference semantics of a tile program.

All (batch, head) program instances run at once: every value is an fp32
(float64 for float64 programs) array of shape ``[B, H, rows, cols]`` (leading dims may be 1 and broadcast).
Loops run in Python, chunk by chunk. Loads past the end of a dimension read
zeros and stores there are dropped — the one place partial chunks are
handled. Output buffers start as NaN, so anything the program fails to
write shows up. Floating-point exceptions are not raised: inf and NaN
propagate as they would on a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .ir import Loop, Op, Program, Value
from .numerics import round_to
from .params import Binding, BoundParam
from .types import DType

__all__ = ["interpret"]


def _to_program_layout(param: BoundParam, array: np.ndarray, sizes: dict[str, int], dtype) -> np.ndarray:
    """Caller layout → ``[B|1, H|1, rows, cols]`` in the working precision."""
    a = np.asarray(array, dtype=dtype)
    kind = param.spec.kind
    if kind in ("seq", "group_seq"):
        if a.ndim == 3:
            a = a[..., None]
        a = a.transpose(0, 2, 1, 3)  # [B, H|G, T, D]
        if kind == "group_seq":
            heads_per_group = sizes["H"] // sizes["G"]
            a = a[:, np.arange(sizes["H"]) // heads_per_group]
        return a
    if kind == "head":
        return a.reshape(1, sizes["H"], 1, -1)
    if kind == "matrix":
        return a[None, None]
    if kind == "chunk_state":  # [B, H, NC, r, c]: chunk c's tile is rows c*r.. of one [B, H, NC*r, c] array
        return a.reshape(a.shape[0], a.shape[1], a.shape[2] * a.shape[3], a.shape[4])
    return a  # state: already [B, H, K, V]


def _from_program_layout(param: BoundParam, a: np.ndarray) -> np.ndarray:
    if param.spec.kind == "matrix":
        return a[0, 0]
    if param.spec.kind == "chunk_state":
        return a.reshape(param.shape)
    out = a.transpose(0, 2, 1, 3)
    return out[..., 0] if len(param.shape) == 3 else out


def _pad_rows(a: np.ndarray, start: int, size: int, axis: int) -> np.ndarray:
    """``size`` rows from ``start`` along ``axis``, zero-filled past the end."""
    taken = np.take(a, np.arange(start, min(start + size, a.shape[axis])), axis=axis)
    missing = size - taken.shape[axis]
    if missing == 0:
        return taken
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, missing)
    return np.pad(taken, pad)


def _segsum(x: np.ndarray) -> np.ndarray:
    rows = x.shape[-2]
    below = np.tril(np.ones((rows, rows), dtype=bool), -1)
    terms = np.where(below, x, x.dtype.type(0))  # terms[i, j] = x[i] for i > j
    sums = np.cumsum(terms, axis=-2, dtype=x.dtype)  # sum of x[k] for j < k <= i
    return np.where(np.tril(np.ones((rows, rows), dtype=bool)), sums, x.dtype.type(-np.inf))


def _cumsum(x: np.ndarray, reverse: bool, exclusive: bool) -> np.ndarray:
    if reverse:
        x = x[..., ::-1, :]
    out = np.cumsum(x, axis=-2, dtype=x.dtype)
    if exclusive:
        out = np.concatenate([np.zeros_like(out[..., :1, :]), out[..., :-1, :]], axis=-2)
    return out[..., ::-1, :] if reverse else out


def _linrec(a: np.ndarray, b: np.ndarray, h0: np.ndarray, reverse: bool, exclusive: bool) -> np.ndarray:
    a, b = np.broadcast_arrays(a, b)
    h = np.broadcast_to(h0, a.shape[:-2] + (1, a.shape[-1]))[..., 0, :]
    out = np.empty(np.broadcast_shapes(a.shape, h0.shape[:-2] + a.shape[-2:]), a.dtype)
    rows = range(a.shape[-2])
    for t in reversed(rows) if reverse else rows:
        before = h
        h = a[..., t, :] * h + b[..., t, :]
        out[..., t, :] = before if exclusive else h
    return out


def _trisolve(a: np.ndarray, b: np.ndarray, transposed: bool) -> np.ndarray:
    """Substitution row by row, in the working precision (as the GPU runs it)."""
    m = np.tril(a, -1)
    if transposed:
        m = np.swapaxes(m, -1, -2)[..., ::-1, ::-1]  # back substitution is forward on reversed rows
        b = b[..., ::-1, :]
    x = np.array(np.broadcast_to(b, np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + b.shape[-2:]))
    for i in range(1, x.shape[-2]):
        x[..., i, :] -= np.matmul(m[..., i:i + 1, :i], x[..., :i, :])[..., 0, :]
    return x[..., ::-1, :] if transposed else x


_UNARY = {
    "neg": np.negative,
    "abs": np.abs,
    "exp": np.exp,
    "exp2": np.exp2,
    "log": np.log,
    "sqrt": np.sqrt,
    "floor": np.floor,
    "sin": np.sin,
    "cos": np.cos,
    "tanh": np.tanh,
    "sigmoid": lambda x: 0.5 * (1.0 + np.tanh(0.5 * x)),
    "softplus": lambda x: np.logaddexp(x.dtype.type(0), x),
}
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
    "maximum": np.maximum, "minimum": np.minimum,
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
    "eq": np.equal, "ne": np.not_equal,
}
_REDUCE = {
    "rowsum": lambda x: x.sum(-1, keepdims=True, dtype=x.dtype),
    "rowmax": lambda x: x.max(-1, keepdims=True),
    "colsum": lambda x: x.sum(-2, keepdims=True, dtype=x.dtype),
    "colmax": lambda x: x.max(-2, keepdims=True),
}


class _Run:
    def __init__(self, program: Program, binding: Binding, inputs: dict[str, Any]):
        self.program = program
        self.sizes = binding.sizes
        self.values = binding.values
        self.env: dict[Value, Any] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.final_state: dict[str, np.ndarray] = {}
        self.chunk_of: dict[int, int] = {}  # loop-index value id -> current chunk
        # the working precision: fp32 as on the GPU, or double for float64 programs (gradient checks)
        self.float = np.float64 if program.compute_dtype is DType.f64 else np.float32
        for p in binding.params:
            if p.spec.kind in ("scalar", "const") or not p.present:
                continue
            if p.spec.output:
                self.arrays[p.name] = _to_program_layout(p, np.full(p.shape, np.nan), self.sizes, self.float)
            else:
                self.arrays[p.name] = _to_program_layout(p, inputs[p.name], self.sizes, self.float)

    # -- positions of a tile's rows/columns, for masks --------------------
    def _positions(self, axis, n: int) -> np.ndarray:
        return self.chunk_of[axis.index] * axis.size + np.arange(n)

    def run_ops(self, ops: list[Op]) -> None:
        for op in ops:
            if isinstance(op, Loop):
                self.run_loop(op)
            else:
                result = self.run_op(op)
                if op.result is not None:
                    self.env[op.result] = result

    def run_loop(self, loop: Loop) -> None:
        end = self.sizes[loop.dim]
        if loop.stop is not None:
            stop = loop.stop
            end = min(end, (self.env[stop.index] + 1) * stop.size + stop.offset
                      + stop.aligned_shift(loop.dim, self.sizes))
        first = 0
        if loop.start is not None:
            start = loop.start
            first = max(0, self.env[start.index] * start.size + start.offset
                        + start.aligned_shift(loop.dim, self.sizes)) // loop.size
        for carried, init in zip(loop.carried, loop.init):
            self.env[carried] = np.asarray(self.env[init], self.float)
        order = range(first, math.ceil(end / loop.size))
        for chunk in reversed(order) if loop.reverse else order:
            self.env[loop.index] = self.chunk_of[loop.index.id] = chunk
            self.run_ops(loop.body)
            for carried, update in zip(loop.carried, loop.update):
                self.env[carried] = self.env[update]
        for result, carried in zip(loop.results, loop.carried):
            self.env[result] = self.env[carried]

    def run_op(self, op: Op):
        args = [self.env[v] for v in op.operands]
        a, name = op.attrs, op.name
        if name in _UNARY:
            return _UNARY[name](args[0])
        if name in _BINARY:
            return _BINARY[name](args[0], args[1])
        if name in _REDUCE:
            return _REDUCE[name](args[0])
        if name == "pow":
            return args[0] ** a["n"]
        if name == "where":
            return np.where(args[0], args[1], args[2]).astype(self.float)
        if name == "full":
            return np.full((1, 1, a["rows"], a["cols"]), a["value"], self.float)
        if name == "iota":
            index = np.indices((a["rows"], a["cols"]))[a["axis"]]
            return index.astype(self.float)[None, None]
        if name == "eye":
            return np.eye(a["n"], dtype=self.float)[None, None]
        if name == "position":
            rows = op.result.type.rows
            return (args[0] * rows + np.arange(rows, dtype=self.float))[None, None, :, None]
        if name == "slice":
            return args[0][..., a["row0"]:a["row0"] + a["rows"], a["col0"]:a["col0"] + a["cols"]]
        if name == "concat":
            lead = np.broadcast_shapes(*(x.shape[:2] for x in args))
            return np.concatenate([np.broadcast_to(x, lead + x.shape[2:]) for x in args], axis=2 + a["axis"])
        if name == "cast":
            return round_to(args[0], a["dtype"])
        if name == "transpose":
            return np.swapaxes(args[0], -1, -2)
        if name == "matmul":
            x, y = (round_to(t, a["operand_dtype"]) for t in args)
            x = np.swapaxes(x, -1, -2) if a["ta"] else x
            y = np.swapaxes(y, -1, -2) if a["tb"] else y
            return np.matmul(x, y, dtype=self.float)
        if name in ("causal", "window", "in_seq"):
            return self.mask(op, args[0])
        if name == "cumsum":
            return _cumsum(args[0], a["reverse"], a["exclusive"])
        if name == "linrec":
            return _linrec(*args, a["reverse"], a["exclusive"])
        if name == "trisolve":
            return _trisolve(args[0], args[1], a["transposed"])
        if name == "outer":
            x, y = args
            out = x[..., :, :, None] * y[..., :, None, :]
            return out.reshape(out.shape[:-2] + (x.shape[-1] * y.shape[-1],))
        if name == "segsum":
            return _segsum(args[0])
        if name == "load":
            return self.load(op, args)
        if name == "store":
            return self.store(op, args)
        if name == "read_param":
            return self.arrays[a["param"]]
        if name == "scalar_param":
            return np.full((1, 1, 1, 1), self.values[a["param"]], self.float)
        if name == "load_state":
            if a["initial"]:
                return self.arrays[a["param"]]
            t = op.result.type
            return np.zeros((1, 1, t.rows, t.cols), self.float)
        if name == "store_state":
            self.final_state[a["param"]] = args[0]
            return None
        raise NotImplementedError(f"interpreter: no rule for op {name!r}")

    def mask(self, op: Op, x: np.ndarray) -> np.ndarray:
        t = op.result.type
        cols = self._positions(t.col_axis, t.cols)[None, :]
        if op.name == "in_seq":
            keep = cols < self.sizes[t.col_axis.dim]
        else:
            rows = self._positions(t.row_axis, t.rows)[:, None] + self._end_shift(t.row_axis, t.col_axis)
            query, key = (cols, rows) if op.attrs.get("transposed") else (rows, cols)
            keep = key < query if op.attrs.get("strict") else key <= query
            if op.name == "window":
                keep &= key > query - op.attrs["size"]
        return np.where(keep, x, self.float(op.attrs["fill"]))

    def _end_shift(self, rows, cols) -> int:
        """What moves row positions onto the columns' dim, the two sequences aligned at their ends
        (queries over T against keys over S: FlashAttention's causal cross-attention); 0 on one dim."""
        return 0 if rows.dim == cols.dim else self.sizes[cols.dim] - self.sizes[rows.dim]

    def load(self, op: Op, indices: list[int]) -> np.ndarray:
        a = self.arrays[op.attrs["param"]]
        t = op.result.type
        out = _pad_rows(a, indices[0] * t.rows, t.rows, axis=2)
        if len(indices) == 2:
            out = _pad_rows(out, indices[1] * t.cols, t.cols, axis=3)
        return out

    def store(self, op: Op, args: list) -> None:
        value, *indices = args
        param = self.program.param(op.attrs["param"])
        dest = self.arrays[param.name]
        value = round_to(value, param.dtype)
        r0 = indices[0] * op.operands[0].type.rows
        rows = slice(r0, min(r0 + op.operands[0].type.rows, dest.shape[2]))
        if len(indices) == 2:
            c0 = indices[1] * op.operands[0].type.cols
            cols = slice(c0, min(c0 + op.operands[0].type.cols, dest.shape[3]))
        else:
            cols = slice(None)
        block = dest[:, :, rows, cols]
        block[...] = np.broadcast_to(value, dest.shape[:2] + value.shape[2:])[
            :, :, : block.shape[2], : block.shape[3]]


def interpret(program: Program, binding: Binding, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run ``program`` on NumPy inputs (caller layouts). Returns every output
    (in caller layout, fp32 holding values rounded to the output dtype) and,
    under each ``State`` parameter's name, its final state ``[B, H, K, V]``."""
    run = _Run(program, binding, inputs)
    with np.errstate(all="ignore"):
        run.run_ops(program.body)
    out = {p.name: _from_program_layout(p, run.arrays[p.name]) for p in binding.params if p.spec.output}
    B, H = binding.sizes.get("B", 1), binding.sizes.get("H", 1)
    for name, state in run.final_state.items():
        out[name] = np.ascontiguousarray(np.broadcast_to(state, (B, H) + state.shape[2:]), dtype=run.float)
    return out
