"""Reverse-mode differentiation of tile programs: a forward scan program becomes backward
programs in the same language (an IR→IR transform): the interpreter runs them, and they use only
ops the sm_90a code generator lowers, but for the new ``ChunkState`` parameter kind.

A differentiable program is one ``for c in chunks(...)`` loop (either direction) with carried
state, pure ops before it (the preamble: ``Head``/``Scalar`` reads, constants) and nothing after it
but the final states. Its backward is two programs:

- **states** (in the forward's direction): the forward body, its outputs dropped, writing the
  value of every carried tile *entering* each chunk to a ``ChunkState`` output ``saved_<i>``
  (``[B, H, NC, r, c]``; fla's ``chunk_fwd_h``). Extra memory: ``NC · r · c`` floats per batch
  and head for each carried ``r x c`` tile (``NC = ceil(T / chunk)``), e.g. ``NC·K·V·4`` bytes
  for a ``K x V`` fp32 state;
- **reverse** (``chunks`` in the other direction): per chunk, loads the chunk's inputs, the saved
  entering states and the output gradients ``d_<out>[c]``, recomputes the body's forward values
  (each where an adjoint first reads it), runs the adjoint of each op in reverse order
  (``tiles.adjoints``; ``cast`` passes the gradient straight through), writes ``d_<x>[c]`` for every
  ``Seq``/``GroupSeq`` input ``x`` (a ``GroupSeq`` per head: ``[B, T, H, N]``), carries the state
  gradients back (seeded by the final states' gradients ``d_<state>``; their last value is the
  initial state's gradient, the final state of the same ``State`` parameter ``d_<state>``) and
  accumulates the gradients of preamble values as carried tiles, which after the loop flow back
  through the preamble to ``Head``/``Scalar`` gradients, written once per (batch, head) as the
  final states ``d_<name>`` (``[B, H, 1, cols]``). ``Backward.run`` sums those over the batch and
  the per-head ``GroupSeq`` gradients over each group's heads.

A reverse loop that carries no state gradient (the gradient of an input the states do not depend on,
such as linear attention's q) needs only each chunk's entering state: it runs in the forward's
direction instead, beside the forward's recurrence that recomputes those states (fla's dq kernel),
and reads no checkpoint. The states program runs only for reverse programs that still read them.

Carried values that nothing reads but their own updates go (``passes.drop_dead_carries``: a
gradient that reads no state does not run the recurrence). With ``transpose`` the reverse carries
its 2-D tiles transposed where every op allows (``tiles.transpose_carried``): a gradient whose
matmuls contract the state's columns (linear attention's dq and dk contract V) then contracts its
rows, and its columns split inside a CTA. Its matmuls then read scaled loads unscaled and scale
their products (``tiles.matmul_scalars``): transposed, an incoming gradient such as ``do`` is no
longer cut into column blocks, and its scaled fp32 copy would take a consumer's registers (linear
attention's dk spilled 32 B); as derived, that copy is a column block, cheaper than a product kept
apart from the state it would accumulate into (the delta rules' dk and dw spill with it).

A ``blocks`` grid program (one grid loop, no loop inside it) is differentiated per block: no states
program (nothing is carried), and a reverse grid of the same blocks writing the gradients of the
sequence inputs (a ``Head``/``Scalar``/``State`` input's gradient would sum over the blocks: refused).

Anything else (a ``blocks`` grid with a loop inside, several loops, ``through=``/``start=`` bounds, ops
after the loop, ``Matrix`` parameters, an op without an adjoint rule) raises ``TileError`` naming
the op and the user's line: never a wrong gradient.

On the GPU the code generator lowers ``ChunkState`` loads and stores as fp32 register tiles at
``[b, h, c]``; ``Backward.kernels`` gives the two programs as ``DerivedKernel``s, which the
schedule choice, the compile cache and the launch take as they take a ``Kernel``. A reverse
program whose input gradients contract the state's columns cannot take the forward's column split:
at wide head dims the caller runs it transposed or per column block of the inputs
(``ops.derived_cuda.whole_width``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .adjoints import ADJOINTS, NO_GRADIENT, VALUE_FREE, Emitter
from .errors import TileError
from .interpret import interpret
from .ir import Loop, Op, Program, Value
from .matmul_scalars import scalars_after_matmuls
from .params import Binding, BoundParam, ParamSpec
from .passes import drop_dead_carries, simplify
from .targets import get_target
from .transpose_carried import swapped_state, transpose_carried
from .types import DType, Space, TileType
from .verify import verify

__all__ = ["Backward", "DerivedKernel", "derive_backward", "gradient_groups", "gradients"]

_PARAM_READS = ("load", "read_param", "scalar_param", "load_state")


@dataclass(frozen=True)
class _Shape:
    """A forward program cut into what the backward treats differently."""

    preamble: list[Op]
    loop: Loop
    final_states: list[Op]  # store_state ops after the loop


def _split(program: Program) -> _Shape:
    loops = [i for i, op in enumerate(program.body) if isinstance(op, Loop)]
    if not loops:
        raise TileError(f"cannot differentiate {program.name}: it has no chunks() loop", program.loc)
    loop = program.body[loops[0]]
    if loop.kind == "blocks" and any(isinstance(op, Loop) for op in loop.body):
        raise TileError(f"cannot differentiate {program.name}: a blocks() grid loop with a loop inside (only a "
                        "chunks() scan or a grid of independent blocks is differentiated; a grid program such as "
                        "an online softmax keeps a hand-written backward)", loop.loc)
    if len(loops) > 1:
        raise TileError(f"cannot differentiate {program.name}: only one chunks() loop is supported",
                        program.body[loops[1]].loc)
    if loop.stop is not None or loop.start is not None:
        raise TileError(f"cannot differentiate {program.name}: a chunks() loop with through= or start=",
                        loop.loc)
    for op in loop.body:
        if isinstance(op, Loop):
            raise TileError(f"cannot differentiate {program.name}: a loop nested in the chunks() loop", op.loc)
    after = program.body[loops[0] + 1:]
    for op in after:
        if op.name != "store_state":
            raise TileError(f"cannot differentiate {program.name}: {op.name} after the chunks() loop "
                            "(only the final states may follow it)", op.loc)
    for op in program.body[:loops[0]] + loop.body:
        known = op.name in ADJOINTS or op.name in NO_GRADIENT or op.name in _PARAM_READS or op.name == "store"
        if not known:
            raise TileError(f"cannot differentiate {program.name}: no adjoint rule for {op.name}", op.loc)
        if op.name in ("load", "store") and len(op.operands) != (2 if op.name == "store" else 1):
            raise TileError(f"cannot differentiate {program.name}: {op.attrs['param']} is a Matrix parameter "
                            "(two-index loads)", op.loc)
    return _Shape(program.body[:loops[0]], loop, after)


def _source_param(op: Op, wrt: frozenset[str]) -> bool:
    """Does ``op`` read a parameter whose gradient is wanted?"""
    if op.name == "load_state":
        return op.attrs["initial"] and op.attrs["param"] in wrt
    return op.name in ("load", "read_param", "scalar_param") and op.attrs["param"] in wrt


def _active(shape: _Shape, wrt: frozenset[str]) -> set[Value]:
    """Values that depend on a parameter in ``wrt`` (only they get gradients)."""
    active: set[Value] = set()

    def visit(ops: list[Op]) -> None:
        for op in ops:
            if op.result is None or op.result.type.dtype is DType.bool:
                continue
            if _source_param(op, wrt) or any(v in active for v in op.operands):
                active.add(op.result)

    visit(shape.preamble)
    loop = shape.loop
    active.update(c for c, i in zip(loop.carried, loop.init) if i in active)
    while True:
        visit(loop.body)
        newly = [c for c, u in zip(loop.carried, loop.update) if u in active and c not in active]
        if not newly:
            break
        active.update(newly)
    active.update(r for r, c in zip(loop.results, loop.carried) if c in active)
    return active


class _Grads:
    """Gradients being accumulated, keyed by forward values."""

    def __init__(self, em: Emitter):
        self.em = em
        self.of: dict[Value, Value] = {}

    def add(self, value: Value, contribution: Value) -> None:
        contribution = self.em.reduce_to(contribution, value.type.shape)
        known = self.of.get(value)
        # the newest term first: the lowering accumulates a product in an add's first operand into
        # the other, emitting it at the add, so the earlier product keeps its place and its operands
        # die there (SSD's dB at N = 128: the scaled x and the state's copy held to the add spilled)
        self.of[value] = contribution if known is None else self.em.add(contribution, known)

    def whole(self, value: Value) -> Value:
        """The gradient of ``value`` at its full shape (zeros if nothing reached it)."""
        g = self.of.get(value)
        rows, cols = value.type.shape
        return self.em.const(0.0, rows, cols) if g is None else self.em.expand(g, (rows, cols))


def _backprop(em: Emitter, ops: list[Op], grads: _Grads, active: set[Value], primal: dict[Value, Op]) -> None:
    """Adjoints of the pure ops in ``ops``, last first. ``primal[v]``: the op that recomputed the
    forward value ``v`` in the program being built (its operands possibly renamed)."""
    for op in reversed(ops):
        if op.result is None or op.result not in grads.of or op.name not in ADJOINTS:
            continue
        em.loc = op.loc
        thunks = ADJOINTS[op.name](em, primal[op.result], grads.of[op.result])
        for index, thunk in thunks.items():
            operand = op.operands[index]
            if operand in active:
                grads.add(operand, thunk())


def _copy(op: Op, rename: dict[Value, Value]) -> Op:
    clone = copy.copy(op)
    clone.operands = tuple(rename.get(v, v) for v in op.operands)
    return clone


def _as_output(p: BoundParam) -> BoundParam:
    return replace(p, spec=replace(p.spec, output=True))


def _carried_type(value: Value) -> TileType:
    return replace(value.type, dtype=DType.f32, space=Space.register, row_axis=None, col_axis=None)


def _saved_name(i: int) -> str:
    return f"saved_{i}"


def _states_program(program: Program, shape: _Shape, saved: list[BoundParam]) -> Program:
    loop = shape.loop
    body = [Op("store", (carried, loop.index), {"param": p.name}, None, loop.loc)
            for carried, p in zip(loop.carried, saved)]
    body += [copy.copy(op) for op in loop.body if op.name != "store"]
    states_loop = copy.copy(loop)
    states_loop.body = body
    ops = [copy.copy(op) for op in shape.preamble] + [states_loop]
    simplify(ops)
    params = [p for p in program.params if not p.spec.output] + [_as_output(p) for p in saved]
    return verify(Program(f"{program.name}_states", params, ops, program.dims, program.compute_dtype, program.loc))


class _Reverse:
    """Builds the reverse program: the preamble recomputed, the final states' gradients as seeds,
    the reverse loop, then the preamble's adjoints and the once-per-(batch, head) gradients."""

    def __init__(self, program: Program, shape: _Shape, active: set[Value], params: dict[str, BoundParam],
                 wrt: frozenset[str], grads_given: frozenset[str], fuse: bool = True, scalars_after: bool = False):
        self.program, self.shape, self.active, self.params, self.fuse = program, shape, active, params, fuse
        self.scalars_after = scalars_after  # ``tiles.matmul_scalars`` (``derive_backward``'s ``transpose``)
        self.wrt, self.grads_given = wrt, grads_given
        self.em = Emitter()
        self.top = self.em.ops = [copy.copy(op) for op in shape.preamble]
        self.preamble = {op.result for op in self.top if op.result is not None}
        self.primal: dict[Value, Op] = {op.result: op for op in self.top if op.result is not None}
        self.outer = _Grads(self.em)  # gradients of values outside the loop
        self.pending: dict[Value, Op] = {}  # recomputed body values not emitted yet

    def build(self) -> Program:
        self.seed_final_states()
        loop = self.reverse_loop()
        self.fused = self.fuse and not self.carries_state_gradients and self.shape.loop.kind == "chunks" \
            and bool(self.shape.loop.carried)
        if self.fused:
            loop = self.forward_fused(loop)
        self.top.append(loop)
        self.preamble_gradients()
        if self.scalars_after:
            scalars_after_matmuls(self.top)
        drop_dead_carries(self.top)
        simplify(self.top)
        read = {op.attrs["param"] for top in self.top for op in top.walk() if op.name == "load"}
        params = [p for p in self.program.params if not p.spec.output] + \
            [p for p in self.params.values() if p.spec.kind != "chunk_state" or p.name in read]
        return verify(Program(f"{self.program.name}_bwd", params, self.top, self.program.dims,
                              self.program.compute_dtype, self.program.loc))

    def forward_fused(self, reverse: Loop) -> Loop:
        """``reverse`` run in the forward's direction, recomputing the states it read from the saved
        checkpoints: a reverse loop that carries no state gradient (only order-free sums) needs each
        chunk's entering state and nothing from later chunks, so the forward's own recurrence can
        supply it (no states program, no checkpoints written or read)."""
        forward = self.shape.loop
        rename = {}
        body = []
        for op in reverse.body:
            name = op.attrs.get("param")
            if op.name == "load" and name in self.params and self.params[name].spec.kind == "chunk_state":
                rename[op.result] = forward.carried[int(name.removeprefix("saved_"))]
                continue
            body.append(_copy(op, rename))
        defined = {op.result for op in body if op.result is not None}
        # the recurrence's ops the gradient did not recompute (its outputs' stores dropped)
        body += [copy.copy(op) for op in forward.body if op.name != "store" and op.result not in defined]
        return Loop("loop", (), {}, None, forward.loc, kind=forward.kind, dim=forward.dim, size=forward.size,
                    reverse=forward.reverse, index=forward.index, init=list(forward.init) + list(reverse.init),
                    carried=list(forward.carried) + list(reverse.carried),
                    update=list(forward.update) + [rename.get(u, u) for u in reverse.update],
                    results=[Value(r.type) for r in forward.results] + list(reverse.results), body=body)

    def seed_final_states(self) -> None:
        em = self.em
        for op in self.shape.final_states:
            name, value = op.attrs["param"], op.operands[0]
            if name in self.grads_given and value in self.active:
                em.loc = op.loc
                seed = em.op("load_state", [], {"param": f"d_{name}", "initial": True}, TileType(*value.type.shape))
                self.outer.add(value, seed)

    def reverse_loop(self) -> Loop:
        em, loop, active = self.em, self.shape.loop, self.active
        states = [i for i, c in enumerate(loop.carried) if c in active]
        self.carries_state_gradients = bool(states)
        inits = [self.outer.whole(loop.results[i]) for i in states]  # the final states' gradients
        state_grads = [Value(_carried_type(loop.carried[i])) for i in states]
        body = em.ops = []
        self.recompute(loop)
        inner = _Grads(em)
        for i, g in zip(states, state_grads):
            if loop.update[i] in active:
                inner.add(loop.update[i], g)
        overwritten: set[str] = set()  # outputs a later store writes again: the earlier value is lost
        for op in reversed(loop.body):
            em.loc = op.loc
            name = op.attrs.get("param")
            if op.name == "store":
                value = op.operands[0]
                if name in self.grads_given and value in active and name not in overwritten:
                    slot = TileType(*value.type.shape, self.params[f"d_{name}"].dtype, Space.shared,
                                    value.type.row_axis)
                    inner.add(value, em.op("load", [loop.index], {"param": f"d_{name}"}, slot))
                overwritten.add(name)
            elif op.name == "load" and name in self.wrt:
                em.op("store", [inner.whole(op.result), loop.index], {"param": f"d_{name}"}, None)
            else:
                if op.result in inner.of and op.name in ADJOINTS and op.name not in VALUE_FREE:
                    self.need([*op.operands, op.result])
                _backprop(em, [op], inner, active, self.primal)
        em.loc = loop.loc
        read = {op.attrs["param"] for op in loop.body if op.name == "load"}
        for name in sorted(self.wrt - read):  # a sequence input the program never reads: zero gradient
            p = self.params[f"d_{name}"]
            if p.spec.kind == "seq":
                em.op("store", [em.const(0.0, loop.size, _cols(p)), loop.index], {"param": p.name}, None)
        updates = [inner.whole(loop.carried[i]) for i in states]  # the gradient of the state entering the chunk
        # preamble values the body reads: their gradients summed over the chunks, as carried tiles
        self.summed = [v for v in self.preamble if v in active and v in inner.of]
        sums = [Value(_carried_type(v)) for v in self.summed]
        updates += [em.add(a, inner.whole(v)) for a, v in zip(sums, self.summed)]
        em.ops = self.top
        inits += [em.const(0.0, *v.type.shape) for v in self.summed]
        results = [Value(v.type) for v in state_grads + sums]
        for i, r in zip(states, results):
            if loop.init[i] in active:
                self.outer.add(loop.init[i], r)
        for v, r in zip(self.summed, results[len(states):]):
            self.outer.add(v, r)
        grid = loop.kind == "blocks"  # independent blocks: each block's reverse alone, in the same grid
        return Loop("loop", (), {}, None, loop.loc, kind=loop.kind, dim=loop.dim, size=loop.size,
                    reverse=loop.reverse if grid else not loop.reverse, index=loop.index, init=inits,
                    carried=state_grads + sums, update=updates, results=results, body=body)

    def recompute(self, loop: Loop) -> None:
        """Prepare the body's forward values, from the saved states entering the chunk (each op
        emitted by ``need`` where an adjoint first reads it: late, so it holds registers briefly)."""
        rename: dict[Value, Value] = {}
        for i, c in enumerate(loop.carried):
            p = self.params[_saved_name(i)]
            # typed as the forward's carried value (a float64 program's checkpoints are f64, its states f32)
            saved = Value(TileType(*c.type.shape, c.type.dtype, Space.shared))
            load = Op("load", (loop.index,), {"param": p.name}, saved, loop.loc)
            rename[c] = load.result
            self.pending[load.result] = load
        for op in loop.body:
            if op.result is not None:
                self.primal[op.result] = self.pending[op.result] = _copy(op, rename)

    def need(self, values: list[Value]) -> None:
        """Emit the recomputation of ``values`` (and what they read) not emitted yet."""
        for value in values:
            op = self.pending.pop(value, None)
            if op is not None:
                self.need(list(op.operands))
                self.em.ops.append(op)

    def preamble_gradients(self) -> None:
        """Back through the preamble; then the Head, Scalar and initial-state gradients, one tile
        per (batch, head), as the final states ``d_<name>``."""
        em = self.em
        _backprop(em, self.shape.preamble, self.outer, self.active, self.primal)
        sources = {op.attrs["param"]: op for op in self.shape.preamble if _source_param(op, self.wrt)}
        for name in sorted(self.wrt):
            p = self.params[f"d_{name}"]
            if p.spec.kind != "state":
                continue
            source = sources.get(name)
            em.loc = source.loc if source is not None else self.program.loc
            grad = self.outer.whole(source.result) if source is not None else em.const(0.0, *p.shape[2:])
            em.op("store_state", [grad], {"param": p.name}, None)


