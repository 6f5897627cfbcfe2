"""Tile programs as PyTorch custom ops (``torch.ops.tilemix.*``): a real kernel that runs the
program (interpreter on CPU, generated kernel on GPU) and a fake one that only checks the arguments
and shapes the outputs, so ``torch.compile`` traces through them without graph breaks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tilemix.codegen.schedule import call_consts
from tilemix.tiles import Kernel

from .derived import derived_gradients
from .eager import torch_custom_op
from .fastpath import fast_path
from .runtime import check_call, current_target, fake_run, run_kernel, use_target
from .varlen import ARGUMENT as VARLEN
from .varlen import check_cu_seqlens, fake_varlen, run_varlen, varlen_gradients

__all__ = ["tile_op", "no_state", "custom_op", "register_derived_autograd", "check_backward", "BACKWARDS", "mixer",
           "Mixer"]

# to_args(*op_args) -> (program arguments, labels, final states wanted); to_result(outputs) -> op result
ToArgs = Callable[..., tuple[dict[str, Any], dict[str, str], tuple[str, ...] | None]]


def tile_op(name: str, schema: str, kernel: Kernel, to_args: ToArgs, to_result: Callable[[dict], Any],
            run: Callable[..., dict] | None = None):
    """Register ``tilemix::name`` (or ``name`` when it names its namespace, ``"lib::op"``) with
    ``schema`` running ``kernel`` (through ``run(args, labels, final_states)`` when given: a
    ``SegmentedScan`` of it, say), with the Const values its module declares for the arguments'
    shapes (``schedule.declare``). Program arguments from ``to_args`` under the key ``"cu_seqlens"``
    (None or a checked offsets tensor) run a packed variable-length batch (``ops/varlen.py``)."""

    def program_call(*args):
        program_args, labels, final = to_args(*args)
        cu_seqlens = program_args.pop(VARLEN, None)
        return {**program_args, **call_consts(kernel, program_args)}, labels, final, cu_seqlens

    def real(*args):
        program_args, labels, final, cu_seqlens = program_call(*args)
        if cu_seqlens is not None:
            return to_result(run_varlen(kernel, program_args, labels, final, cu_seqlens))
        if run is not None:
            return to_result(run(program_args, labels, final))
        return to_result(run_kernel(kernel, program_args, labels, final))

    def fake(*args):
        program_args, labels, final, cu_seqlens = program_call(*args)
        if cu_seqlens is not None:
            return to_result(fake_varlen(kernel, program_args, labels, final, cu_seqlens))
        return to_result(fake_run(kernel, program_args, labels, final))

    qualified = _qualified(name)
    namespace, _, short = qualified.partition("::")
    if hasattr(getattr(torch.ops, namespace), short):  # torch takes a second one; the first then corrupts memory
        raise ValueError(f"name: a torch op {qualified!r} is already registered; pick another name")
    op = torch_custom_op(qualified, real, schema=schema)
    op.register_fake(fake)
    return op


def _qualified(name: str) -> str:
    return name if "::" in name else f"tilemix::{name}"


def no_state(like: torch.Tensor) -> torch.Tensor:
    """The placeholder an op returns for a final state nobody asked for (ops return tensors only)."""
    return like.new_empty(0, dtype=torch.float32)  # a third less host time than torch.empty(0, device=...)


_CONST_TYPES = {bool: "bool", int: "int", float: "float", str: "str"}


def custom_op(kernel: Kernel, name: str | None = None, final_states: tuple[str, ...] | None = None):
    """``kernel`` as a PyTorch custom op ``name`` (``"namespace::op"``; default
    ``"tilemix_user::<kernel name>"``), for a mixer of your own in a model (``mixer`` wraps it in a
    function called by parameter name).

    Call it with the program's inputs in their order (tensors, ``None`` for an absent optional, a
    number for a ``Scalar`` or ``Const``); trailing inputs with a default may be left out. It
    returns the outputs and then the final states named in ``final_states`` (None: every state),
    a tensor where there is one, else a tuple. CPU tensors run the interpreter, CUDA tensors the
    generated kernel (which writes only the states asked for). A fake kernel shapes the results, so
    ``torch.compile(fullgraph=True)`` traces it. The result is torch's ``CustomOpDef``, with no
    backward (``mixer`` registers the one derived from the program):
    ``op.register_autograd(backward, setup_context=...)`` makes it differentiable, with a backward
    that may call other tile programs' ops. A name registered before is a ValueError. A last,
    optional argument ``cu_seqlens`` runs a packed variable-length batch (``ops/varlen.py``).

    >>> from tilemix.tiles import Out, Scalar, Seq, chunks, kernel
    >>> @kernel
    ... def scaled(x: Seq["D"], a: Scalar, y: Out[Seq["D"]]):
    ...     for c in chunks(64):
    ...         y[c] = x[c] * a
    >>> op = custom_op(scaled, "demo::scaled")
    >>> op(torch.ones(1, 100, 2, 16), 3.0).sum().item()
    9600.0
    """
    inputs = [n for n, spec in kernel.specs.items() if not spec.output]
    outputs = [n for n, spec in kernel.specs.items() if spec.output]
    states = [n for n, spec in kernel.specs.items() if spec.kind == "state"]
    if final_states is None:
        final_states = tuple(states)
    unknown = [n for n in final_states if n not in states]
    if unknown:
        raise ValueError(f"final_states: {unknown} are not states of {kernel.name}; its states are {states}")
    results = outputs + list(final_states)
    if VARLEN in kernel.specs:
        raise ValueError(f"{kernel.name}: a parameter named {VARLEN!r} would clash with the op's packed-batch "
                         "offsets; rename it")
    if not results:
        raise ValueError(f"final_states: {kernel.name} has no outputs, so the op must return at least one of its "
                         f"states {states}")
    arguments = [_schema_argument(kernel, n) for n in inputs]
    for i in range(len(arguments) - 1, -1, -1):  # torch takes defaults on trailing arguments only
        if inputs[i] not in kernel.defaults:
            break
        arguments[i] += "=" + _schema_default(kernel.defaults[inputs[i]])
    arguments.append(f"Tensor? {VARLEN}=None")
    returns = "Tensor" if len(results) == 1 else f"({', '.join(['Tensor'] * len(results))})"
    schema = f"({', '.join(arguments)}) -> {returns}"

    def to_args(*values):
        cu_seqlens = values[len(inputs)] if len(values) > len(inputs) else None
        return {**dict(zip(inputs, values)), VARLEN: cu_seqlens}, {}, tuple(final_states)

    def to_result(out):
        return out[results[0]] if len(results) == 1 else tuple(out[n] for n in results)

    return tile_op(name or f"tilemix_user::{kernel.name}", schema, kernel, to_args, to_result)


def _schema_argument(kernel: Kernel, name: str) -> str:
    """``name``'s type and name in the op's schema: a Scalar is a float, a Const its default's type."""
    spec, optional = kernel.specs[name], name in kernel.defaults and kernel.defaults[name] is None
    if spec.kind == "scalar":
        kind = "float"
    elif spec.kind == "const":
        kind = _CONST_TYPES.get(type(kernel.defaults.get(name)))
        if kind is None:
            raise TypeError(f"custom_op({kernel.name}): Const parameter {name!r} needs a default of type bool, int, "
                            "float or str (it gives the op's schema its type)")
    else:
        kind = "Tensor"
    return f"{kind}{'?' if optional else ''} {name}"


