"""One-token steps of a chunked scan program: the recurrent form a decode step runs.

``step_kernel(kernel)`` is ``kernel`` traced with one token per chunk (``chunks(64)`` over T becomes
``chunks(1)``), then specialised to that chunk shape: on a 1 x 1 score tile ``causal`` and
``window`` keep the diagonal (``strict`` gives the fill), ``segsum`` is 0, a one-row ``cumsum`` is
the row (0 if ``exclusive``), ``colsum``/``colmax`` the row, ``in_seq`` the tile (a one-token chunk
lies inside the sequence), ``trisolve`` against a 1 x 1 matrix its right-hand side, and a matmul that
contracts one row (``k.T @ v``) the broadcast product. Constants then fold (``exp(0)``, ``x * 0``,
``x + 0``, ``x * 1``), so the in-chunk quadratic part drops out: what is left reads the state once,
updates it with rank-one terms and reads it against the token's query (one-row matmuls), which the
code generators lower as vector products. The result is an ordinary ``Kernel`` (its name the
program's with ``_step``): it runs on the interpreter and the GPU targets like any other, at any T,
token by token; at T = 1 it is one decode step.

Only forward scans have a step: one ``chunks()`` loop over T (no ``reverse``, ``through`` or
``start``) carrying the program's ``State`` parameters. ``position(c)`` counts the tokens of the
call (0 in a one-token step), not of the whole sequence."""

from __future__ import annotations

import math

from .errors import TileError
from .ir import Loop, Op, Program, Value
from .kernel import Kernel
from .params import Binding
from .passes import simplify
from .rules import ShapeError, infer

__all__ = ["step_kernel", "StepKernel"]


class StepKernel(Kernel):
    """The one-token form of a chunked scan ``Kernel`` (``step_kernel``): the same parameters, traced
    one token per chunk and specialised (module docstring)."""

    def __init__(self, chunked: Kernel):
        super().__init__(chunked.fn, chunked.target_consts, name=f"{chunked.name}_step")
        self.chunked = chunked

    def _trace(self, binding: Binding) -> Program:
        program = super()._trace(binding, token_rows=True)
        loop = _scan_loop(program)
        renamed: dict[Value, Value] = {}
        _specialise(loop.body, renamed)
        loop.update = [_final(v, renamed) for v in loop.update]
        simplify(program.body)
        return program


_STEPS: dict[Kernel, StepKernel] = {}


def step_kernel(kernel: Kernel) -> StepKernel:
    """``kernel``'s one-token step (one per kernel, so its traces and compiled launches are cached):
    the program run token by token, each chunk a single token. ``kernel``: a ``@kernel`` scan, one
    forward ``chunks()`` loop over T carrying its ``State`` parameters; anything else is a
    ``TileError`` when it is traced."""
    if isinstance(kernel, StepKernel):
        return kernel
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel: expected a @kernel program, got {type(kernel).__name__}")
    if not any(spec.kind == "state" for spec in kernel.specs.values()):
        raise TileError(f"{kernel.name} has no State parameter: a one-token step carries a state", kernel.loc)
    if kernel not in _STEPS:
        _STEPS[kernel] = StepKernel(kernel)
    return _STEPS[kernel]


def _scan_loop(program: Program) -> Loop:
    """The program's one forward chunks() loop over T, or a TileError saying why it has no step."""
    loops = [op for op in program.body if isinstance(op, Loop)]
    why = None
    if len(loops) != 1:
        why = f"it has {len(loops)} top-level loops, a step runs one"
    elif loops[0].kind != "chunks" or loops[0].dim != "T":
        why = f"its loop is {loops[0].kind}() over {loops[0].dim}, not chunks() over T"
    elif loops[0].reverse or loops[0].stop is not None or loops[0].start is not None:
        why = "its chunks() loop is reversed or bounded by another loop"
    elif any(op.name in ("load", "store") and program.param(op.attrs["param"]).spec.kind == "chunk_state"
             for op in program.walk()):
        why = "it reads or writes saved chunk states"
    if why:
        raise TileError(f"{program.name}: no one-token step: {why}", loops[0].loc if len(loops) == 1 else program.loc)
    return loops[0]


# -- the specialisation --------------------------------------------------------------------------
_MASKS = ("causal", "window")


def _constant(value: Value, defs: dict[Value, Op]) -> float | None:
    """The fill value of ``value`` if a ``full`` op made it."""
    op = defs.get(value)
    return op.attrs["value"] if op is not None and op.name == "full" else None


def _new(name: str, operands: list[Value], attrs: dict, like: Op) -> Op:
    """An op of ``like``'s line, typed by the rules."""
    result = Value(infer(name, tuple(v.type for v in operands), attrs))
    return Op(name, tuple(operands), attrs, result, like.loc)


def _full(rows: int, cols: int, value: float, like: Op) -> Op:
    return _new("full", [], {"rows": rows, "cols": cols, "value": float(value)}, like)


def _as_result(value: Value, op: Op) -> tuple[list[Op], Value | None]:
    """``value`` standing in for ``op``'s result where it has the result's shape (the ops after it
    are typed again from it: a loaded tile stays in shared memory, in its dtype)."""
    return [], (value if value.type.shape == op.result.type.shape else None)