def _cols(p: BoundParam) -> int:
    """The width of a sequence parameter's tiles."""
    return 1 if p.spec.dims == (1,) else p.shape[-1]


@dataclass(frozen=True)
class Backward:
    """The derived backward of one forward specialisation.

    ``states``/``reverse``: the two programs (``states`` is None when the reverse reads no checkpoint;
    their parameters carry the shapes of the call that derived them, as a traced program's do);
    ``bindings(binding)``: theirs for one forward call; ``run``: both on the CPU interpreter."""

    forward: Program
    states: Program | None
    reverse: Program
    wrt: tuple[str, ...]
    grads_given: tuple[str, ...]
    fused: bool = False  # the reverse runs forward-fused (``derive_backward``'s ``fuse``)
    transposed: tuple[str, ...] = ()  # State parameters the reverse declares transposed (``transpose``)

    def bindings(self, binding: Binding) -> tuple[Binding | None, Binding]:
        """Bindings of (states, reverse) for a forward call bound as ``binding``."""
        params = _backward_params(self.forward, binding, frozenset(self.wrt), frozenset(self.grads_given))
        sizes = {**binding.sizes, "NC": _chunk_count(self.forward, binding)}
        states = None
        inputs = [p for p in binding.params if not p.spec.output]
        if self.states is not None:
            saved = [_as_output(p) for p in params.values() if p.spec.kind == "chunk_state"]
            states = Binding(inputs + saved, sizes, binding.static, binding.compute_dtype, binding.values)
        declared = {p.name for p in self.reverse.params}  # a forward-fused reverse reads no checkpoints
        reverse = [swapped_state(p) if p.name in self.transposed else p
                   for p in inputs + [p for p in params.values() if p.name in declared]]
        return states, Binding(reverse, sizes, binding.static, binding.compute_dtype, binding.values)

    def kernels(self, kernel, binding: Binding) -> tuple[DerivedKernel | None, DerivedKernel]:
        """(states, reverse) as kernels the code generator launches with ``bindings(binding)``;
        ``kernel``: the forward's, ``binding``: the forward call's (the one that derived this)."""
        parts = ("states", "reverse") if self.states is not None else (None, "reverse")
        return tuple(None if part is None else _derived_kernel(kernel, binding, part, self.wrt, self.grads_given,
                                                               self.fused, bool(self.transposed))
                     for part in parts)

    def run(self, binding: Binding, inputs: dict[str, Any], output_grads: dict[str, Any]) -> dict[str, np.ndarray]:
        """Gradients by input name on the CPU interpreter, in the inputs' layouts (``Head`` summed
        over the batch, ``GroupSeq`` over each group's heads, ``Scalar`` a 0-d array), as fp32
        (float64 in a float64 program) holding values rounded to each input's dtype.
        ``binding``: the forward call's (``Kernel.bind``, which takes torch tensors too);
        ``inputs``: its arguments with NumPy arrays for tensors; ``output_grads``: NumPy arrays by
        the output or state name, one for each of ``grads_given``."""
        states_binding, reverse_binding = self.bindings(binding)
        args = dict(inputs)
        if self.states is not None:
            args.update(interpret(self.states, states_binding, inputs))
        args.update({f"d_{name}": output_grads[name] for name in self.grads_given})
        turn = lambda a: None if a is None else np.swapaxes(a, -1, -2)  # noqa: E731 (transposed States)
        raw = interpret(self.reverse, reverse_binding, {n: turn(a) if n in self.transposed else a
                                                        for n, a in args.items()})
        raw = {n: turn(a) if n in self.transposed else a for n, a in raw.items()}
        # writable copies: a final state may come back as a read-only view
        return {name: np.require(reduce_gradient(binding.param(name), raw[f"d_{name}"], binding.sizes),
                                 requirements="W") for name in self.wrt}


