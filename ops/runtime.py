"""Running a tile program on torch tensors: CPU tensors go to the interpreter, CUDA tensors to the
generated kernel for the device's target. ``run`` is the public entry; the shipped ops call
``run_kernel``. Also here: the targets (``use_target``), the call cache, and tuning a call's
schedule (``tune``, ``tune_segments``: ``codegen.tune``'s search with this runtime's runner)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tilemix.codegen import launch
from tilemix.codegen import schedule as schedules
from tilemix.codegen import tune as search
from tilemix.codegen.env import read, snapshot
from tilemix.codegen.structure import PANEL
from tilemix.tiles import Kernel
from tilemix.tiles.types import DType

from .timing import time_ms
from .tuning import GpuRunner, search_segments

__all__ = ["run", "run_kernel", "tune", "tune_segments",
           "call_signature", "remember", "recall", "forget_calls", "fake_run", "default_scale",
           "check_call", "check_devices", "use_target", "call_with_target", "device_arch", "capture_calls",
           "new_outputs", "record_launches", "watching", "host_read"]

_CAPTURED: list[tuple[Kernel, dict[str, Any]]] | None = None  # run_kernel's calls, inside capture_calls
# run_kernel's calls in full, inside record_launches (per thread: another thread's calls are not this one's)
_RECORDED: contextvars.ContextVar[list | None] = contextvars.ContextVar("tilemix_recorded", default=None)


@contextlib.contextmanager
def capture_calls():
    """Record the program and arguments of every ``run_kernel`` call made inside the block (a list of
    ``(kernel, args)``, in call order): what an op launches, its backward say, so that ``tilemix tune``
    can tune those programs at the shapes they run."""
    global _CAPTURED
    outer, _CAPTURED = _CAPTURED, []
    try:
        yield _CAPTURED
    finally:
        _CAPTURED = outer


@contextlib.contextmanager
def record_launches():
    """Record every ``run_kernel`` call made inside the block as ``(kernel, args, labels, final_states,
    schedule, into, signature, outputs)``, and None where the host read a tensor's values
    (``host_read``): what ``ops/fastpath.py`` needs to replay a public call, and to know it must not."""
    token = _RECORDED.set([])
    try:
        yield _RECORDED.get()
    finally:
        _RECORDED.reset(token)


def watching() -> bool:
    """Whether ``run_kernel`` calls are being captured or recorded now (a call then runs in full)."""
    return _CAPTURED is not None or _RECORDED.get() is not None


def host_read() -> None:
    """Say that the host read a tensor's values (a length, a decay's range) to pick what runs: a call
    recorded around it depends on more than its arguments' shapes and is never replayed."""
    recorded = _RECORDED.get()
    if recorded is not None:
        recorded.append(None)


def default_scale(q: Any, scale: float | None) -> float:
    """``scale``, or ``q``'s head dim ** -0.5 (q checked first: a non-tensor is a TypeError naming it)."""
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat, torch.SymInt)):
            raise TypeError(f"scale: expected a Python number or None, got {type(scale).__name__}")
        return scale
    if not isinstance(q, torch.Tensor) or q.dim() == 0:
        raise TypeError(f"q: expected a tensor of shape [B, T, H, D], got {type(q).__name__}")
    return q.shape[-1] ** -0.5 if q.shape[-1] else 1.0  # K = 0: every score is 0 whatever the scale


