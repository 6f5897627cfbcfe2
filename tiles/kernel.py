"""``@kernel``: a Python function written in the tile language becomes a
``Kernel`` that traces, verifies and (on the CPU) interprets it."""

from __future__ import annotations

import inspect
import sys
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .builder import Builder, ParamRef, Tile, building
from .errors import Loc, TileError
from .interpret import interpret
from .ir import Program
from .params import Binding, ParamSpec, bind_arguments
from .passes import simplify
from .targets import Target, get_target
from .types import Space, TileType
from .verify import verify

__all__ = ["kernel", "Kernel", "TensorSpec", "kernel_names"]

_NAMES: set[str] = set()  # every @kernel program's name so far (what $TILEMIX_SCHEDULE may name)

@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype standing in for a tensor, to trace without data."""

    shape: tuple[int, ...]
    dtype: str


class Kernel:
    def __init__(self, fn: Callable, target_consts: dict[str, dict[str, Any]] | None = None,
                 name: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        _NAMES.add(self.name)
        self.__doc__ = fn.__doc__
        self.loc = Loc(fn.__code__.co_filename, _def_line(fn))
        self.specs: dict[str, ParamSpec] = {}
        self.defaults: dict[str, Any] = {}
        for name, param in inspect.signature(fn).parameters.items():
            annotation = param.annotation
            if isinstance(annotation, str):
                annotation = eval(annotation, fn.__globals__)  # postponed annotations
            if not isinstance(annotation, ParamSpec):
                raise TileError(f"parameter {name!r} of kernel {self.name!r} needs an annotation such as "
                                "Seq['K'], State['K', 'V'], Out[Seq['V']], Scalar or Const", self.loc)
            self.specs[name] = annotation
            if param.default is not inspect.Parameter.empty:
                self.defaults[name] = param.default
        # what a launch takes as values where a call leaves them out (Consts go through the binding)
        self.scalar_defaults = {n: d for n, d in self.defaults.items() if self.specs[n].kind == "scalar"}
        self._programs: dict[tuple, Program] = {}
        self._bindings: dict[tuple, Binding] = {}
        self.target_consts = {arch: dict(consts) for arch, consts in (target_consts or {}).items()}
        for arch, consts in self.target_consts.items():
            get_target(arch)  # a ValueError naming the known targets
            for name in consts:
                if name not in self.specs or self.specs[name].kind != "const":
                    raise TileError(f"target_consts[{arch!r}] of kernel {self.name!r} names {name!r}, which is not "
                                    "one of its Const parameters", self.loc)

    def consts_for(self, arch: str, args: dict[str, Any]) -> dict[str, Any]:
        """The Const defaults this program takes on ``arch`` in place of its own (block shapes that
        measured faster there) for a call with ``args``, less those the call passes; none where the
        program does not fit ``arch`` with them but may with its own defaults (attention's 128-query
        blocks on the generic target carry 129 KiB of state at head dim 256)."""
        consts = {k: v for k, v in self.target_consts.get(arch, {}).items() if k not in args}
        if consts:
            try:
                self.trace(self.bind({**args, **consts}), target=arch)
            except TileError:
                return {}
        return consts

    @property
    def source_lines(self) -> int:
        """Lines of DSL in the program (its function, decorator excluded)."""
        try:
            return len(inspect.getsourcelines(self.fn)[0]) - 1
        except OSError:
            return 0

    def __repr__(self) -> str:
        params = ", ".join(f"{n}: {s!r}" for n, s in self.specs.items())
        return f"@kernel {self.name}({params})"

    # -- specialisation -----------------------------------------------------
    def bind(self, args: dict[str, Any], labels: dict[str, str] | None = None) -> Binding:
        """Check call arguments and size every dim (see ``params.bind_arguments``).

        The checks depend only on the arguments' shapes, dtypes, types and constants, so their
        result is cached per signature and a repeated call only refreshes the scalar values."""
        signature = self._signature(args)
        if signature is None:  # symbolic sizes (torch.compile, dynamic shapes): nothing to cache by
            return bind_arguments(self.specs, self.defaults, args, labels)
        binding = self._bindings.get(signature)
        if binding is None:
            binding = self._bindings[signature] = bind_arguments(self.specs, self.defaults, args, labels)
        scalars = {n: float(args[n]) for n, spec in self.specs.items()
                   if spec.kind == "scalar" and args.get(n) is not None}
        fresh = replace(binding, values={**binding.values, **scalars})
        fresh._key = binding.key()  # scalars are not part of the key
        return fresh

    def _signature(self, args: dict[str, Any]) -> tuple | None:
        parts = [tuple(args)]  # the names given (in call order: a reordered call binds once more)
        for name, spec in self.specs.items():
            value = args.get(name, self.defaults.get(name))
            dtype = getattr(value, "dtype", None)
            if dtype is not None:
                shape = tuple(value.shape)
                if not all(type(s) is int for s in shape):
                    return None
                parts.append((shape, dtype))
            else:
                parts.append((type(value), value if spec.kind == "const" else None))
        sized = [(name, value) for name, value in args.items() if name not in self.specs]  # output dims' sizes
        if not all(type(value) is int for _, value in sized):
            return None
        return tuple(parts + sized)

    def trace(self, binding: Binding | None = None, target: str | Target = "cpu", **args) -> Program:
        """The verified program for this specialisation (cached)."""
        binding = binding if binding is not None else self.bind(args)
        target = get_target(target)
        key = (binding.key(), target.name)
        if key not in self._programs:
            self._programs[key] = verify(self._trace(binding), target)
        return self._programs[key]

    def run(self, binding: Binding, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Interpret on NumPy ``inputs`` (fp32 values) bound by ``binding``;
        returns outputs and final states by name."""
        return interpret(self.trace(binding), binding, inputs)

    def __call__(self, **args) -> dict[str, np.ndarray]:
        """Run on NumPy arrays with the interpreter."""
        return self.run(self.bind(args), args)

    # -- tracing ------------------------------------------------------------
    def _trace(self, binding: Binding, token_rows: bool = False) -> Program:
        """The program traced at ``binding``; ``token_rows``: each ``chunks()`` loop over T one token
        at a time (what ``tiles.step`` specialises)."""
        builder = Builder(binding, binding.static, token_rows)
        kwargs: dict[str, Any] = {}
        states = []
        with building(builder):
            for p in binding.params:
                kind = p.spec.kind
                if kind == "const":
                    kwargs[p.name] = binding.values[p.name]
                elif kind == "state":
                    k, v = (binding.extent(d) for d in p.spec.dims)
                    if k is None or v is None:
                        raise TileError(f"state {p.name!r}: dims {p.spec.dims} are not sized by any input", self.loc)
                    kwargs[p.name] = builder.emit("load_state", [], {"param": p.name, "initial": p.present},
                                                  TileType(k, v), loc=self.loc)
                    states.append(kwargs[p.name])
                elif not p.present:
                    kwargs[p.name] = None
                elif kind in ("seq", "group_seq", "matrix"):
                    kwargs[p.name] = ParamRef(p, binding.static)
                elif kind == "head":
                    cols = 1 if p.spec.dims == (1,) else binding.static[p.spec.dims[0]]
                    kwargs[p.name] = builder.emit("read_param", [], {"param": p.name},
                                                  TileType(1, cols, p.dtype, Space.global_), loc=self.loc)
                else:  # scalar
                    kwargs[p.name] = builder.emit("scalar_param", [], {"param": p.name}, TileType(1, 1),
                                                  loc=self.loc)
            final_locals = self._call(kwargs)
            builder.check_closed()
            for p in binding.params:
                if p.spec.kind == "state":
                    self._store_state(builder, p.name, final_locals.get(p.name))
        body = builder.regions[0]
        simplify(body)
        return Program(self.name, binding.params, body, binding.static, binding.compute_dtype, self.loc)

    def _call(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Call the function, returning its local variables as it returns."""
        captured: dict[str, Any] = {}
        code = self.fn.__code__

        def on_event(frame, event, arg):
            if event == "return" and frame.f_code is code:
                captured.update(frame.f_locals)

        previous = sys.getprofile()
        sys.setprofile(on_event)
        try:
            self.fn(**kwargs)
        finally:
            sys.setprofile(previous)
        return captured

    def _store_state(self, builder: Builder, name: str, final) -> None:
        if not isinstance(final, Tile):
            raise TileError(f"state {name!r} must be bound to a tile when the kernel returns, "
                            f"got {type(final).__name__}", self.loc)
        want = tuple(d if isinstance(d, int) else builder.static[d] for d in builder.binding.param(name).spec.dims)
        if final.shape != want:
            raise TileError(f"state {name!r} is {want[0]}x{want[1]} but ends as {final.type}", self.loc)
        builder.emit("store_state", [final], {"param": name}, None, loc=self.loc)


def _def_line(fn: Callable) -> int:
    """The line of ``def`` itself (``co_firstlineno`` is the first decorator's). Source that cannot be
    read back (exec'd code whose file name is not the source's, e.g. a README section) gives
    ``co_firstlineno``."""
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, SyntaxError, tokenize.TokenError):
        return fn.__code__.co_firstlineno
    return start + next((i for i, line in enumerate(lines) if line.lstrip().startswith("def ")), 0)


def kernel_names() -> frozenset[str]:
    """The names of the ``@kernel`` programs defined so far in this process."""
    return frozenset(_NAMES)


def kernel(fn: Callable | None = None, *, target_consts: dict[str, dict[str, Any]] | None = None):
    """Decorator: a tile program. See ``tilemix.tiles`` for the language.

    ``@kernel(target_consts={"sm_90": dict(block=128)})``: other defaults for Const parameters on
    one target (an arch name of ``tiles.targets.TARGETS``), where a block shape measured faster."""
    if fn is None:
        return lambda f: Kernel(f, target_consts)
    return Kernel(fn, target_consts)
