"""Kernel parameters: how a program sees its tensors, and how call arguments
are checked against them.

Annotations on a ``@kernel`` function say what each argument is:

=====================  ======================  ===========================================
annotation             tensor layout           inside the program
=====================  ======================  ===========================================
``Seq["K"]``           ``[B, T, H, K]``        ``q[c]`` loads chunk ``c``: a ``size x K`` tile
``Seq[1]``             ``[B, T, H]``           ``dt[c]`` loads a ``size x 1`` column vector
``GroupSeq["N"]``      ``[B, T, G, N]``        like ``Seq``; head ``h`` reads group ``h // (H // G)``
``Seq.along("S")["K"]`` ``[B, S, H, K]``       like ``Seq``, over a second sequence of its own length
                                               ``S`` (cross-attention's keys); ``GroupSeq.along`` too
``Head[1]``/``Head["D"]`` ``[H]`` / ``[H, D]``  a scalar / row vector for the current head
``State["K", "V"]``    ``[B, H, K, V]`` f32    the initial state (zeros when absent); the value
                                               bound to its name at the end is the final state
``Matrix["M", "K"]``   ``[M, K]``              ``a[i, k]`` loads a block (gemm-style programs)
``ChunkState[r, c]``   ``[B, H, NC, r, c]``    one ``r x c`` tile per chunk (``NC`` chunks): the
                                               state entering each chunk, checkpointed by a
                                               derived backward (``tiles.autodiff``; not
                                               written by users)
``Scalar``             Python float            a runtime scalar (e.g. a softmax scale)
``Const``              any Python value        fixed at trace time (e.g. ``causal=True``)
``Out[...]``           as the inner one        written by the program; allocated by tilemix
                                               (in the inputs' dtype; ``Out[Seq[1]]`` in float32)
=====================  ======================  ===========================================

``B``, ``T``, ``H``, ``G`` and matrix dims are runtime sizes; the feature
dims of ``Seq``/``GroupSeq``/``Head`` and the ``State`` dims are static:
a program is traced once per set of static sizes and dtypes. A sequence dim
only outputs run along (``Out[Seq.along("P")[...]]``) is a runtime size the call
gives, an int argument under its name (``P=...``). Parameters
with a default of ``None`` are optional; the program sees ``None`` when
they are absent and can branch on it in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .types import FLOAT_DTYPES, DType, dtype_of

__all__ = [
    "ParamSpec", "Seq", "GroupSeq", "Head", "State", "Matrix", "Scalar", "Const", "Out",
    "BoundParam", "Binding", "bind_arguments",
]

_VALUE_KINDS = ("scalar", "const")  # passed as Python values; every other kind is a tensor


@dataclass(frozen=True)
class ParamSpec:
    kind: str
    dims: tuple = ()
    output: bool = False
    length: str = "T"  # the sequence dim of a Seq / GroupSeq: T, or another one (``Seq.along``)

    @property
    def layout(self) -> tuple:
        """The tensor's full shape in symbols (runtime and static)."""
        feature = tuple(d for d in self.dims if d != 1)
        if self.kind == "seq":
            return ("B", self.length, "H") + feature
        if self.kind == "group_seq":
            return ("B", self.length, "G") + feature
        if self.kind == "head":
            return ("H",) + feature
        if self.kind == "state":
            return ("B", "H") + self.dims
        if self.kind == "chunk_state":
            return ("B", "H", "NC") + self.dims
        return self.dims  # matrix

    @property
    def static_dims(self) -> tuple:
        """Symbols whose sizes shape the program's tiles."""
        if self.kind in ("seq", "group_seq", "head", "state"):
            return tuple(d for d in self.dims if isinstance(d, str))
        return ()

    @property
    def is_tile_operand(self) -> bool:
        """Tensors whose tiles feed matmuls: they share the compute dtype."""
        return self.kind == "matrix" or (self.kind in ("seq", "group_seq") and self.dims != (1,))

    def __repr__(self) -> str:
        inner = ", ".join(map(repr, self.dims))
        base = {"seq": "Seq", "group_seq": "GroupSeq", "head": "Head", "state": "State",
                "matrix": "Matrix", "scalar": "Scalar", "const": "Const", "chunk_state": "ChunkState"}[self.kind]
        base = f"{base}[{inner}]" if self.dims else base
        base = base if self.length == "T" else base.replace("[", f".along({self.length!r})[", 1)
        return f"Out[{base}]" if self.output else base