def check_devices(tensors: dict[str, torch.Tensor], labels: dict[str, str]) -> torch.device:
    """The one device of ``tensors``; tensors on different devices (index included) are a ValueError
    naming both (by ``labels``, where a caller knows them by other names)."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{labels.get(name, name)} is on {device} but {labels.get(first_name, first_name)} "
                             f"is on {first}; all tensors must be on one device")
    return first


def check_call(op: str, differentiable: bool = False, *, target: str | None = None, flags: dict[str, Any] | None = None,
               **tensors: Any) -> None:
    """What the public functions check before calling their torch op: tensor arguments are tensors
    (the op's schema would reject them less clearly), flags are bools (``bool("False")`` is true),
    ``target`` is a backend the tensors can run on (CPU tensors always run the interpreter), and no
    gradient is asked of an op whose backward programs do not exist yet. Each error names the argument."""
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
    for name, value in (flags or {}).items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    if target is not None:
        if not isinstance(target, str) or target.lower() not in TARGET_CHOICES:
            raise ValueError(f"target: {target!r} is not one of {TARGET_CHOICES}")
        first = next((t for t in tensors.values() if t is not None), None)
        if target.lower() != "auto" and first is not None and first.device.type == "cpu":
            raise ValueError(f"target: {target!r} picks the GPU kernels, but the tensors are on the CPU, which "
                             "always runs the interpreter; leave target unset (or 'auto') or move the tensors to a GPU")
    if not differentiable:
        _refuse_gradients(op, tensors.values())


def fake_run(kernel: Kernel, args: dict[str, Any], labels: dict[str, str] | None = None,
             final_states: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """What ``run_kernel`` returns, as empty tensors of the right shapes, dtypes and device
    (meta/fake tensors for torch.compile), after the same argument checks."""
    labels = labels or {}
    device = check_devices({k: v for k, v in args.items() if isinstance(v, torch.Tensor)}, labels)
    binding = kernel.bind(args, labels)
    if device.type == "cuda":
        check_hopper_dims(binding, labels)
    return {name: torch.empty(shape, dtype=dtype, device=device)
            for name, shape, dtype in output_specs(binding, args, final_states)}


def output_specs(binding, args: dict[str, Any], final_states: tuple[str, ...] | None) -> tuple[tuple, ...]:
    """(name, shape, torch dtype) of each output and of each final state wanted (None: all)."""
    like = args[_first_tile_operand(binding)].dtype
    state = torch.float64 if binding.compute_dtype is DType.f64 else torch.float32
    specs = []
    for p in binding.params:
        if p.spec.output:
            specs.append((p.name, tuple(p.shape), _output_dtype(p, like)))
        elif p.spec.kind == "state" and (final_states is None or p.name in final_states):
            shape = (binding.sizes["B"], binding.sizes["H"]) + tuple(binding.extent(d) for d in p.spec.dims)
            specs.append((p.name, shape, state))
    return tuple(specs)


def run(kernel: Kernel, **args: Any) -> dict[str, torch.Tensor]:
    """Run ``kernel`` (any ``@kernel`` program) on torch tensors; returns its outputs and final
    states by parameter name.

    Arguments by parameter name: tensors for the tensor parameters (all on one device), ``None``
    or nothing for an absent optional, a number for a ``Scalar`` or ``Const``. CPU tensors run the
    interpreter (any size; float32 or float64), CUDA tensors the generated kernel for the device's
    target (see ``use_target``). Outputs come in the inputs' dtype, final states in float32
    (float64 in a float64 program). Bad arguments are a TypeError or ValueError naming the argument.
    ``run`` does not record gradients: ``mixer`` makes a program a differentiable torch function.

    >>> from tilemix.tiles import Out, Seq, chunks, kernel
    >>> @kernel
    ... def double(x: Seq["D"], y: Out[Seq["D"]]):
    ...     for c in chunks(64):
    ...         y[c] = x[c] * 2.0
    >>> run(double, x=torch.ones(1, 100, 2, 16))["y"].sum().item()
    6400.0
    """
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel: expected a @kernel program, got {type(kernel).__name__}")
    outputs = sorted(n for n in args if n in kernel.specs and kernel.specs[n].output)
    if outputs:
        raise TypeError(f"{kernel.name}: {outputs} are outputs, which run() allocates and returns; pass only inputs")
    tensors = {n: v for n, v in args.items() if n in kernel.specs and kernel.specs[n].kind not in ("scalar", "const")}
    check_call(kernel.name, differentiable=True, **tensors)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors.values()):
        raise NotImplementedError(f"run({kernel.name}): run() records no gradients; make the program a torch "
                                  "function with tilemix.ops.mixer, or call it under torch.no_grad()")
    if not any(isinstance(t, torch.Tensor) for t in tensors.values()):
        kernel.bind(args)  # no tensor at all: the binding's error names what is missing
    return run_kernel(kernel, args)


def tune(kernel: Kernel, args: dict[str, Any], *, arch: str | None = None,
         timer: Callable[[Callable[[], object]], float] = time_ms, progress: Callable[[str], None] | None = None,
         workers: int | None = None) -> search.TuneResult:
    """Tune ``kernel`` for ``args`` (CUDA tensors) on ``arch`` (default: the arch the ops run on
    here, see ``use_target``) and cache the winner: ``codegen.tune.tune`` with this GPU's runner
    (candidates checked against the interpreter) and ``timer``. Later calls of this shape use it."""
    device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device
    arch = arch or device_arch(device)
    target = "hopper" if arch == "sm_90a" else "generic"  # what runs a candidate

    def run_candidate(kernel: Kernel, args: dict[str, Any], schedule) -> dict[str, torch.Tensor]:
        with use_target(target):
            return run_kernel(kernel, args, schedule=schedule)

    runner = GpuRunner(kernel, args, arch, run_candidate)
    result = search.tune(kernel, runner, timer=timer, progress=progress, workers=workers)
    forget_calls()
    return result


def tune_segments(scan, args: dict[str, Any], *, arch: str | None = None,
                  timer: Callable[[Callable[[], object]], float] = time_ms,
                  progress: Callable[[str], None] | None = None) -> search.SegmentsResult:
    """Time ``scan`` (a segmented scan of ``tilemix.ops.SEGMENTED``) on ``args`` at each segment count
    its sequence allows, checked against the sequential scan, and cache the fastest for the shape
    on ``arch`` (default: the arch the ops run on here)."""
    device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device
    result = search_segments(scan, args, arch or device_arch(device), timer, progress)
    forget_calls()
    return result


def run_kernel(kernel: Kernel, args: dict[str, Any], labels: dict[str, str] | None = None,
               final_states: tuple[str, ...] | None = None, schedule=None,
               into: dict[str, torch.Tensor] | None = None, signature: tuple | None = None) -> dict[str, torch.Tensor]:
    """Run ``kernel`` on ``args`` (torch tensors, numbers, None for absent
    optionals). Returns its outputs and final states as torch tensors on the
    inputs' device: outputs in the inputs' dtype, states in float32.
    ``final_states`` names the states to return (None: all); a GPU kernel
    neither allocates nor writes the others. ``schedule``: the GPU kernel's
    (default: a tuned one if cached, see ``tilemix.codegen.tune``, else the
    code generator's default). ``into``: outputs or final states written into these tensors
    (contiguous, of their shape and dtype) rather than new ones; a state's own initial tensor is
    updated in place (each program instance reads its block of the state before it writes it). A CUDA call
    whose signature (``call_signature``) ran before skips the checks and choices and only
    allocates, packs and launches. ``signature``: the call's, where the caller computed it (as
    ``call_signature(kernel, args, final_states, schedule, tuple(into))``)."""
    if not kernel.scalar_defaults.keys() <= args.keys():  # a left-out Scalar takes its default, as on the CPU
        args = {**kernel.scalar_defaults, **args}
    if _CAPTURED is not None:
        _CAPTURED.append((kernel, dict(args)))
    into = into or {}
    if signature is None:
        signature = call_signature(kernel, args, final_states, schedule, tuple(into))
    prepared = recall(signature)
    if prepared is not None:
        _refuse_gradients(kernel.name, args.values())
        out = prepared(args, into)
    else:
        out = _written_into(_run_checked(kernel, args, labels, final_states, schedule, signature, into), into)
    recorded = _RECORDED.get()
    if recorded is not None:
        recorded.append((kernel, args, labels, final_states, schedule, into, signature, out))
    return out


def _written_into(out: dict[str, torch.Tensor], into: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``out`` with the results named in ``into`` copied there (where a backend made them apart)."""
    for name, tensor in into.items():
        if out[name] is not tensor:
            tensor.copy_(out[name])
            out[name] = tensor
    return out


def _run_checked(kernel: Kernel, args: dict[str, Any], labels, final_states, schedule, signature,
                 into: dict[str, torch.Tensor]):
    """``run_kernel`` for a call not prepared before: checks, then the CUDA kernel prepared for the
    signature (writing ``into``), or the interpreter (new tensors: ``_written_into`` copies)."""
    labels = labels or {}
    tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    device = check_devices(tensors, labels)
    _refuse_gradients(kernel.name, tensors.values())
    binding = kernel.bind(args, labels)
    if 0 in (binding.sizes.get("B", 1), binding.sizes.get("H", 1)):
        # no program instance at all (B = 0 or H = 0): every output and state is empty
        return {name: t.zero_() for name, t in fake_run(kernel, args, labels, final_states).items()}
    if device.type == "cuda" and 0 in binding.sizes.values():
        # nothing to tile (T = 0, say): the interpreter gives the outputs (empty) and final states
        cpu = run_kernel(kernel, {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()},
                         labels, final_states)
        return {name: t.to(device) for name, t in cpu.items()}
    if device.type == "cuda":
        check_hopper_dims(binding, labels)
        arch = device_arch(device)
        extra = kernel.consts_for(arch, args)
        if extra:  # this arch's block shapes, where the caller chose none
            binding = kernel.bind({**args, **extra}, labels)
        if schedule is None:  # a tuned config for this arch, if `tilemix tune` left one
            tuned = search.config_for(kernel, binding, {**args, **extra}, device, arch,
                                      autotune=lambda: tune(kernel, {**args, **extra}, arch=arch).best)
            if tuned is not None:
                schedule = tuned.schedule
                if tuned.consts:
                    extra = {**extra, **dict(tuned.consts)}
                    binding = kernel.bind({**args, **extra}, labels)
        prepared = _prepare_cuda(kernel, binding, args, extra, device, final_states, schedule, arch)
        if signature is not None:
            remember(signature, prepared)
        return prepared(args, into)
    if device.type != "cpu":
        raise NotImplementedError(f"tilemix.{kernel.name}: no backend for {device} tensors")
    work = torch.float64 if binding.compute_dtype is DType.f64 else torch.float32  # the interpreter's precision
    inputs = {k: (v.detach().to(work).numpy() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    results = kernel.run(binding, inputs)
    out = {}
    for name, array in results.items():
        param = binding.param(name)
        if param.spec.kind == "state" and final_states is not None and name not in final_states:
            continue
        like = tensors[_first_tile_operand(binding)].dtype
        dtype = work if param.spec.kind == "state" else _output_dtype(param, like)
        out[name] = torch.from_numpy(np.array(array)).to(dtype)  # a copy: never an alias of an input
    return out


def check_hopper_dims(binding, labels: dict[str, str]) -> None:
    """Dtypes and feature dims the GPU kernels (sm_90a and generic: the same panels and 16-byte rows)
    cannot take are an error naming the argument, before any compile or launch (the interpreter
    takes any size, and float32/64, on CPU tensors)."""
    if binding.compute_dtype not in (DType.bf16, DType.f16):
        first = _first_tile_operand(binding)
        raise TypeError(f"{labels.get(first, first)}: the GPU kernels take bfloat16 or float16 tensors, got "
                        f"{binding.compute_dtype} (float32 and float64 run through the interpreter on CPU tensors)")
    for p in binding.params:
        if p.present and not p.spec.output and p.spec.kind == "matrix":
            dim = p.spec.dims[-1]
            if binding.sizes[dim] % 8:  # TMA reads rows of a multiple of 16 bytes
                raise ValueError(f"{labels.get(p.name, p.name)}: its {dim} dim is {binding.sizes[dim]}; the GPU "
                                 "kernels need rows of a multiple of 8 elements (16 bytes)")
        if not (p.present and not p.spec.output and p.spec.kind in ("seq", "group_seq")):
            continue
        for dim in p.spec.static_dims:
            size = binding.sizes[dim]
            if size % PANEL:  # both GPU targets move feature dims in 64-column (128-byte) swizzled panels
                raise ValueError(f"{labels.get(p.name, p.name)}: its {dim} dim is {size}; the GPU kernels take "
                                 f"multiples of {PANEL} (CPU tensors run any size through the interpreter)")


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


TARGET_CHOICES = ("auto", "hopper", "generic")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("tilemix_target", default=None)


@contextlib.contextmanager
def use_target(target: str | None):
    """Run the tilemix ops called inside (and, for ops called inside, their backward programs) on
    ``target``: "auto", "hopper" or "generic" (mma.sync kernels, also on an H100); None changes
    nothing. Wins over $TILEMIX_TARGET. CPU tensors always run the interpreter."""
    if target is None:
        yield
        return
    if not isinstance(target, str) or target.lower() not in TARGET_CHOICES:
        raise ValueError(f"target {target!r} is not one of {TARGET_CHOICES}")
    token = _TARGET.set(target.lower())
    try:
        yield
    finally:
        _TARGET.reset(token)


def current_target() -> str | None:
    """The target forced by the innermost ``use_target`` (None: $TILEMIX_TARGET or automatic)."""
    return _TARGET.get()


def call_with_target(target: str | None, fn, *args):
    """``fn(*args)`` under ``use_target(target)``; a plain call when target is None (what
    torch.compile traces)."""
    if target is None:
        return fn(*args)
    with use_target(target):
        return fn(*args)


def device_arch(device) -> str:
    """The arch the ops' kernels run as on CUDA ``device`` now (``select_arch`` under ``use_target``)."""
    return select_arch(_capability(device), _TARGET.get())


def select_arch(capability: tuple[int, int], target: str | None = None) -> str:
    """The arch a CUDA device's kernels are compiled for: compute capability 9.0 → "sm_90a" (Hopper),
    8.x → the exact "sm_8x" (generic mma.sync target). ``target`` (or $TILEMIX_TARGET when it is None)
    forces a backend: "generic" on 9.0 gives "sm_90" (mma.sync code on a Hopper), "hopper" needs 9.0.
    Anything else is a ValueError saying what the device is and what is supported."""
    target = (target or read("TILEMIX_TARGET") or "auto").lower()
    if target not in TARGET_CHOICES:
        raise ValueError(f"target {target!r} is not one of {TARGET_CHOICES} (argument target= or $TILEMIX_TARGET)")
    major, minor = capability
    cc = f"compute capability {major}.{minor}"
    if target == "hopper" and (major, minor) != (9, 0):
        raise ValueError(f"target 'hopper' needs compute capability 9.0 (sm_90a), the device has {cc}")
    if (major, minor) == (9, 0):
        return "sm_90" if target == "generic" else "sm_90a"
    if major == 8:
        return f"sm_{major}{minor}"
    raise ValueError(f"tilemix runs CUDA tensors on compute capability 8.x (generic) or 9.0 (Hopper); "
                     f"the device has {cc}: move the tensors to the CPU to use the interpreter")


MAX_REMEMBERED = 4096  # call signatures remembered per kind (a few KiB each)
_BY_SIGNATURE: dict[str, dict[tuple, Any]] = {"launch": {}, "segments": {}, "calls": {}}
_ENV_KNOBS = ("TILEMIX_TARGET", "TILEMIX_SCHEDULE", "TILEMIX_POISON", "TILEMIX_CACHE", "TILEMIX_AUTOTUNE",
              "TILEMIX_SEGMENTS")


def call_signature(kernel: Kernel, args: dict[str, Any], *extra: Any) -> tuple | None:
    """What a CUDA call's checks and choices (binding, arch, tuned config, schedule, grid) depend on:
    the tensors' shapes, strides, dtypes and devices, the other arguments (a scalar by type only: its
    value is passed at launch), the target, the environment knobs, the SM count, and ``extra``.
    None when a tensor is not on a CUDA device (nothing is remembered for the interpreter) or an
    argument is of a kind no call accepts."""
    parts = []
    device = None
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            if not value.is_cuda:
                return None
            device = value.device
            parts.append((name, value.shape, value.stride(), value.dtype, device))
        elif (spec := kernel.specs.get(name)) is not None and spec.kind == "scalar":
            parts.append((name, type(value)))
        elif value is None or isinstance(value, (bool, int, float, str)):
            parts.append((name, value))
        else:  # not an argument the checks accept: let them say so
            return None
    if device is None:
        return None
    # the launch schedule depends on the SM count (the count it reads)
    return (kernel, _TARGET.get(), snapshot(_ENV_KNOBS), *extra, *parts, schedules.sm_count(device.index))


def remember(signature: tuple, value: Any, kind: str = "launch") -> None:
    """Keep ``value`` for a call signature (``recall`` gives it back): of ``kind`` "launch", the
    prepared launch of a ``run_kernel`` call; "segments", the segment count of a segmented scan's
    (one signature, computed once, serves both); "calls", a public call's replay (``ops/fastpath.py``)."""
    remembered = _BY_SIGNATURE[kind]
    if len(remembered) >= MAX_REMEMBERED:  # many shapes (varying lengths, say): start over
        remembered.clear()
    remembered[signature] = value


def recall(signature: tuple | None, kind: str = "launch") -> Any:
    """What ``remember`` kept for ``signature`` of ``kind``; None if nothing (or the signature is None)."""
    return _BY_SIGNATURE[kind].get(signature) if signature is not None else None


def forget_calls() -> None:
    """Forget every remembered call signature: the next call of each runs the checks and choices
    again (after changing what they depend on in a way ``call_signature`` does not see)."""
    for remembered in _BY_SIGNATURE.values():
        remembered.clear()


def _refuse_gradients(op: str, values) -> None:
    """A NotImplementedError where a gradient is asked of ``op`` (an op or program name), which has
    no backward."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in values):
        raise NotImplementedError(f"tilemix.{op}: gradients are not implemented yet; "
                                  "call it under torch.no_grad() or on tensors that do not require grad")


@dataclass(frozen=True)
class _Prepared:
    """One call signature's CUDA launch, resolved: the constants the arch or a tuned config added,
    the outputs to allocate and the prepared launch. Called with the arguments, it returns the
    outputs."""

    extra: dict[str, Any]
    # (name, shape, dtype, an input shaped, typed and laid out as it or None): ``torch.empty_like`` of
    # such an input costs ~2 µs less host time than ``torch.empty`` (H100 host)
    outputs: tuple[tuple[str, tuple[int, ...], torch.dtype, str | None], ...]
    launch: Any  # tilemix.codegen.launch.Launch
    device: torch.device
    poison: bool

    def __call__(self, args: dict[str, Any], into: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The outputs, new tensors but those ``into`` gives (a state updated in place)."""
        if self.extra:
            args = {**args, **self.extra}
        outputs = new_outputs(self.outputs, args, self.device, self.poison, into)
        outputs.update(into)
        if self.device.index == torch.cuda.current_device():
            self.launch(args, outputs)
        else:
            with torch.cuda.device(self.device):  # costs host time: only when the tensors are not on the current GPU
                self.launch(args, outputs)
        return outputs


def new_outputs(specs: tuple[tuple[str, tuple[int, ...], torch.dtype, str | None], ...], args: dict[str, Any],
                device: torch.device, poison: bool, skip: Any = ()) -> dict[str, torch.Tensor]:
    """Fresh tensors for a prepared launch's outputs (name, shape, dtype, an input laid out as it or
    None), but those named in ``skip``: NaN-filled under ``TILEMIX_POISON`` (tests catch elements a
    kernel leaves unwritten, and compute-sanitizer's initcheck does not count a TMA store as
    initialising), else uninitialised."""
    if poison:
        return {name: torch.full(shape, float("nan"), dtype=dtype, device=device)
                for name, shape, dtype, _ in specs if name not in skip}
    return {name: torch.empty_like(args[like]) if like else torch.empty(shape, dtype=dtype, device=device)
            for name, shape, dtype, like in specs if name not in skip}


def _prepare_cuda(kernel: Kernel, binding, args: dict[str, Any], extra: dict[str, Any], device: torch.device,
                  final_states: tuple[str, ...] | None, schedule, arch: str = "sm_90a") -> _Prepared:
    """The kernel for ``arch`` (``select_arch``: sm_90a is the Hopper lowering, sm_8x and sm_90 the
    generic mma.sync one) on ``binding`` (``args`` with the constants ``extra``), prepared to
    launch into freshly allocated outputs."""
    prepared = launch.prepare_launch(kernel, binding, {**args, **extra}, schedule, arch, device.index)
    outputs = tuple((name, shape, dtype, _alike(args, shape, dtype))
                    for name, shape, dtype in output_specs(binding, args, final_states))
    return _Prepared(extra, outputs, prepared, device, bool(read("TILEMIX_POISON")))


def _alike(args: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """An input of ``shape`` and ``dtype``, contiguous with exactly the strides torch gives a new
    tensor of that shape (so ``empty_like`` of it is one): the call signature fixes all three."""
    contiguous = torch.empty(shape, device="meta").stride()
    return next((name for name, t in args.items() if isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape)
                 and t.dtype == dtype and t.stride() == contiguous), None)


def _output_dtype(param, like: torch.dtype) -> torch.dtype:
    """An output's torch dtype: a tile output's is the inputs' (``like``), a per-token scalar's
    (``Out[Seq[1]]``) float32, or float64 in a float64 program."""
    if param.spec.is_tile_operand:
        return like
    return torch.float64 if param.dtype is DType.f64 else torch.float32


def _first_tile_operand(binding) -> str:
    """The input the compute dtype comes from: the first that feeds matmuls, else (matmuls that read only
    State or Head tiles) the first of that dtype."""
    inputs = [p for p in binding.params if p.present and not p.spec.output and p.dtype is binding.compute_dtype]
    return next((p.name for p in inputs if p.spec.is_tile_operand), inputs[0].name)