class DerivedKernel:
    """One derived program (``part``: "states" or "reverse") of ``kernel``'s backward at one forward
    call, standing where a ``Kernel`` does for the code generator: ``trace`` takes the derived
    program's binding (``Backward.bindings``) and derives again at its static sizes, so a schedule
    that traces at other widths (``splittable``'s probe) gets the program derived at those."""

    def __init__(self, kernel, forward_binding: Binding, part: str, wrt: tuple[str, ...],
                 grads_given: tuple[str, ...], fuse: bool = True, transpose: bool = False):
        self.kernel, self.forward_binding, self.part = kernel, forward_binding, part
        self.wrt, self.grads_given, self.fuse, self.transpose = wrt, grads_given, fuse, transpose
        self.name = f"{kernel.name}_{'states' if part == 'states' else 'bwd'}"
        self.specs: dict[str, ParamSpec] = {}  # declares no Const parameters of its own
        self._programs: dict[tuple, Program] = {}

    @property
    def transposed(self) -> tuple[str, ...]:
        """The State parameters this program declares transposed (``Backward.transposed``)."""
        if self.part == "states":
            return ()
        return derive_backward(self.kernel, self.forward_binding, self.grads_given, self.wrt, self.fuse,
                               self.transpose).transposed

    def trace(self, binding: Binding, target="cpu") -> Program:
        """The derived program at ``binding``'s static sizes, verified for ``target``."""
        target = get_target(target)
        key = (binding.key(), target.name)
        if key not in self._programs:
            forward = replace(self.forward_binding, static=dict(binding.static))
            backward = derive_backward(self.kernel, forward, self.grads_given, self.wrt, self.fuse, self.transpose)
            program = backward.states if self.part == "states" else backward.reverse
            self._programs[key] = verify(program, target)
        return self._programs[key]