class _Factory:
    def __init__(self, kind: str, ndims: int, length: str = "T"):
        self.kind, self.ndims, self.length = kind, ndims, length

    def __getitem__(self, dims) -> ParamSpec:
        dims = dims if isinstance(dims, tuple) else (dims,)
        if len(dims) != self.ndims or not all(isinstance(d, str) or d == 1 for d in dims):
            raise TypeError(f"{self.kind} parameters take {self.ndims} dim(s), each a name like 'K' or 1; got {dims}")
        return ParamSpec(self.kind, dims, length=self.length)

    def along(self, length: str) -> _Factory:
        """The same parameter over the sequence dim ``length`` (a name such as ``"S"``) instead of
        ``T``: a second sequence with a length of its own (cross-attention's keys and values)."""
        if self.kind not in ("seq", "group_seq"):
            raise TypeError(f"{self.kind} parameters have no sequence dim to put along {length!r}")
        if not isinstance(length, str) or not length or length in ("B", "H", "G"):
            raise TypeError(f"along({length!r}): expected a dim name for the sequence, other than B, H and G")
        return _Factory(self.kind, self.ndims, length)


class _Out:
    def __getitem__(self, spec: ParamSpec) -> ParamSpec:
        if not isinstance(spec, ParamSpec) or spec.kind not in ("seq", "matrix"):
            raise TypeError(f"Out[...] wraps a Seq or Matrix parameter, got {spec!r}")
        return replace(spec, output=True)


Seq = _Factory("seq", 1)
GroupSeq = _Factory("group_seq", 1)
Head = _Factory("head", 1)
State = _Factory("state", 2)
Matrix = _Factory("matrix", 2)
Scalar = ParamSpec("scalar")
Const = ParamSpec("const")
Out = _Out()


@dataclass(frozen=True)
class BoundParam:
    """A parameter with the concrete dtype and shape of one call."""

    name: str
    spec: ParamSpec
    present: bool
    dtype: DType | None = None
    shape: tuple[int, ...] = ()

    def __str__(self) -> str:
        if not self.present:
            return f"{self.name}: {self.spec!r} = None"
        dtype = f" {self.dtype}" if self.dtype else ""
        return f"{self.name}: {self.spec!r}{dtype}"


@dataclass
class Binding:
    params: list[BoundParam]
    sizes: dict[str, int]  # every symbol: runtime (B, T, H, G, matrix dims) and static
    static: dict[str, int]  # the symbols that shape tiles
    compute_dtype: DType
    values: dict[str, Any]  # Scalar and Const values
    # memo of key(); not an init field, so dataclasses.replace() (which may change what the key
    # covers) never copies it
    _key: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def key(self) -> tuple:
        """Identifies the specialisation: what a trace depends on."""
        if self._key is None:
            consts = tuple((k, repr(v)) for k, v in sorted(self.values.items())
                           if self.param(k).spec.kind == "const")
            self._key = (tuple((p.name, p.present, p.dtype) for p in self.params),
                         tuple(sorted(self.static.items())), self.compute_dtype, consts)
        return self._key

    def param(self, name: str) -> BoundParam:
        return next(p for p in self.params if p.name == name)

    def extent(self, dim: str | int) -> int | None:
        """The size of a dim symbol as the tiles see it (static first: a column split traces at
        the split width), or a literal dim (1) itself; None if nothing sized it."""
        return dim if isinstance(dim, int) else self.static.get(dim, self.sizes.get(dim))


def _symbolic(size) -> bool:
    """A torch.SymInt (torch.compile with dynamic shapes): kept symbolic, so checks become guards
    instead of pinning the size."""
    return not isinstance(size, int) and hasattr(size, "node")


