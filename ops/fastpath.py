"""Remembered public calls (issue 24: <= 20 µs of host time for a call seen before).

``fast_path(fn)`` wraps an op's public function. A call's key is everything its checks and choices
can read: each tensor's shape, strides, dtype, device and inference flag, every other argument by
type and value (-0.0 apart from 0.0), keyword names, the target, the ``TILEMIX_*`` variables, grad
and inference mode and a CUDA device's SM count. The first call of a key runs in full and records
the ``run_kernel`` calls it makes (``runtime.record_launches``); a later call of that key replays
them: each remembered launch on this call's tensors, its results returned as the first call's
were. The checks are skipped because the key fixes their outcome; data addresses are not in the
key, the launch reads them (and copies a view TMA cannot read where it lies). A call with a tensor
that requires grad under grad mode always runs in full (autograd records it).

A call is only replayed where the recording shows it is nothing but its launches: every tensor a
launch reads is an argument (by identity) or an earlier launch's result, every tensor returned is
one of those, no argument changed but those launches wrote, the host read no tensor values
(``runtime.host_read``), no result requires grad, and no two arguments were the same tensor.
Anything else (a torch op between launches, a packed batch's offsets read on the host, a segmented
scan's combine) runs in full every time. Traced, captured, profiled, moded or autocast calls (an op
may register autocast, which casts in the dispatcher) and calls on tensor subclasses always run in
full (``torch.compile`` and ``opcheck`` see the custom ops); a call recorded under CUDA-graph
capture is not remembered, and a replay under capture makes the launches an eager call makes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import tilemix.ops.runtime as runtime
from tilemix.codegen import schedule as schedules
from tilemix.codegen.env import VARIABLES, snapshot

from .eager import _eager

__all__ = ["fast_path"]

_C = torch._C
_KNOBS = tuple(v.name for v in VARIABLES)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_VALUES = (bool, int, str, type(None))
_FULL = "run in full"  # remembered for a key whose calls cannot be replayed


def fast_path(fn: Callable | None = None, *, method: bool = False) -> Callable:
    """``fn`` (a public op function) with its calls remembered per key (module docstring); a
    decorator when ``fn`` is None. ``method``: ``fn`` is a ``__call__``, its instance (an op object
    that does not change after it is made) keyed by identity."""
    if fn is None:
        return functools.partial(fast_path, method=method)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not _eager() or runtime.watching() or _C._is_any_autocast_enabled():  # _eager first: compile folds it
            return fn(*args, **kwargs)
        values = (*args, *kwargs.values()) if kwargs else args
        key = _key((fn, args[0]) if method else fn, values[method:], tuple(kwargs) if kwargs else ())
        if key is None:
            return fn(*args, **kwargs)
        replay = runtime.recall(key, "calls")
        if replay is None:
            return _record(fn, key, values, args, kwargs)
        if replay is _FULL:
            return fn(*args, **kwargs)
        return replay(values)

    return call


def _key(fn: Callable, values: tuple, names: tuple) -> tuple | None:
    """The call's key (module docstring); None for an argument of a type the key does not cover, or
    where autograd records the call (a tensor requires grad): such calls run in full."""
    grad = _C.is_grad_enabled()
    parts = [fn, names, runtime.current_target(), snapshot(_KNOBS), grad, _C.is_inference_mode_enabled()]
    device = None
    for value in values:
        kind = type(value)
        if kind in _PLAIN:
            if grad and value.requires_grad:
                return None
            device = value.device
            parts.append((value.shape, value.stride(), value.dtype, device, value.is_inference()))
        elif kind is float:
            parts.append(value if value else repr(value))  # -0.0 apart from 0.0
        elif kind in _VALUES:
            parts.append((kind, value))  # True apart from 1
        else:
            return None
    if device is not None and device.type == "cuda":
        parts.append(schedules.sm_count(device.index))
    return tuple(parts)


def _record(fn: Callable, key: tuple, values: tuple, args: tuple, kwargs: dict):
    """Run the call in full, recording its launches, and remember its replay (or that it has none)."""
    tensors = [(i, v) for i, v in enumerate(values) if type(v) in _PLAIN]
    before = [_version(v) for _, v in tensors]
    with runtime.record_launches() as launches:
        result = fn(*args, **kwargs)
    changed = {i: (after - was) for (i, v), was in zip(tensors, before)
               if was is not None and (after := _version(v)) != was}
    if not _capturing():  # a captured call may choose otherwise (no host reads): remember eager ones
        replay = _replay(values, tensors, launches, result, changed)
        runtime.remember(key, _FULL if replay is None else replay, "calls")
    return result


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


class _Unreplayable(Exception):
    """The recorded call is more than its launches."""


@dataclass(frozen=True)
class _Launch:
    """One recorded ``run_kernel`` call: the prepared launch its signature resolved to (None: the
    interpreter, which ``run_kernel`` runs again), its arguments as constants plus where each tensor
    comes from (an argument's index, or an earlier launch's result)."""

    prepared: Any
    kernel: Any
    labels: Any
    final_states: Any
    schedule: Any
    constants: dict[str, Any]
    from_call: tuple[tuple[str, int], ...]
    from_launch: tuple[tuple[str, int, str], ...]
    into: tuple[str, ...]


@dataclass(frozen=True)
class _Replay:
    """A recorded call's launches, the versions of the arguments they bump, and its result's shape."""

    launches: tuple[_Launch, ...]
    bumps: tuple[tuple[int, int], ...]  # (argument index, version increments the full call made)
    result: Callable[[tuple, list], Any]

    def __call__(self, values: tuple):
        versions = [values[i]._version for i, _ in self.bumps] if self.bumps else ()
        outs = []
        for launch in self.launches:
            args = dict(launch.constants)
            for name, i in launch.from_call:
                args[name] = values[i]
            for name, j, result in launch.from_launch:
                args[name] = outs[j][result]
            into = {name: args[name] for name in launch.into}
            if launch.prepared is not None:
                outs.append(launch.prepared(args, into))
            else:
                outs.append(runtime.run_kernel(launch.kernel, args, launch.labels, launch.final_states,
                                               launch.schedule, into))
        for (i, count), was in zip(self.bumps, versions):
            for _ in range(count - (values[i]._version - was)):  # what the launches did not bump themselves
                torch.autograd.graph.increment_version(values[i])
        return self.result(values, outs)


def _replay(values: tuple, tensors: list, launches: list, result: Any, changed: dict[int, int]) -> _Replay | None:
    """The replay of a recorded call, or None where it is more than its launches (module docstring)."""
    index = {id(v): i for i, v in tensors}
    if len(index) < len(tensors) or None in launches:
        return None  # an argument passed twice, or a value read on the host
    made: dict[int, tuple[int, str]] = {}  # id of a launch's result -> (launch, name)
    recorded = []
    written = set()
    try:
        for j, (kernel, args, labels, final_states, schedule, into, signature, out) in enumerate(launches):
            constants, from_call, from_launch = {}, [], []
            for name, value in args.items():
                if isinstance(value, torch.Tensor):
                    source = _source(value, index, made)
                    (from_call if isinstance(source, int) else from_launch).append(
                        (name, source) if isinstance(source, int) else (name, *source))
                else:
                    constants[name] = value
            if any(args.get(name) is not t for name, t in into.items()):
                return None  # written into a tensor that is not the argument of its name
            written.update(index[id(t)] for t in into.values() if id(t) in index)
            recorded.append(_Launch(runtime.recall(signature), kernel, labels, final_states, schedule, constants,
                                    tuple(from_call), tuple(from_launch), tuple(into)))
            made.update({id(t): (j, name) for name, t in out.items()})
        build = _builder(result, index, made)
    except _Unreplayable:
        return None
    if not set(changed) <= written:
        return None  # an argument changed in place by something other than a launch
    return _Replay(tuple(recorded), tuple(changed.items()), build)


def _source(t: torch.Tensor, index: dict[int, int], made: dict[int, tuple[int, str]]) -> int | tuple[int, str]:
    """Where a recorded tensor comes from: an argument's index or (launch, result name)."""
    if id(t) in index:
        return index[id(t)]
    if id(t) in made:
        return made[id(t)]
    raise _Unreplayable


def _builder(result: Any, index: dict[int, int], made: dict[int, tuple[int, str]]) -> Callable[[tuple, list], Any]:
    """A function of (arguments, launch results) giving the recorded call's result in its shape:
    tensors from arguments or launches, None and plain values as they were, tuples and lists."""
    if isinstance(result, torch.Tensor):
        if result.requires_grad:
            raise _Unreplayable  # autograd recorded it
        source = _source(result, index, made)
        if isinstance(source, int):
            return lambda values, outs: values[source]
        j, name = source
        return lambda values, outs: outs[j][name]
    if type(result) in (tuple, list):
        parts = [_builder(r, index, made) for r in result]
        kind = type(result)
        return lambda values, outs: kind([part(values, outs) for part in parts])
    if type(result) in (*_VALUES, float):
        return lambda values, outs: result
    raise _Unreplayable
