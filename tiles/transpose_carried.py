"""A scan program rewritten to carry its 2-D tiles transposed (an IR→IR transform).

A derived gradient program whose matmuls contract its carried tile's columns (linear attention's dq
reads ``do @ Sᵀ``, its dk ``v @ dSᵀ``: both contract the state's V) cannot cut those columns into
blocks inside a CTA; carried transposed, the contracted columns become rows and the new columns (the
state's rows) split as the forward's do. Every op that touches the carried tiles must then take the
transposed form without a tile transpose (the code generator transposes only vectors and matmul
operands): a matmul swaps its operands and flips its flags (``(A B)ᵀ = Bᵀ Aᵀ``), elementwise ops,
comparisons and constants apply to the transposed operands as they are, a vector is transposed with
``transpose``. The ``State`` parameters the carried tiles start from or end in are declared
transposed (``[B, H, c, r]``): the caller passes and reads them so. A program where some op would
need a whole tile transposed (a mask or a reduction over a carried tile, a load feeding it) is left
as it is (``transpose_carried`` returns None)."""

from __future__ import annotations

import copy
from dataclasses import replace

from .ir import Loop, Op, Program, Value
from .params import BoundParam
from .passes import simplify
from .rules import BINARY, COMPARE, UNARY, infer
from .types import TileType
from .verify import verify

__all__ = ["swapped_state", "transpose_carried"]

# ops whose transposed result is the same op on transposed operands
_ELEMENTWISE = frozenset(UNARY) | frozenset(BINARY) | frozenset(COMPARE) | {"where", "cast", "full"}
UPRIGHT, TURNED = False, True


class _Refused(Exception):
    """Some op would need a 2-D tile transposed."""


def _flipped(t: TileType) -> TileType:
    return replace(t, rows=t.cols, cols=t.rows, row_axis=t.col_axis, col_axis=t.row_axis)


def _tile(v: Value) -> bool:
    """A tile with both dims above 1 (vectors transpose with an op, 1x1 tiles are their transpose)."""
    return v.type.rows > 1 and v.type.cols > 1


def swapped_state(p: BoundParam) -> BoundParam:
    """State parameter ``p`` declared transposed (``[B, H, c, r]``; absent, it stays absent)."""
    shape = (*p.shape[:-2], p.shape[-1], p.shape[-2]) if p.shape else p.shape
    return replace(p, spec=replace(p.spec, dims=p.spec.dims[::-1]), shape=shape)