def _fmt(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def bind_arguments(specs: dict[str, ParamSpec], defaults: dict[str, Any], args: dict[str, Any],
                   labels: dict[str, str] | None = None) -> Binding:
    """Check call arguments against the parameters and size every symbol.

    ``args`` holds arrays (anything with ``shape`` and ``dtype``) for tensor
    inputs, numbers for ``Scalar``, values for ``Const``; outputs are not
    passed. ``labels`` maps parameter names to the names the caller knows
    them by, for error messages. Raises ``ValueError``/``TypeError`` naming
    the argument and what was expected.
    """
    label = lambda name: (labels or {}).get(name, name)  # noqa: E731
    output_dims = _output_only_dims(specs)
    unknown = set(args) - set(specs) - output_dims
    if unknown:
        raise TypeError(f"unexpected argument(s) {sorted(unknown)}; expected {list(specs)}"
                        + (f" and the output dim(s) {sorted(output_dims)}" if output_dims else ""))
    inputs = {name: spec for name, spec in specs.items() if not spec.output}
    given = _given_values(inputs, defaults, args, label)
    tensors = {name: value for name, value in given.items() if inputs[name].kind not in _VALUE_KINDS}
    compute = _compute_dtype(inputs, tensors, label)
    sizes, sized_by = _size_symbols(inputs, tensors, label)
    for dim in sorted(output_dims & set(args)):
        size = args[dim]
        if _symbolic(size):  # torch.compile with dynamic shapes: kept symbolic
            sizes[dim] = size
            continue
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 0:
            raise TypeError(f"{dim}: the length of the outputs along it, a non-negative int; got {size!r}")
        sizes[dim] = int(size)
    params = []
    for name, spec in inputs.items():
        if name not in given:
            params.append(BoundParam(name, spec, present=False))
        elif name in tensors:
            _check_dtype(name, spec, tensors[name], compute, label)
            params.append(BoundParam(name, spec, present=True, dtype=dtype_of(tensors[name].dtype),
                                     shape=_shape(tensors[name])))
        else:
            params.append(BoundParam(name, spec, present=True))
    if "G" in sizes and sizes["G"] and sizes.get("H", 0) % sizes["G"]:
        raise ValueError(f"{label(sized_by['G'])}: its {sizes['G']} groups must divide the {sizes['H']} heads")
    _check_absent_states(inputs, given, sizes, label)
    params += _outputs(specs, sizes, compute[0], label)
    order = list(specs)
    params.sort(key=lambda p: order.index(p.name))
    static = {s: sizes[s] for p in params for s in p.spec.static_dims if s in sizes}
    values = {name: None for name in inputs if name not in given}
    values.update({name: float(value) if inputs[name].kind == "scalar" else value
                   for name, value in given.items() if name not in tensors})
    return Binding(params, sizes, static, compute[0], values)


def _output_only_dims(specs: dict[str, ParamSpec]) -> set[str]:
    """The sequence dims only outputs run along (flash-decoding's per-split partial results): no
    input sizes them, so the call gives each as an int argument under its name."""
    lengths = lambda outputs: {s.length for s in specs.values()  # noqa: E731
                               if s.output == outputs and s.kind in ("seq", "group_seq")}
    return lengths(True) - lengths(False)


def _given_values(inputs: dict[str, ParamSpec], defaults: dict[str, Any], args: dict[str, Any],
                  label) -> dict[str, Any]:
    """Each input's value (the call's, else its default), less absent optionals; a missing argument or
    a value of the wrong kind is a TypeError naming it."""
    given = {}
    for name, spec in inputs.items():
        value = args.get(name, defaults.get(name))
        if value is None:
            if name not in defaults:
                raise TypeError(f"missing argument {label(name)!r} ({spec!r})")
            continue
        if spec.kind == "scalar" and not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"{label(name)}: expected a Python number, got {type(value).__name__}")
        if spec.kind not in _VALUE_KINDS and not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(f"{label(name)}: expected a tensor of shape {_fmt(spec.layout)}, "
                            f"got {type(value).__name__}")
        if spec.kind not in _VALUE_KINDS and dtype_of(value.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{label(name)}: dtype {value.dtype} is not supported; "
                            "expected float32, float16 or bfloat16 (float64 on CPU tensors)")
        given[name] = value
    return given


