"""Tracing: running the user's Python function builds the IR.

The function is called once with handles in place of tensors. Arithmetic
on a ``Tile`` handle records an op; ``for c in chunks(64)`` records a loop
whose body is the Python loop body, traced once. Which variables the loop
carries is read off the caller's local variables: a name bound to a tile
before the loop and rebound to a tile computed in the body is loop-carried
(``s = s + k.T @ v`` or ``s += ...``). Tiles computed in a loop and not
carried cannot be used after it.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import Loc, TileError, user_loc
from .ir import Bound, Loop, Op, Value
from .params import BoundParam
from .rules import ShapeError, infer
from .types import INDEX, Axis, DType, Space, TileType

__all__ = ["Builder", "Tile", "ChunkIndex", "ParamRef", "LoopIter", "current_builder", "building"]

_TRACING = threading.local()  # per thread: the tuner traces candidates in a thread pool


def _stack() -> list[Builder]:
    stack = getattr(_TRACING, "builders", None)
    if stack is None:
        stack = _TRACING.builders = []
    return stack


def current_builder() -> Builder:
    stack = _stack()
    if not stack:
        raise TileError("tile operations can only be used inside a @kernel function while it is traced", user_loc())
    return stack[-1]


@contextmanager
def building(builder: Builder):
    stack = _stack()
    stack.append(builder)
    try:
        yield builder
    finally:
        stack.pop()


class Tile:
    """Handle to an IR value while a program is traced. Operators record ops."""

    __slots__ = ("_value", "_scope", "_redirect", "_dead_after")

    def __init__(self, value: Value, scope: _OpenLoop | None):
        self._value = value
        self._scope = scope
        self._redirect: Tile | None = None  # set when a loop turns this body value into a loop result
        self._dead_after: Loc | None = None  # set when its loop ended without carrying it

    @property
    def type(self) -> TileType:
        return self._value.type

    @property
    def shape(self) -> tuple[int, int]:
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"Tile({self._value!r}: {self.type})"

    def __bool__(self):
        raise TileError("a tile has no truth value while tracing: Python `if`/`and`/`or` on tiles is "
                        "not part of the language; use where(cond, a, b)", user_loc())

    def __iter__(self):
        raise TileError("tiles cannot be iterated; loop over chunks(...) instead", user_loc())

    def __getitem__(self, key):
        """``x[r0:r1, c0:c1]`` (or ``x[r0:r1]``): a block of rows and columns, its bounds multiples
        of 16 (or a whole dim), or one row (``x[-1:]``: the last)."""
        key = key if isinstance(key, tuple) else (key, slice(None))
        if len(key) != 2 or not all(isinstance(k, slice) for k in key):
            raise TileError("tiles cannot be indexed element by element; slice rows and columns "
                            "(x[0:32, 64:128]) or use reductions and masks", user_loc())
        bounds = {}
        for k, n, what in zip(key, self.shape, ("row", "col")):
            if k.step not in (None, 1) or any(b is not None and not isinstance(b, int) for b in (k.start, k.stop)):
                raise TileError(f"tile slices take int bounds and no step, got {k!r}", user_loc())
            start, stop, _ = k.indices(n)
            bounds[f"{what}0"], bounds[f"{what}s"] = start, stop - start
        return current_builder().emit("slice", [self], bounds)

    __hash__ = object.__hash__

    # Arithmetic is defined in language.py, where the ops live.


@dataclass(frozen=True)
class ChunkIndex:
    """The index of a ``chunks``/``blocks`` loop: which chunk of ``dim``."""

    value: Value
    size: int
    dim: str

    @property
    def axis(self) -> Axis:
        return Axis(self.value.id, self.size, self.dim)

    def __bool__(self):
        raise TileError("a loop index has no truth value while tracing", user_loc())


class ParamRef:
    """A global-memory parameter (``Seq``, ``GroupSeq``, ``Matrix``): index it
    with chunk indices to load a tile, assign to store one."""

    def __init__(self, param: BoundParam, static: dict[str, int]):
        self.param = param
        self._static = static

    def __repr__(self) -> str:
        return f"ParamRef({self.param})"

    @property
    def cols(self) -> int:
        """Width of the tiles this parameter loads (its feature dim)."""
        spec = self.param.spec
        if spec.kind == "matrix":
            raise TileError(f"{self.param.name}: a Matrix tile's width is the size of the block that indexes it",
                            user_loc())
        return 1 if spec.dims == (1,) else self._static[spec.dims[0]]

    @property
    def seq_dim(self) -> str:
        """The sequence dim a ``Seq``/``GroupSeq`` parameter runs along (``T``, or the one it was
        declared ``along``): what ``chunks(dim=...)``/``blocks(dim=...)`` over its tiles take."""
        if self.param.spec.kind not in ("seq", "group_seq"):
            raise TileError(f"{self.param.name}: only Seq and GroupSeq parameters run along a sequence", user_loc())
        return self.param.spec.length

    def _indices(self, key, by_number: bool = False) -> tuple[ChunkIndex, ...]:
        """``key`` checked: chunk indices over the parameter's dims (``by_number``: a Seq's may run
        over another dim, a store by block number)."""
        spec = self.param.spec
        key = key if isinstance(key, tuple) else (key,)
        sequence = spec.kind in ("seq", "group_seq")
        want = (spec.length,) if sequence else spec.dims
        if len(key) != len(want) or not all(isinstance(k, ChunkIndex) for k in key):
            what = "one chunk index (for c in chunks(...))" if len(want) == 1 else f"{len(want)} chunk indices"
            raise TileError(f"{self.param.name}[...] takes {what}, got {key!r}", user_loc())
        for k, dim in zip(key, want):
            if k.dim != dim and not (by_number and sequence):
                raise TileError(f"{self.param.name}[...]: an index over {k.dim} cannot address the {dim} axis "
                                f"of {self.param.name} {spec.layout}", user_loc())
        return key

    def _slot_type(self, key: tuple[ChunkIndex, ...]) -> TileType:
        spec = self.param.spec
        if spec.kind == "matrix":
            rows, cols = key
            return TileType(rows.size, cols.size, self.param.dtype, Space.shared, rows.axis, cols.axis)
        return TileType(key[0].size, self.cols, self.param.dtype, Space.shared, key[0].axis, None)

    def __getitem__(self, key) -> Tile:
        if self.param.spec.output:
            raise TileError(f"{self.param.name} is an output; it cannot be read", user_loc())
        key = self._indices(key)
        return current_builder().emit("load", [k.value for k in key], {"param": self.param.name},
                                      self._slot_type(key))

    def __setitem__(self, key, tile) -> None:
        builder = current_builder()
        if not self.param.spec.output:
            raise TileError(f"{self.param.name} is an input; declare it Out[...] to write it", user_loc())
        key = self._indices(key, by_number=True)
        slot = self._slot_type(key)
        tile = builder.as_tile(tile)
        if key[0].dim != self.param.spec.length and self.param.spec.kind != "matrix":
            # by block number: block c of another dim's loop writes rows c·r … c·r + r - 1 (r the
            # tile's rows), one tile per block (flash-decoding's per-split results)
            slot = replace(slot, rows=tile.shape[0])
        if tile.shape != slot.shape:
            raise TileError(f"{self.param.name}[...] = ...: expected a {slot.rows}x{slot.cols} tile, "
                            f"got {tile.type}", user_loc())
        builder.emit("store", [builder.resolve(tile)] + [k.value for k in key], {"param": self.param.name}, None)


@dataclass(eq=False)
class _OpenLoop:
    op: Loop
    parent: _OpenLoop | None
    before: dict[str, Any]
    handles: list[Tile] = field(default_factory=list)


class Builder:
    def __init__(self, binding, static: dict[str, int], token_rows: bool = False):
        self.binding = binding
        self.static = static
        self.token_rows = token_rows  # chunks() over T take one token each (``tiles.step``)
        self.regions: list[list[Op]] = [[]]
        self.open: _OpenLoop | None = None

    # -- values ---------------------------------------------------------
    def resolve(self, tile: Tile) -> Value:
        while tile._redirect is not None:
            tile = tile._redirect
        if tile._dead_after is not None:
            raise TileError(f"this {tile.type} was computed inside the loop at line {tile._dead_after.line} "
                            "and is not carried out of it (rebind a variable defined before the loop to carry it)",
                            user_loc())
        return tile._value

    def as_tile(self, x) -> Tile:
        if isinstance(x, Tile):
            return x
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return self.emit("full", [], {"rows": 1, "cols": 1, "value": float(x)})
        raise TileError(f"expected a tile or a number, got {type(x).__name__}", user_loc())

    def emit(self, name: str, operands: list, attrs: dict, type: TileType | None = "infer",
             loc: Loc | None = None) -> Tile | None:
        loc = loc or user_loc()
        values = tuple(self.resolve(o) if isinstance(o, Tile) else o for o in operands)
        if type == "infer":
            try:
                type = infer(name, tuple(v.type for v in values), attrs)
            except ShapeError as e:
                raise TileError(str(e), loc) from None
        result = Value(type) if type is not None else None
        self.regions[-1].append(Op(name, values, attrs, result, loc))
        if result is None:
            return None
        tile = Tile(result, self.open)
        if self.open is not None:
            self.open.handles.append(tile)
        return tile

    def producer(self, value: Value) -> Op | None:
        for region in reversed(self.regions):
            for op in region:
                if op.result is value:
                    return op
        return None

    # -- loops ----------------------------------------------------------
    def open_loop(self, kind: str, size: int, dim: str, through: ChunkIndex | None, frame_locals: dict,
                  start: ChunkIndex | None = None, reverse: bool = False, window: int | None = None) -> ChunkIndex:
        loc = user_loc()
        if kind == "blocks" and self.open is not None and self.open.op.kind == "chunks":
            raise TileError("blocks() is the parallel grid: it cannot be nested inside a sequential chunks() loop", loc)
        if self.token_rows and kind == "chunks" and dim == "T":
            size = 1
        index = Value(INDEX)
        stop = Bound(through.value, through.size, dim=through.dim) if through is not None else None
        first = Bound(start.value, start.size, dim=start.dim) if start is not None else None
        if window is not None and through is not None:  # the window's first key row
            first = Bound(through.value, through.size, 1 - window, through.dim)
        elif window is not None:  # the window's last query row
            stop = Bound(start.value, start.size, window - 1, start.dim)
        loop = Loop("loop", (), {}, None, loc, kind=kind, dim=dim, size=size, stop=stop, start=first, index=index,
                    reverse=reverse)
        self.regions[-1].append(loop)
        self.regions.append(loop.body)
        self.open = _OpenLoop(loop, self.open, dict(frame_locals))
        return ChunkIndex(index, size, dim)

    def close_loop(self, frame_locals: dict) -> None:
        record = self.open
        loop = record.op
        self.regions.pop()
        self.open = record.parent
        # a name rebound in the body carries its tile, unless that tile died with an earlier loop
        # (``qc = q[c]`` in a second loop is a new name for the chunk, not a carry of the first's)
        rebound = [(name, record.before[name], now) for name, now in frame_locals.items()
                   if isinstance(now, Tile) and isinstance(record.before.get(name), Tile)
                   and now is not record.before[name] and _follow(record.before[name])._dead_after is None]
        if loop.kind == "blocks" and rebound:
            raise TileError(f"blocks() iterations are independent program instances: "
                            f"{rebound[0][0]!r} cannot be carried from one to the next", loop.loc)
        replacements: dict[Value, Value] = {}
        for name, init, update in rebound:
            update = _follow(update)
            if update._scope is not record:
                raise TileError(f"{name!r} is rebound in the loop to a tile computed before it; "
                                "a carried variable must be updated from a value computed in the body", loop.loc)
            init_value = self.resolve(init)
            if init_value.type.shape != update.type.shape:
                raise TileError(f"carried tile {name!r} changes shape: {init_value.type.rows}x{init_value.type.cols} "
                                f"before the loop, {update.type.rows}x{update.type.cols} after one iteration "
                                f"(line {_producer_line(loop.body, update._value)})", loop.loc)
            aliases = [n for n, v in frame_locals.items() if v is init and n != name]
            if aliases and init_value in replacements:
                raise TileError(f"{name!r} and {aliases[0]!r} name the same tile before the loop and are carried "
                                "differently; give each its own tile", loop.loc)
            if aliases and _uses(loop.body, init_value):
                raise TileError(f"{name!r} is carried by the loop but {aliases[0]!r} names its initial value; "
                                "inside the loop it is ambiguous which is meant", loop.loc)
            carried = Value(replace(init_value.type, dtype=DType.f32, space=Space.register, row_axis=None,
                                    col_axis=None))
            replacements[init_value] = carried
            loop.init.append(init_value)
            loop.carried.append(carried)
            loop.update.append(update._value)
        _substitute(loop.body, replacements)
        for (_, _, update), carried in zip(rebound, loop.carried):
            result = Value(carried.type)
            loop.results.append(result)
            handle = Tile(result, self.open)
            if self.open is not None:
                self.open.handles.append(handle)
            _follow(update)._redirect = handle
        for handle in record.handles:
            if handle._redirect is None:
                handle._dead_after = loop.loc

    def check_closed(self) -> None:
        if self.open is not None:
            raise TileError("a chunks()/blocks() loop did not finish: `break`, `return` or an exception inside a "
                            "tile loop is not supported", self.open.op.loc)


class LoopIter:
    """``for c in chunks(...)``: yields one symbolic index, so the body is
    traced once, then closes the loop."""

    def __init__(self, kind: str, size: int, dim: str, through: ChunkIndex | None, start: ChunkIndex | None = None,
                 reverse: bool = False, window: int | None = None):
        self.kind, self.size, self.dim, self.through, self.start = kind, size, dim, through, start
        self.reverse, self.window = reverse, window
        self.state = 0

    def __iter__(self):
        return self

    def __next__(self):
        frame_locals = sys._getframe(1).f_locals
        builder = current_builder()
        self.state += 1
        if self.state == 1:
            return builder.open_loop(self.kind, self.size, self.dim, self.through, frame_locals, self.start,
                                     self.reverse, self.window)
        if self.state == 2:
            builder.close_loop(frame_locals)
        raise StopIteration


def _follow(tile: Tile) -> Tile:
    while tile._redirect is not None:
        tile = tile._redirect
    return tile


def _uses(ops: list[Op], value: Value) -> bool:
    return any(value in op.operands or (isinstance(op, Loop) and value in op.init)
               for top in ops for op in top.walk())


def _substitute(ops: list[Op], mapping: dict[Value, Value]) -> None:
    if not mapping:
        return
    for top in ops:
        for op in top.walk():
            op.operands = tuple(mapping.get(v, v) for v in op.operands)
            if isinstance(op, Loop):
                op.init = [mapping.get(v, v) for v in op.init]
                op.update = [mapping.get(v, v) for v in op.update]


def _producer_line(ops: list[Op], value: Value) -> int | str:
    for top in ops:
        for op in top.walk():
            if op.result is value and op.loc:
                return op.loc.line
    return "?"
