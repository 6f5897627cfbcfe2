"""The typed SSA IR that every backend consumes.

A ``Program`` is a list of ``Op``s; a ``Loop`` op holds a nested body. Every
op produces at most one ``Value`` and remembers the user's source line, so
verifier and backend errors can point at it. Shapes are concrete: a program
is traced once per specialisation (feature dims, dtypes, optional arguments).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import Loc
from .types import DType, TileType

__all__ = ["Value", "Op", "Loop", "Bound", "Program", "format_program"]

_ids = itertools.count()


@dataclass(eq=False)
class Value:
    type: TileType
    id: int = field(default_factory=lambda: next(_ids))

    def __repr__(self) -> str:
        return f"%{self.id}"


@dataclass(eq=False)
class Op:
    """``result = name(operands) {attrs}``."""

    name: str
    operands: tuple[Value, ...]
    attrs: dict[str, Any]
    result: Value | None
    loc: Loc | None

    def walk(self) -> Iterator[Op]:
        yield self


@dataclass(frozen=True)
class Bound:
    """A loop bound taken from an enclosing loop, chunk ``index`` of size ``size``.
    As a loop's ``stop``: run only over the chunks that start before that chunk
    ends (the key loop of causal attention stops at its query block); as its
    ``start``: begin at the chunk holding that chunk's first row (the query
    loop of causal attention's key-gradient program). ``offset`` moves the bound by that many
    rows (clamped to the dim): ``chunks(through=i, window=W)`` starts at row ``i·size - W + 1``,
    ``chunks(start=j, window=W)`` stops after row ``(j+1)·size + W - 2``. ``dim``: the dim of
    ``index``'s loop; a bound on a loop over another dim (queries over T, keys over S) is aligned to
    the ends of the two, as FlashAttention aligns causal cross-attention: its row moves by
    ``len(loop dim) - len(dim)`` (``aligned_shift``)."""

    index: Value
    size: int
    offset: int = 0
    dim: str = "T"

    def aligned_shift(self, loop_dim: str, sizes) -> int:
        """The rows this bound moves by on a loop over ``loop_dim``: 0 on its own dim, else the
        difference of the two lengths (``sizes`` maps dim names to lengths)."""
        return 0 if loop_dim == self.dim else sizes[loop_dim] - sizes[self.dim]

    def __str__(self) -> str:
        return f"{self.index}{self.offset:+d}" if self.offset else str(self.index)


@dataclass(eq=False)
class Loop(Op):
    """A loop over ``dim`` in steps of ``size`` rows.

    ``kind == "chunks"``: sequential; ``carried`` values flow from one
    iteration to the next (``init`` before the loop, ``update`` at the end of
    the body) and are the loop's ``results`` afterwards.
    ``kind == "blocks"``: iterations are independent program instances (the
    grid), so nothing is carried.
    """

    kind: str = "chunks"
    dim: str = "T"
    size: int = 64
    stop: Bound | None = None
    start: Bound | None = None
    reverse: bool = False  # chunks last to first
    index: Value | None = None
    init: list[Value] = field(default_factory=list)
    carried: list[Value] = field(default_factory=list)  # body-side values of the carried state
    update: list[Value] = field(default_factory=list)
    results: list[Value] = field(default_factory=list)
    body: list[Op] = field(default_factory=list)

    def walk(self) -> Iterator[Op]:
        yield self
        for op in self.body:
            yield from op.walk()


@dataclass(eq=False)
class Program:
    """A traced, verified kernel specialisation."""

    name: str
    params: list  # list[tiles.params.BoundParam]
    body: list[Op]
    dims: dict[str, int]
    compute_dtype: DType
    loc: Loc | None = None

    def walk(self) -> Iterator[Op]:
        for op in self.body:
            yield from op.walk()

    def param(self, name: str):
        return next(p for p in self.params if p.name == name)

    def __str__(self) -> str:
        return format_program(self)


def _fmt_attrs(attrs: dict[str, Any]) -> str:
    shown = {k: v for k, v in attrs.items() if v is not None and v is not False}
    return " {" + ", ".join(f"{k}={v}" for k, v in shown.items()) + "}" if shown else ""


def _format_ops(ops: list[Op], indent: str) -> Iterator[str]:
    for op in ops:
        where = f"  # line {op.loc.line}" if op.loc else ""
        if isinstance(op, Loop):
            stop = f", through={op.stop}" if op.stop else ""
            stop += f", start={op.start}" if op.start else ""
            stop += ", reverse" if op.reverse else ""
            carried = ", ".join(f"{c} = {i}" for c, i in zip(op.carried, op.init))
            results = ", ".join(map(repr, op.results))
            head = f"{results} = " if results else ""
            yield f"{indent}{head}{op.kind} {op.index} over {op.dim} by {op.size}{stop} carry({carried}){where}"
            yield from _format_ops(op.body, indent + "  ")
            if op.update:
                yield f"{indent}  yield " + ", ".join(map(repr, op.update))
            continue
        args = ", ".join(map(repr, op.operands))
        head = f"{op.result} = " if op.result is not None else ""
        ty = f" : {op.result.type}" if op.result is not None else ""
        yield f"{indent}{head}{op.name}({args}){_fmt_attrs(op.attrs)}{ty}{where}"


def format_program(program: Program) -> str:
    params = ", ".join(str(p) for p in program.params)
    dims = ", ".join(f"{k}={v}" for k, v in program.dims.items())
    lines = [f"kernel {program.name}({params})  [{dims}; compute {program.compute_dtype}]"]
    lines += _format_ops(program.body, "  ")
    return "\n".join(lines)