def _compute_dtype(inputs: dict[str, ParamSpec], tensors: dict[str, Any], label) -> tuple[DType, str]:
    """The program's compute dtype and the input it comes from: that of the tensors that feed matmuls
    (which must agree). A program whose matmuls read only State or Head tiles has none: then a 16-bit
    input's dtype if there is one, else float64 if any input is, else float32."""
    operands = [(dtype_of(value.dtype), name) for name, value in tensors.items() if inputs[name].is_tile_operand]
    for dtype, name in operands[1:]:
        if dtype is not operands[0][0]:
            raise TypeError(f"{label(name)}: dtype {dtype} differs from {label(operands[0][1])}'s {operands[0][0]}; "
                            "tensors that feed matmuls share one dtype")
    if operands:
        return operands[0]
    others = [(dtype_of(value.dtype), name) for name, value in tensors.items()]
    if not others:
        expected = [label(n) for n, spec in inputs.items() if spec.kind not in _VALUE_KINDS]
        raise TypeError(f"no tensor argument; expected some of {expected}")
    for wanted in ((DType.bf16, DType.f16), (DType.f64,)):
        found = [(dtype, name) for dtype, name in others if dtype in wanted]
        if found:
            return found[0]
    return DType.f32, others[0][1]


def _check_dtype(name: str, spec: ParamSpec, value, compute: tuple[DType, str], label) -> None:
    """States are float32 (float64 in a float64 program); per-token and per-head tensors float32 or the
    compute dtype."""
    dtype, (program, source) = dtype_of(value.dtype), compute
    if spec.kind == "state" and dtype is not DType.f32 and not (program is DType.f64 and dtype is DType.f64):
        raise TypeError(f"{label(name)}: the state is float32 (float64 with float64 inputs), got {value.dtype}")
    if spec.kind in ("seq", "head") and not spec.is_tile_operand and dtype not in (DType.f32, program):
        raise TypeError(f"{label(name)}: dtype {dtype} must be float32 or {label(source)}'s {program}")


def _shape(value) -> tuple:
    return tuple(s if _symbolic(s) else int(s) for s in value.shape)


def _size_symbols(inputs: dict[str, ParamSpec], tensors: dict[str, Any], label) -> tuple[dict, dict]:
    """Each dim symbol's size and the input that first sized it; a rank or a size that disagrees is a
    ValueError naming the input, the layout and where the size came from."""
    sizes: dict[str, int] = {}
    sized_by: dict[str, str] = {}
    for name, value in tensors.items():
        shape, layout = _shape(value), inputs[name].layout
        if len(shape) != len(layout):
            raise ValueError(f"{label(name)}: expected {len(layout)} dims {_fmt(layout)}, got shape {_fmt(shape)}")
        for sym, size in zip(layout, shape):
            if isinstance(sym, int):
                continue
            if sym in sizes and sizes[sym] != size:
                expected = _fmt(sizes.get(s, s) for s in layout)
                raise ValueError(f"{label(name)}: expected shape {_fmt(layout)} = {expected} "
                                 f"({sym} = {sizes[sym]} from {label(sized_by[sym])}), got {_fmt(shape)}")
            sizes.setdefault(sym, size)
            sized_by.setdefault(sym, name)
    return sizes, sized_by


def _check_absent_states(inputs: dict[str, ParamSpec], given: dict[str, Any], sizes: dict, label) -> None:
    """An absent state starts from zeros of a size the other inputs must give."""
    for name, spec in inputs.items():
        missing = [d for d in spec.dims if isinstance(d, str) and d not in sizes]
        if spec.kind == "state" and name not in given and missing:
            raise TypeError(f"{label(name)}: its dims {missing} are sized by no other input; pass it (an initial "
                            f"state of shape {_fmt(spec.layout)}) to size them")


def _outputs(specs: dict[str, ParamSpec], sizes: dict, compute: DType, label) -> list[BoundParam]:
    """The outputs, shaped by the inputs' sizes: a tile output in the compute dtype, a per-token scalar
    (``Out[Seq[1]]``, e.g. a softmax's log-sum-exp kept for the backward) in float32 (float64 in a
    float64 program)."""
    params = []
    for name, spec in specs.items():
        if not spec.output:
            continue
        missing = [s for s in spec.layout if isinstance(s, str) and s not in sizes]
        if missing:
            raise TypeError(f"output {label(name)}: dims {missing} are not sized by any input")
        shape = tuple(sizes[s] if isinstance(s, str) else s for s in spec.layout)
        dtype = compute if spec.is_tile_operand or compute is DType.f64 else DType.f32
        params.append(BoundParam(name, spec, present=True, dtype=dtype, shape=shape))
    return params