_KERNELS: dict[tuple, DerivedKernel] = {}


def _derived_kernel(kernel, binding: Binding, part: str, wrt: tuple[str, ...],
                    grads_given: tuple[str, ...], fuse: bool, transpose: bool) -> DerivedKernel:
    """One ``DerivedKernel`` per forward specialisation and part: the launch caches compiled kernels
    by the kernel's identity."""
    key = (kernel, binding.key(), part, wrt, grads_given, fuse, transpose)
    if key not in _KERNELS:
        _KERNELS[key] = DerivedKernel(kernel, binding, part, wrt, grads_given, fuse, transpose)
    return _KERNELS[key]


def reduce_gradient(param: BoundParam, g, sizes: dict[str, int]):
    """A reverse program's gradient ``g`` (a NumPy array or a torch tensor) in its input's layout: a
    ``GroupSeq`` one summed over each group's heads, a ``Head`` one over the batch."""
    kind = param.spec.kind
    if kind == "group_seq":
        B, T, H = g.shape[:3]
        return g.reshape(B, T, sizes["G"], H // sizes["G"], *g.shape[3:]).sum(3)
    if kind == "head":
        return g.sum(0).reshape(param.shape)
    if kind == "scalar":
        return g.sum()
    return g


def _chunk_count(program: Program, binding: Binding) -> int:
    loop = next(op for op in program.body if isinstance(op, Loop))
    return math.ceil(binding.sizes[loop.dim] / loop.size)


def _saved_dims(program: Program, loop: Loop, i: int) -> tuple:
    """The dims of carried tile ``i``'s saved copies: the symbols of the ``State`` parameter it
    starts from (so a column split of the state splits its copies alike), else its sizes."""
    init = next((op for op in program.body if op.result is loop.init[i]), None)
    if init is not None and init.name == "load_state":
        return program.param(init.attrs["param"]).spec.dims
    return loop.carried[i].type.shape


def _backward_params(program: Program, binding: Binding, wrt: frozenset[str],
                     grads_given: frozenset[str]) -> dict[str, BoundParam]:
    """The parameters the backward programs add to the forward's inputs, by name."""
    loop = next(op for op in program.body if isinstance(op, Loop))
    sizes = binding.sizes
    B, H = sizes.get("B", 1), sizes.get("H", 1)
    NC = _chunk_count(program, binding)
    state_dtype = DType.f64 if binding.compute_dtype is DType.f64 else DType.f32
    out: dict[str, BoundParam] = {}
    for i, c in enumerate(loop.carried):
        out[_saved_name(i)] = BoundParam(_saved_name(i), ParamSpec("chunk_state", _saved_dims(program, loop, i)),
                                         True, state_dtype, (B, H, NC, *c.type.shape))
    for p in binding.params:
        kind, name = p.spec.kind, f"d_{p.name}"
        if p.spec.output and p.name in grads_given:
            out[name] = BoundParam(name, replace(p.spec, output=False), True, p.dtype, p.shape)
        elif kind == "state" and (p.name in grads_given or p.name in wrt):
            shape = (B, H) + tuple(binding.extent(d) for d in p.spec.dims)
            out[name] = BoundParam(name, p.spec, p.name in grads_given, state_dtype, shape)
        elif p.name in wrt and kind in ("seq", "group_seq"):
            dims = tuple(d for d in p.spec.dims if d != 1)
            shape = (p.shape[0], p.shape[1], H) + tuple(sizes[d] for d in dims)
            out[name] = BoundParam(name, ParamSpec("seq", p.spec.dims, output=True), True, p.dtype, shape)
        elif p.name in wrt and kind in ("head", "scalar"):
            cols = 1 if kind == "scalar" or p.spec.dims == (1,) else binding.extent(p.spec.dims[0])
            out[name] = BoundParam(name, ParamSpec("state", (1, p.spec.dims[0] if kind == "head" else 1)), False,
                                   state_dtype, (B, H, 1, cols))
    taken = {p.name for p in binding.params} & set(out)
    if taken:
        raise TileError(f"cannot differentiate {program.name}: its parameter {sorted(taken)[0]!r} has the name the "
                        "backward gives a gradient; rename it", program.loc)
    return out


def _default_wrt(binding: Binding) -> frozenset[str]:
    return frozenset(p.name for p in binding.params if p.present and not p.spec.output
                     and p.spec.kind in ("seq", "group_seq", "head", "state"))


def _check_grid_wrt(program: Program, binding: Binding, wrt: frozenset[str]) -> None:
    """A ``blocks`` grid program differentiates in its sequence inputs only: a ``Head``, ``Scalar`` or
    ``State`` input's gradient would be a sum over the grid's blocks, which no block owns."""
    for name in sorted(wrt):
        kind = binding.param(name).spec.kind
        if kind not in ("seq", "group_seq"):
            raise TileError(f"cannot differentiate {program.name} in {name!r}: a blocks() grid program gets "
                            f"gradients of its sequence inputs only, not of a {kind} input (its gradient sums "
                            "over the grid's blocks)", program.loc)


_CACHE: dict[tuple, Backward] = {}


def derive_backward(kernel, binding: Binding, grads_given: Iterable[str],
                    wrt: Iterable[str] | None = None, fuse: bool = True, transpose: bool = False) -> Backward:
    """The backward of ``kernel`` specialised as ``binding`` (``Kernel.bind``), cached.

    ``grads_given``: the outputs and states whose gradients the caller passes (the others are
    zero); ``wrt``: the inputs to differentiate (default: every tensor input given; ``Scalar``
    parameters only when named); ``fuse``: run a reverse that carries no state gradient forward,
    beside the recurrence, instead of from checkpoints (module docstring); ``transpose``: the
    reverse carries its 2-D tiles transposed where every op allows (``tiles.transpose_carried``;
    ``Backward.transposed`` names the State parameters it then declares transposed). Raises
    ``TileError`` for a program it cannot differentiate."""
    wrt = _default_wrt(binding) if wrt is None else frozenset(wrt)
    grads_given = frozenset(grads_given)
    for name in wrt | grads_given:
        if name not in {p.name for p in binding.params}:
            raise ValueError(f"{kernel.name} has no parameter {name!r}")
    for name in wrt:
        p = binding.param(name)
        if p.spec.output or not p.present or p.spec.kind not in ("seq", "group_seq", "head", "state", "scalar"):
            raise ValueError(f"wrt: {name!r} is not a tensor or Scalar input given to {kernel.name}")
    for name in grads_given:
        p = binding.param(name)
        if not (p.spec.output or p.spec.kind == "state"):
            raise ValueError(f"grads_given: {name!r} is neither an output nor a state of {kernel.name}")
    key = (kernel, binding.key(), wrt, grads_given, fuse, transpose)
    if key not in _CACHE:
        forward = kernel.trace(binding)
        shape = _split(forward)
        if shape.loop.kind == "blocks":
            _check_grid_wrt(forward, binding, wrt)
        active = _active(shape, wrt)
        params = _backward_params(forward, binding, wrt, grads_given)
        saved = [params[_saved_name(i)] for i in range(len(shape.loop.carried))]
        states = _states_program(forward, shape, saved) if saved else None
        builder = _Reverse(forward, shape, active, params, wrt, grads_given, fuse, scalars_after=transpose)
        reverse = builder.build()
        if not any(p.spec.kind == "chunk_state" for p in reverse.params):
            states = None  # nothing reads the checkpoints
        turned = transpose_carried(reverse) if transpose else None
        reverse, transposed = turned or (reverse, ())
        _CACHE[key] = Backward(forward, states, reverse, tuple(sorted(wrt)), tuple(sorted(grads_given)),
                               builder.fused, transposed)
    return _CACHE[key]


def gradient_groups(kernel, binding: Binding, wrt: Iterable[str]) -> list[tuple[str, ...]]:
    """``wrt`` cut into the gradients each reverse program emits, every group led by its own.

    A one-column gradient (a per-token or per-head scalar: SSD's dt and A) whose forward values all
    lie among another gradient's (the other's adjoints reach every value its own do) rides in that
    program: one more vector output, where a program of its own would re-read every input and redo
    the same adjoints. Wider gradients keep a program each (their live tiles fill the registers)."""
    key = (kernel, binding.key(), frozenset(wrt))
    if key in _GROUPS:
        return _GROUPS[key]
    shape = _split(kernel.trace(binding))
    sources = {name: [op for op in (*shape.preamble, *shape.loop.body) if _source_param(op, frozenset([name]))]
               for name in wrt}  # the ops reading each parameter
    active = {name: _active(shape, frozenset([name])) - {op.result for op in sources[name]}
              for name in wrt}  # the values each gradient's adjoints reach, less its own reads
    groups: dict[str, list[str]] = {}
    for name in sorted(active, key=lambda n: (-len(active[n]), n)):  # the widest reach leads
        vector = all(op.result.type.cols == 1 for op in sources[name])
        host = next((h for h in groups if active[name] <= active[h]), None) if vector else None
        if host is None:
            groups[name] = [name]
        else:
            groups[host].append(name)
    _GROUPS[key] = [tuple(group) for group in groups.values()]
    return _GROUPS[key]


_GROUPS: dict[tuple, list[tuple[str, ...]]] = {}  # gradient_groups' answers (each traces the forward)


def gradients(kernel, inputs: dict[str, Any], output_grads: dict[str, Any],
              wrt: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Gradients of ``kernel`` at ``inputs`` (NumPy arrays by parameter name, as the kernel takes
    them) given ``output_grads`` (by output or state name; missing ones are zero), on the CPU
    interpreter. Returns NumPy arrays by input name in the inputs' layouts."""
    binding = kernel.bind(inputs)
    backward = derive_backward(kernel, binding, output_grads, wrt)
    return backward.run(binding, inputs, output_grads)