class _Transposer:
    """Finds the orientations each value can be emitted in (``avail``: UPRIGHT as the program
    computes it, TURNED transposed), demands each in those its readers need, last op first, then
    emits every op once per demanded orientation, in program order."""

    def __init__(self, program: Program, loop: Loop):
        self.program, self.loop = program, loop
        self.turned = {i for i, c in enumerate(loop.carried) if _tile(c)}
        self.native: set[Value] = set()  # values that exist only transposed
        for i in self.turned:
            self.native |= {loop.carried[i], loop.results[i]}
        self.swapped = self._swapped_states()
        self.avail: dict[Value, set[bool]] = {}
        self.demand: dict[Value, set[bool]] = {}
        self.new: dict[tuple[Value, bool], Value] = {}

    def _swapped_states(self) -> set[str]:
        """State parameters read only into a turned tile's start and written only from its end."""
        loop = self.loop
        starts = {loop.init[i] for i in self.turned}
        ends = {loop.results[i] for i in self.turned}
        io = [op for op in self.program.walk() if op.name in ("load_state", "store_state")]
        swapped = {op.attrs["param"] for op in io
                   if (op.result in starts if op.name == "load_state" else op.operands[0] in ends)}
        for op in io:
            if op.attrs["param"] not in swapped:
                continue
            if op.name == "load_state" and op.result in starts:
                self.native.add(op.result)
            elif op.name == "load_state" or op.operands[0] not in ends:
                raise _Refused
        # States no op touches (linear attention's dk never reads the forward's initial state) are
        # declared transposed too: left upright, their columns would still name the dim the carried
        # tiles no longer have as columns, and the schedule would look for column blocks along it.
        touched = {op.attrs["param"] for op in io}
        return swapped | {p.name for p in self.program.params
                          if p.spec.kind == "state" and p.name not in touched and len(p.spec.dims) == 2}

    # -- which orientations each value has ------------------------------------------------------
    def orientations(self, v: Value) -> set[bool]:
        if v in self.native:
            return {TURNED}
        if not _tile(v):
            return {UPRIGHT, TURNED} if UPRIGHT in self.avail.get(v, {UPRIGHT}) else set()
        return self.avail.get(v, {UPRIGHT})  # values from outside the program's ops: the loop index

    def find(self, ops: list[Op]) -> None:
        for op in ops:
            if isinstance(op, Loop):
                self.find(op.body)
                continue
            if op.result is None or op.result in self.native:
                continue
            tiles = [self.orientations(x) for x in op.operands if _tile(x) or x in self.native]
            if op.name == "matmul" or op.name == "transpose":
                avail = {UPRIGHT, TURNED} if all(tiles) else set()
            else:
                avail = set.intersection({UPRIGHT, TURNED}, *tiles)
                if op.name not in _ELEMENTWISE:
                    avail &= {UPRIGHT}
            self.avail[op.result] = avail

    def operand(self, x: Value) -> bool:
        """The orientation a matmul reads ``x`` in (upright where it can)."""
        return UPRIGHT if UPRIGHT in self.orientations(x) else TURNED

    # -- what the readers need -------------------------------------------------------------------
    def want(self, v: Value, turned: bool) -> None:
        if v.type.rows == 1 and v.type.cols == 1:
            turned = UPRIGHT
        if turned not in self.orientations(v):
            raise _Refused
        wanted = self.demand.setdefault(v, set())
        wanted.add(turned)
        if turned and not _tile(v) and v not in self.native:
            wanted.add(UPRIGHT)  # a vector is transposed from its upright value

    def ask(self, op: Op) -> None:
        if op.name == "store_state":
            self.want(op.operands[0], op.attrs["param"] in self.swapped)
            return
        if op.result is None:
            for x in op.operands:
                self.want(x, UPRIGHT)
            return
        for turned in sorted(self.demand.get(op.result, ())):
            if op.result in self.native or (turned and not _tile(op.result)):
                continue  # a swapped state's load; a vector's transpose (its upright value is asked for)
            for x in op.operands:
                if op.name == "matmul":
                    self.want(x, self.operand(x))
                elif op.name == "transpose":
                    self.want(x, UPRIGHT)
                else:
                    self.want(x, turned)

    def ask_all(self, ops: list[Op]) -> None:
        for op in reversed(ops):
            if isinstance(op, Loop):
                for i, u in enumerate(op.update):
                    self.want(u, i in self.turned)
                self.ask_all(op.body)
                for i, v in enumerate(op.init):
                    self.want(v, i in self.turned)
            else:
                self.ask(op)

    # -- the rewritten program -------------------------------------------------------------------
    def get(self, v: Value, turned: bool) -> Value:
        if v.type.rows == 1 and v.type.cols == 1:
            turned = UPRIGHT
        return self.new.get((v, turned), v)

    def emit_all(self, ops: list[Op]) -> list[Op]:
        out: list[Op] = []
        for op in ops:
            if isinstance(op, Loop):
                out.append(self.emit_loop(op))
            elif op.result is None:
                turned = op.name == "store_state" and op.attrs["param"] in self.swapped
                out.append(replace(op, operands=tuple(self.get(x, turned) for x in op.operands)))
            else:
                out += [self.emit(op, turned) for turned in sorted(self.demand.get(op.result, ()))]
        return out

    def emit(self, op: Op, turned: bool) -> Op:
        v, attrs = op.result, dict(op.attrs)
        if v in self.native:  # a swapped state's load
            result = Value(_flipped(v.type))
            self.new[(v, TURNED)] = result
            return replace(op, result=result)
        if turned and not _tile(v):
            operands, name, attrs = (self.get(v, UPRIGHT),), "transpose", {}
        elif op.name == "matmul":
            a, b = op.operands
            oa, ob = self.operand(a), self.operand(b)
            if turned:  # (A B)ᵀ = Bᵀ Aᵀ
                operands = (self.get(b, ob), self.get(a, oa))
                attrs.update(ta=(not op.attrs["tb"]) ^ ob, tb=(not op.attrs["ta"]) ^ oa)
            else:
                operands = (self.get(a, oa), self.get(b, ob))
                attrs.update(ta=op.attrs["ta"] ^ oa, tb=op.attrs["tb"] ^ ob)
            name = "matmul"
        else:
            name = op.name
            operands = tuple(self.get(x, UPRIGHT if name == "transpose" else turned) for x in op.operands)
            if turned and name == "full":
                attrs.update(rows=op.attrs["cols"], cols=op.attrs["rows"])
        if not turned and name == op.name and operands == op.operands and attrs == op.attrs:
            self.new[(v, UPRIGHT)] = v
            return copy.copy(op)
        rtype = infer(name, tuple(x.type for x in operands), attrs)
        if rtype is None or rtype.shape != (_flipped(v.type) if turned else v.type).shape:
            raise _Refused
        result = Value(rtype)
        self.new[(v, turned)] = result
        return Op(name, operands, attrs, result, op.loc)

    def emit_loop(self, loop: Loop) -> Loop:
        def values(vs: list[Value]) -> list[Value]:
            out = []
            for i, v in enumerate(vs):
                if i in self.turned:
                    self.new[(v, TURNED)] = Value(_flipped(v.type))
                out.append(self.new.get((v, TURNED), v) if i in self.turned else v)
            return out
        carried = values(loop.carried)
        init = [self.get(v, i in self.turned) for i, v in enumerate(loop.init)]
        body = self.emit_all(loop.body)
        update = [self.get(u, i in self.turned) for i, u in enumerate(loop.update)]
        return replace(loop, init=init, carried=carried, update=update, results=values(loop.results), body=body)

    def run(self) -> Program:
        self.find(self.program.body)
        self.ask_all(self.program.body)
        body = self.emit_all(self.program.body)
        simplify(body)
        params = [swapped_state(p) if p.name in self.swapped else p for p in self.program.params]
        return verify(replace(self.program, params=params, body=body))


def transpose_carried(program: Program) -> tuple[Program, tuple[str, ...]] | None:
    """``program`` carrying its loop's 2-D tiles transposed, and the ``State`` parameters now
    declared transposed; None where it has no such tile or some op would need one transposed."""
    loops = [op for op in program.body if isinstance(op, Loop) and op.kind == "chunks"]
    if len(loops) != 1 or not any(_tile(c) for c in loops[0].carried):
        return None
    try:
        transposer = _Transposer(program, loops[0])
        return transposer.run(), tuple(sorted(transposer.swapped))
    except _Refused:
        return None