def _matmul_by_row(op: Op) -> tuple[list[Op], Value]:
    """``a @ b`` contracting one row: the broadcast product of a column and a row."""
    a, b = op.operands
    ops, (x, y) = [], (a, b)
    if op.attrs["ta"]:  # a is 1 x m: its transpose is the column
        ops.append(_new("transpose", [a], {}, op))
        x = ops[-1].result
    if op.attrs["tb"]:  # b is n x 1
        ops.append(_new("transpose", [b], {}, op))
        y = ops[-1].result
    ops.append(_new("mul", [x, y], {}, op))
    return ops, ops[-1].result


def _rule(op: Op, defs: dict[Value, Op]) -> tuple[list[Op], Value | None]:
    """The ops replacing ``op`` in a one-token chunk and the value standing for its result, or
    ``([], None)`` to keep it."""
    name, t = op.name, op.result.type if op.result is not None else None
    operands = op.operands
    if name in _MASKS and t.shape == (1, 1):
        if op.attrs.get("strict"):
            return [_full(1, 1, op.attrs["fill"], op)], None
        return _as_result(operands[0], op)
    if name == "in_seq":
        return _as_result(operands[0], op)
    if name == "segsum":
        return [_full(1, 1, 0.0, op)], None
    if name == "cumsum" and t.rows == 1:
        return ([_full(1, t.cols, 0.0, op)], None) if op.attrs["exclusive"] else _as_result(operands[0], op)
    if name in ("colsum", "colmax") and operands[0].type.rows == 1:
        return _as_result(operands[0], op)
    if name == "trisolve" and operands[0].type.shape == (1, 1):
        return _as_result(operands[1], op)
    if name == "matmul":
        a = operands[0]
        if (a.type.rows if op.attrs["ta"] else a.type.cols) == 1:
            return _matmul_by_row(op)
    return _fold(op, defs)


def _fold(op: Op, defs: dict[Value, Op]) -> tuple[list[Op], Value | None]:
    """Constant folding: ``exp`` of a constant; ``x * 0`` and ``x - x`` (0 even where ``x`` is not
    finite: a strictly masked score's product, a decay from a token to itself); ``x * 1``,
    ``x + 0``, ``x - 0``, ``x / 1`` where ``x`` has the result's shape."""
    name, t = op.name, op.result.type if op.result is not None else None
    consts = [_constant(v, defs) for v in op.operands]
    if name == "exp" and consts[0] is not None:
        return [_full(t.rows, t.cols, _exp(consts[0]), op)], None
    if name not in ("mul", "add", "sub", "div"):
        return [], None
    (a, b), (ca, cb) = op.operands, consts
    if name == "sub" and a is b:
        return [_full(t.rows, t.cols, 0.0, op)], None
    if name == "mul" and 0.0 in (ca, cb) and all(c is None or math.isfinite(c) for c in (ca, cb)):
        return [_full(t.rows, t.cols, 0.0, op)], None
    neutral = {"mul": ((a, cb, 1.0), (b, ca, 1.0)), "add": ((a, cb, 0.0), (b, ca, 0.0)),
               "sub": ((a, cb, 0.0),), "div": ((a, cb, 1.0),)}[name]
    for kept, other, identity in neutral:
        if other == identity:
            ops, value = _as_result(kept, op)
            if value is not None:
                return ops, value
    return [], None


def _exp(x: float) -> float:
    """``exp(x)``, inf where it overflows (as fp32 and the interpreter give it)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _final(value: Value, renamed: dict[Value, Value]) -> Value:
    """What ``value`` became: a replacement may itself have been replaced (a folded product)."""
    while value in renamed:
        value = renamed[value]
    return value


def _retype(op: Op) -> None:
    """``op``'s result typed again from its operands (a constant that replaced one carries no
    positions); a mask that lost them keeps its type, as ``_rule`` replaces it."""
    try:
        typed = infer(op.name, tuple(v.type for v in op.operands), op.attrs)
    except ShapeError as e:
        if op.name in (*_MASKS, "in_seq"):  # rewritten below, whatever its operand's positions
            return
        raise TileError(str(e), op.loc) from None
    if typed is not None:
        op.result.type = typed


def _specialise(body: list[Op], renamed: dict[Value, Value]) -> None:
    """Rewrite ``body`` (a one-token chunk loop's) in place by ``_rule``, each new op folded in
    turn, retyping every op after a replacement by the rules (positions a constant no longer
    carries, say)."""
    defs: dict[Value, Op] = {}
    out: list[Op] = []
    pending = list(reversed(body))
    while pending:
        op = pending.pop()
        if isinstance(op, Loop):
            raise TileError("a step's chunk loop holds no nested loop", op.loc)
        op.operands = tuple(_final(v, renamed) for v in op.operands)
        new, value = [], None
        if op.result is not None:
            _retype(op)
            new, value = _rule(op, defs)
        if not new and value is None:
            out.append(op)
            if op.result is not None:
                defs[op.result] = op
            continue
        renamed[op.result] = value if value is not None else new[-1].result
        pending.extend(reversed(new))
    body[:] = out