def _schema_default(value) -> str:
    """A Python default as the schema writes it."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "None" if value is None else repr(value)


def register_derived_autograd(op, kernel: Kernel, arguments: tuple[str | None, ...],
                              results: tuple[str, ...]) -> None:
    """Make ``op`` (running ``kernel``) differentiable with ``kernel``'s derived backward
    (``ops/derived.py``), itself a custom op ``<op name>_backward`` so that AOT autograd traces it.

    ``arguments``: the program parameter each of the op's arguments binds (None: none, a flag say;
    ``"cu_seqlens"``: the packed batch's offsets, ``ops/varlen.py``);
    ``results``: the output or state each of the op's results is (an empty result: no gradient).
    Every tensor input that requires grad gets one; ``Scalar`` and ``Const`` arguments get None
    (the op's schema takes them as numbers, which carry no gradient: a learnt scalar is a
    ``Head[1]`` tensor)."""
    inputs = [n for n, spec in kernel.specs.items() if not spec.output]
    tensors = [n for n in inputs if kernel.specs[n].kind not in ("scalar", "const")]
    graded = [n for n, spec in kernel.specs.items() if spec.output or spec.kind == "state"]
    backward_op = _derived_backward_op(kernel, f"{op._qualname}_backward", inputs, tensors, graded)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*(v if isinstance(v, torch.Tensor) else None for v in inputs))
        ctx.numbers = [None if isinstance(v, torch.Tensor) else v for v in inputs]
        ctx.target = current_target()  # the backward runs on the forward's target

    def backward(ctx, *grads):
        values = [n if t is None else t for t, n in zip(ctx.saved_tensors, ctx.numbers)]
        args = {p: v for p, v in zip(arguments, values) if p is not None}
        wanted = {p for p, need in zip(arguments, ctx.needs_input_grad) if need and p in tensors}
        if not wanted:
            return (None,) * len(arguments)
        given = dict(zip(results, grads))
        with use_target(ctx.target):
            out = backward_op(*(args[n] if n in args else kernel.defaults[n] for n in inputs),
                              [given.get(n) for n in graded], [n in wanted for n in tensors], args.get(VARLEN))
        grad = dict(zip(tensors, out))
        return tuple(grad[p] if p in wanted else None for p in arguments)

    op.register_autograd(backward, setup_context=setup)


BACKWARDS = ("hand-written", "derived")  # what a shipped op's backward= picks


def check_backward(backward: str) -> str:
    """``backward`` if it is one of ``BACKWARDS``, else a ValueError naming the argument."""
    if not isinstance(backward, str) or backward not in BACKWARDS:
        raise ValueError(f"backward: {backward!r} is not one of {BACKWARDS}")
    return backward


def _derived_backward_op(kernel: Kernel, name: str, inputs: list[str], tensors: list[str], graded: list[str]):
    """The custom op ``name(<kernel's inputs>, Tensor?[] grads, bool[] wanted, Tensor? cu_seqlens)
    -> Tensor[]``: the gradients of ``kernel``'s tensor inputs (one per ``tensors``; empty where not
    ``wanted``), given ``grads`` (one per ``graded`` output or state; None or empty: zero), of a
    packed batch where ``cu_seqlens`` is given."""

    def split(values):  # torch leaves out a trailing argument at its default (cu_seqlens None)
        program_args, (grads, wanted, *rest) = values[:len(inputs)], values[len(inputs):]
        cu_seqlens = rest[0] if rest else None
        args = dict(zip(inputs, program_args))
        return args, grads, wanted, cu_seqlens, next(t for t in args.values() if isinstance(t, torch.Tensor))

    def real(*values):
        args, grads, wanted, cu_seqlens, like = split(values)
        output_grads = {n: g for n, g in zip(graded, grads) if g is not None and g.numel()}
        wrt = [n for n, w in zip(tensors, wanted) if w]
        if cu_seqlens is None:
            got = derived_gradients(kernel, args, output_grads, wrt)
        else:
            got = varlen_gradients(kernel, args, output_grads, wrt, cu_seqlens)
        return [got[n] if w else no_state(like) for n, w in zip(tensors, wanted)]

    def fake(*values):
        args, _, wanted, _, like = split(values)
        return [torch.empty_like(args[n]) if w else no_state(like) for n, w in zip(tensors, wanted)]

    namespace, _, short = name.partition("::")
    if hasattr(getattr(torch.ops, namespace), short):
        raise ValueError(f"name: a torch op {name!r} is already registered (the derived backward's op); "
                         "pick another name")
    arguments = [_schema_argument(kernel, n) for n in inputs] + ["Tensor?[] grads", "bool[] wanted",
                                                                 "Tensor? cu_seqlens=None"]
    op = torch_custom_op(name, real, schema=f"({', '.join(arguments)}) -> Tensor[]")
    op.register_fake(fake)
    return op


class Mixer:
    """A tile program as a torch function backed by a custom op (see ``mixer``): called with the
    program's inputs by name, it returns its outputs in declaration order, then the final states
    it was asked for (a tensor where there is one result, else a tuple)."""

    def __init__(self, kernel: Kernel, name: str | None, final_states: tuple[str, ...]):
        self.kernel = kernel
        self.final_states = tuple(final_states)
        self.name = _qualified(name or f"tilemix_user::{kernel.name}")
        self.op = custom_op(kernel, self.name, self.final_states)  # torch's CustomOpDef
        self._inputs = [n for n, spec in kernel.specs.items() if not spec.output]
        self._known, self._required = frozenset(self._inputs), [n for n in self._inputs if n not in kernel.defaults]
        self._tensors = [n for n in self._inputs if kernel.specs[n].kind not in ("scalar", "const")]
        results = tuple(n for n, spec in kernel.specs.items() if spec.output) + self.final_states
        register_derived_autograd(self.op, kernel, (*self._inputs, VARLEN), results)

    @fast_path(method=True)
    def __call__(self, *, cu_seqlens: torch.Tensor | None = None, **inputs):
        """``cu_seqlens``: int32 ``[N + 1]``, N sequences packed into one row (``ops/varlen.py``);
        states then ``[N, H, ...]``."""
        if not self._known.issuperset(inputs):
            unknown = sorted(set(inputs) - self._known)
            outputs = [n for n in unknown if n in self.kernel.specs]
            why = f"{outputs} are outputs, which the op returns" if outputs else f"expected {self._inputs}"
            raise TypeError(f"{self.name}: unexpected argument(s) {unknown}; {why}")
        missing = [n for n in self._required if n not in inputs]
        if missing:
            raise TypeError(f"{self.name}: missing argument(s) {missing}")
        check_call(self.name, differentiable=True, **{n: inputs.get(n) for n in self._tensors})
        if cu_seqlens is not None:
            packed = next(n for n in self._tensors if self.kernel.specs[n].kind in ("seq", "group_seq"))
            check_cu_seqlens(cu_seqlens, inputs[packed], packed)
        return self.op(*(inputs[n] if n in inputs else self.kernel.defaults[n] for n in self._inputs), cu_seqlens)

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        """Replace the derived backward: ``backward(ctx, *grads)`` returns a gradient (or None) per
        input in the program's order, as ``torch.library.register_autograd`` describes; it may call
        other tile programs (``run``, other mixers)."""
        self.op.register_autograd(backward, setup_context=setup_context)

    def __repr__(self) -> str:
        return f"mixer({self.kernel.name}, name={self.name!r}, final_states={self.final_states})"


def mixer(kernel: Kernel, name: str | None = None, *, final_states: tuple[str, ...] = ()) -> Mixer:
    """A forward tile program as a differentiable torch function: ``mixer(kernel)(q=q, k=k, v=v)``
    returns the program's outputs in declaration order, then the final states named in
    ``final_states``.

    Backed by the custom op ``name`` (default ``"tilemix_user::<kernel name>"``): CPU tensors run
    the interpreter, CUDA tensors the generated kernel for the device's target; a fake kernel
    shapes the results from the program's shapes, so ``torch.compile(fullgraph=True)`` traces it,
    with dynamic shapes, and ``torch.library.opcheck(m.op, ...)`` passes. Arguments get the checks
    the shipped ops make (a ValueError or TypeError naming the argument).

    Gradients come from the backward derived from the program (``tilemix.tiles.autodiff``; a
    program it cannot differentiate is a ``TileError`` naming the op and line at the first
    backward): for every tensor input that requires grad (``Head`` summed over the batch,
    ``GroupSeq`` over each group's heads, a ``State`` the initial state's), given the gradients
    of the outputs and of the final states returned; ``Scalar``/``Const`` arguments get None.
    CPU tensors run the derived programs on the interpreter, CUDA tensors as generated kernels
    (``ops/derived_cuda.py``). ``m.register_autograd(...)`` replaces the derived backward.

    >>> from tilemix.tiles import Out, Seq, State, chunks, colsum, kernel
    >>> @kernel
    ... def running_sum(x: Seq["D"], y: Out[Seq["D"]], s: State["D", 1] = None):
    ...     for c in chunks(64):
    ...         y[c] = x[c] * 2.0
    ...         s = s + colsum(x[c]).T
    >>> m = mixer(running_sum, "demo::running_sum", final_states=("s",))
    >>> x = torch.ones(1, 100, 2, 16, requires_grad=True)
    >>> y, s = m(x=x)
    >>> y.shape, s.shape, s[0, 0, 0, 0].item()
    (torch.Size([1, 100, 2, 16]), torch.Size([1, 2, 16, 1]), 100.0)
    >>> (y.sum() + s.sum()).backward()  # dy/dx = 2, ds/dx = 1
    >>> x.grad.unique().tolist()
    [3.0]
    """
    return Mixer(kernel, name, tuple(final_states))
