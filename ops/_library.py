"""Tile programs as PyTorch custom ops (``torch.ops.tilemix.*``): a real kernel that runs the
program (interpreter on CPU, generated kernel on GPU) and a fake one that only checks the arguments
and shapes the outputs, so ``torch.compile`` traces through them without graph breaks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tilemix.tiles import Kernel

from .runtime import fake_run, run_kernel

__all__ = ["tile_op", "no_state", "custom_op"]

# to_args(*op_args) -> (program arguments, labels, final states wanted); to_result(outputs) -> op result
ToArgs = Callable[..., tuple[dict[str, Any], dict[str, str], tuple[str, ...] | None]]


def tile_op(name: str, schema: str, kernel: Kernel, to_args: ToArgs, to_result: Callable[[dict], Any],
            run: Callable[..., dict] | None = None):
    """Register ``tilemix::name`` (or ``name`` when it names its namespace, ``"lib::op"``) with
    ``schema`` running ``kernel`` (through ``run(args, labels, final_states)`` when given: a
    ``SegmentedScan`` of it, say)."""

    def real(*args):
        program_args, labels, final = to_args(*args)
        if run is not None:
            return to_result(run(program_args, labels, final))
        return to_result(run_kernel(kernel, program_args, labels, final))

    def fake(*args):
        program_args, labels, final = to_args(*args)
        return to_result(fake_run(kernel, program_args, labels, final))

    qualified = name if "::" in name else f"tilemix::{name}"
    op = torch.library.custom_op(qualified, real, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def no_state(like: torch.Tensor) -> torch.Tensor:
    """The placeholder an op returns for a final state nobody asked for (ops return tensors only)."""
    return torch.empty(0, dtype=torch.float32, device=like.device)


_CONST_TYPES = {bool: "bool", int: "int", float: "float", str: "str"}


def custom_op(kernel: Kernel, name: str | None = None):
    """``kernel`` as a PyTorch custom op ``name`` (``"namespace::op"``; default
    ``"tilemix_user::<kernel name>"``), for a mixer of your own in a model.

    Call it with the program's inputs in their order (tensors, ``None`` for an absent optional, a
    number for a ``Scalar`` or ``Const``); it returns the outputs and then the final states, a tensor
    where there is one, else a tuple. CPU tensors run the interpreter, CUDA tensors the generated
    kernel. A fake kernel shapes the results, so ``torch.compile(fullgraph=True)`` traces it. The
    result is torch's ``CustomOpDef``: ``op.register_autograd(backward, setup_context=...)`` makes
    it differentiable, with a backward that may call other tile programs' ops.

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
    arguments = []
    for n in inputs:
        spec, optional = kernel.specs[n], n in kernel.defaults and kernel.defaults[n] is None
        if spec.kind == "scalar":
            kind = "float"
        elif spec.kind == "const":
            kind = _CONST_TYPES.get(type(kernel.defaults.get(n)))
            if kind is None:
                raise TypeError(f"custom_op({kernel.name}): Const parameter {n!r} needs a default of type bool, int, "
                                "float or str (it gives the op's schema its type)")
        else:
            kind = "Tensor"
        arguments.append(f"{kind}{'?' if optional else ''} {n}")
    results = outputs + states
    returns = "Tensor" if len(results) == 1 else f"({', '.join(['Tensor'] * len(results))})"
    schema = f"({', '.join(arguments)}) -> {returns}"

    def to_args(*values):
        return dict(zip(inputs, values)), {}, tuple(states)

    def to_result(out):
        return out[results[0]] if len(results) == 1 else tuple(out[n] for n in results)

    return tile_op(name or f"tilemix_user::{kernel.name}", schema, kernel, to_args, to_result)
