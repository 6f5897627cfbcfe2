"""Autotuning: search a program's schedules and block sizes on the GPU it runs on.

A ``Config`` is a ``Schedule`` plus overrides of the program's block-size ``Const``s. The space is
derived from what the code generator exposes (ring depth, consumer warpgroups, block sizes);
candidates that do not fit shared memory, or that spill, are dropped before any timing. Each
survivor is compiled (in parallel), run on the first tokens (rows) of the real inputs and checked
against the interpreter — a fast wrong kernel never wins — then timed (CUDA events after an
L2-flushing write, median). The winner is cached per (program, GPU, capability, target arch,
dtype, shape bucket) as a small JSON file written atomically; a damaged file is ignored and
rewritten. Both targets tune: sm_90a's kernels, and the generic ones (sm_8x, or sm_90 where an
H100 is told to run them), each with its own cache entries.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tilemix.tiles import Kernel
from tilemix.tiles.errors import TileError
from tilemix.tiles.params import Binding
from tilemix.tiles.types import DType

from .schedule import Schedule

__all__ = ["Config", "TuneResult", "config_space", "tune", "cached_config", "cache_key", "config_for",
           "SegmentsResult", "tune_segments", "tuned_segments"]

MAX_STAGES = 4
_TORCH_NAMES = {DType.f32: "float32", DType.f16: "float16", DType.bf16: "bfloat16"}
CHECK_ROWS = 256  # tokens (or matrix rows) of the real inputs each candidate is checked on


@dataclass(frozen=True)
class Config:
    schedule: Schedule
    consts: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        parts = [f"{f.name}={_show(getattr(self.schedule, f.name))}" for f in fields(Schedule)
                 if f.name in ("stages", "consumers") or getattr(self.schedule, f.name) != f.default]
        return " ".join(parts + [f"{k}={v}" for k, v in self.consts])


def _show(value) -> str:
    if isinstance(value, tuple):  # split: (("V", 64),) -> V/64
        return ",".join(f"{d}/{w}" for d, w in value) or "-"
    return str(value)


@dataclass
class TuneResult:
    best: Config
    default: Config
    times: dict[Config, float] = field(default_factory=dict)  # ms of every candidate timed
    rejected: dict[Config, str] = field(default_factory=dict)  # why the others were dropped


# -- the space -------------------------------------------------------------------------
def _block_consts(kernel: Kernel, binding: Binding) -> dict[str, list[int]]:
    """Alternatives for the program's block-size constants: integer Consts that are multiples of 64
    (bools such as is_causal are not sizes), halved and doubled within 64..256."""
    choices = {}
    for name, spec in kernel.specs.items():
        value = binding.values.get(name)
        if spec.kind == "const" and isinstance(value, int) and not isinstance(value, bool) and value % 64 == 0:
            choices[name] = sorted({v for v in (value // 2, value, value * 2) if 64 <= v <= 256 and v % 64 == 0})
    return choices


# Alternatives for the Schedule fields the tuner varies. A field of Schedule may declare its own
# with ``field(default=..., metadata={"choices": (...)})``; those take precedence, so a knob the code
# generator adds is searched without touching this module.
KNOB_CHOICES: dict[str, tuple] = {"stages": tuple(range(1, MAX_STAGES + 1)), "consumers": (1, 2)}
PLANE = ("stages", "consumers")  # searched as a product; every other knob one at a time


def knob_choices() -> dict[str, tuple]:
    """Schedule field -> the values the tuner tries (field metadata first, then KNOB_CHOICES)."""
    found = {}
    for f in fields(Schedule):
        choices = f.metadata.get("choices", KNOB_CHOICES.get(f.name)) if f.metadata else KNOB_CHOICES.get(f.name)
        if choices:
            found[f.name] = tuple(choices)
    return found


def _split_alternatives(binding: Binding, default: Schedule) -> list[tuple[tuple[str, int], ...]]:
    """The default's column split with one dim's width halved or doubled (multiples of 64 that
    divide the dim)."""
    out = []
    for i, (dim, width) in enumerate(default.split):
        extent = binding.static.get(dim, 0)
        for w in (width // 2, width * 2):
            if w >= 64 and w % 64 == 0 and extent % w == 0 and w <= extent:
                out.append(default.split[:i] + ((dim, w),) + default.split[i + 1:])
    return out


def legal(schedule: Schedule, binding: Binding) -> bool:
    """Consumers over columns each take whole column blocks: their count must divide the split's
    blocks (a scan with no split has one block, so one consumer). Consumers over heads each take a
    head of one group: their count must divide H and H/G, with no split."""
    if schedule.consumer_axis == "heads":
        from .launch import heads_per_cta

        try:
            heads_per_cta(schedule, binding.sizes)
        except ValueError:
            return False
        return not schedule.split and "H" in binding.sizes
    if schedule.consumer_axis != "columns":
        return True
    blocks = 1
    for dim, width in schedule.split:
        extent = binding.static.get(dim)
        if extent is None or extent % width:
            return False
        blocks *= extent // width
    return blocks % schedule.consumers == 0


def config_space(kernel: Kernel, binding: Binding, default: Schedule,
                 fits: Callable[[Config], bool] | None = None) -> list[Config]:
    """The default first, then every ring depth x consumer warpgroups at the default block sizes,
    then each other Schedule knob's choices alone, the split's widths (halved, doubled; with each
    consumer count that fits), then each block size's alternatives at the default schedule: one
    axis at a time around the default, so a tune stays within a minute (the full product for gemm
    was 65 kernels and 120 s on the H100). Schedules the launch cannot map (``legal``) are left out.
    ``fits(config)`` (the lowering's shared-memory check) lets a larger block size take a shallower
    ring, then one consumer, where the default schedule has no room for it."""
    knobs = knob_choices()
    plane = [k for k in PLANE if k in knobs]
    space = [Config(default)]
    for values in itertools.product(*(knobs[k] for k in plane)):
        space.append(Config(replace(default, **dict(zip(plane, values)))))
    for name, values in knobs.items():
        if name not in plane:
            space += [Config(replace(default, **{name: v})) for v in values]
    for split in _split_alternatives(binding, default):
        space += [Config(replace(default, split=split, consumers=c)) for c in knobs.get("consumers", (1,))]
    shallower = [replace(default, consumers=c, stages=st) for c in sorted({default.consumers, 1}, reverse=True)
                 for st in range(default.stages, 0, -1)]
    for name, values in sorted(_block_consts(kernel, binding).items()):
        for v in values:
            if v != binding.values[name]:
                options = [Config(sched, ((name, v),)) for sched in shallower]
                space.append(next((c for c in options if fits(c)), options[0]) if fits else options[0])
    space = [c for c in space if c == space[0] or legal(c.schedule, binding)]
    return list(dict.fromkeys(space))  # the default appears once, first


# -- the cache ---------------------------------------------------------------------------
def _bucket(size: int) -> int:
    """Runtime sizes tune per power of two (T = 3000 and 4000 share a config)."""
    return 1 << max(size - 1, 0).bit_length()


def cache_key(kernel: Kernel, binding: Binding, gpu: str, capability: tuple[int, int], arch: str = "sm_90a") -> str:
    program = _PROGRAM_HASH.get(id(kernel))
    if program is None:
        program = _PROGRAM_HASH[id(kernel)] = hashlib.sha256(inspect.getsource(kernel.fn).encode()).hexdigest()[:16]
    runtime = {k: _bucket(v) for k, v in sorted(binding.sizes.items()) if k not in binding.static}
    parts = [program, gpu, f"sm_{capability[0]}{capability[1]}", arch, str(binding.compute_dtype),
             json.dumps(sorted(binding.static.items())), json.dumps(sorted(runtime.items())),
             json.dumps(sorted((k, repr(v)) for k, v in binding.values.items() if kernel.specs[k].kind == "const"))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _cache_path(key: str) -> Path:
    root = Path(os.environ.get("TILEMIX_CACHE", Path.home() / ".cache" / "tilemix"))
    return root / "tuned" / f"{key}.json"


def _to_json(config: Config) -> str:
    return json.dumps({"schedule": asdict(config.schedule), "consts": list(config.consts)})


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _from_json(text: str) -> Config:
    """Every Schedule field by name (lists back to tuples); a field the file lacks keeps its default,
    one Schedule does not have (or a wrong type) makes the file unreadable: tuned again."""
    data = json.loads(text)
    s = data["schedule"]
    known = {f.name: f for f in fields(Schedule)}
    if not isinstance(s, dict) or set(s) - set(known):
        raise ValueError("schedule fields differ")
    values = {name: _tuples(v) for name, v in s.items()}
    for name, v in values.items():
        default = known[name].default
        if default is not MISSING and type(v) is not type(default):
            raise TypeError(f"{name}: {v!r}")
    return Config(Schedule(**values), tuple((str(k), v) for k, v in data["consts"]))


def cached_config(key: str) -> Config | None:
    """The tuned config for ``key``, or None (absent, unreadable or damaged: tuned again)."""
    try:
        return _from_json(_cache_path(key).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_config(key: str, config: Config) -> None:
    _store_text(key, _to_json(config))


def _store_text(key: str, text: str) -> None:
    """Write aside and rename: concurrent writers each leave a whole file, one of them wins."""
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)
    except OSError:
        pass  # an unwritable cache only costs tuning again


_PROGRAM_HASH: dict[int, str] = {}
_LOOKUPS: dict[tuple, Config | None] = {}


def config_for(kernel: Kernel, binding: Binding, args: dict[str, Any], device, arch: str = "sm_90a") -> Config | None:
    """The tuned config of this call on ``arch``: from memory, else from the cache dir, else (with
    ``TILEMIX_AUTOTUNE=1``) tuned now on ``args``; None means the default schedule."""
    memo = (id(kernel), binding.key(), tuple(_bucket(v) for k, v in sorted(binding.sizes.items())), device, arch)
    if memo not in _LOOKUPS:
        import torch

        key = cache_key(kernel, binding, torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device),
                        arch)
        config = cached_config(key)
        if config is not None and not usable(kernel, args, config, arch):
            config = None  # tuned by an older code generator; the default (or a new tune) instead
        if config is None and os.environ.get("TILEMIX_AUTOTUNE") == "1":
            config = tune(kernel, args, arch=arch).best
        _LOOKUPS[memo] = config
    return _LOOKUPS[memo]


def usable(kernel: Kernel, args: dict[str, Any], config: Config, arch: str = "sm_90a") -> bool:
    """Whether the code generator still lowers ``config`` for these arguments on ``arch`` (a cached
    config may come from an older version of it, or name a block size the program no longer has)."""
    from .launch import kernel_source

    try:
        binding = kernel.bind({**args, **dict(config.consts)})
        if not legal(config.schedule, binding):
            return False
        kernel_source(kernel, binding, config.schedule, arch)
    except (TileError, TypeError, ValueError, KeyError):
        return False
    return True


# -- the search ----------------------------------------------------------------------------
def tune(kernel: Kernel, args: dict[str, Any], *, timer: Callable[[Callable[[], object]], float] | None = None,
         runner=None, progress: Callable[[str], None] | None = None, workers: int | None = None,
         arch: str | None = None) -> TuneResult:
    """Tune ``kernel`` for ``args`` (CUDA tensors) on ``arch`` (default: the arch the ops run on
    here, see ``use_target``) and cache the winner.

    ``timer(fn) -> ms`` and ``runner`` (an object with ``prepare(config) -> error or None``,
    ``check(config) -> error or None`` and ``launch(config) -> callable``) default to the GPU ones;
    tests pass fakes."""
    runner = runner or _GpuRunner(kernel, args, arch)
    timer = timer or _gpu_timer()
    space = config_space(kernel, runner.binding, runner.default, getattr(runner, "fits", None))
    result = TuneResult(best=space[0], default=space[0])
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        prepared = list(pool.map(runner.prepare, space))  # lowering + NVRTC, in parallel
    for config, error in zip(space, prepared):
        try:
            error = error or runner.check(config)
            if not error:
                result.times[config] = timer(runner.launch(config))
        except Exception as e:  # a candidate that fails to launch is dropped, not the tune
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if error:
            result.rejected[config] = error
            if config == result.default:
                raise RuntimeError(f"the default config of {kernel.name} failed: {error}")
        if progress:
            progress(config.describe())
    result.best = min(result.times, key=result.times.get)
    store_config(runner.key, result.best)
    _forget_choices()
    return result


def _forget_choices() -> None:
    """After a tune: calls in this process look their configs and segment counts up again."""
    from tilemix.ops.runtime import forget_calls

    _LOOKUPS.clear()
    _SEGMENTS.clear()
    forget_calls()


def _gpu_timer():
    from tilemix.bench.bench import time_ms

    return time_ms


class _GpuRunner:
    """Compiles, checks and launches candidate configs of one call on the current GPU."""

    def __init__(self, kernel: Kernel, args: dict[str, Any], arch: str | None = None):
        import torch

        from tilemix.ops.runtime import current_target, select_arch

        from .launch import launch_schedule

        device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device
        capability = torch.cuda.get_device_capability(device)
        self.arch = arch or select_arch(capability, current_target())
        args = {**kernel.consts_for(self.arch, args), **args}  # the block shapes an untuned call runs here
        self.kernel, self.args = kernel, args
        self.binding = kernel.bind(args)
        self.target = "hopper" if self.arch == "sm_90a" else "generic"  # what runs a candidate
        self.default = launch_schedule(kernel, self.binding, device.index, self.arch)  # what an untuned call runs
        self.key = cache_key(kernel, self.binding, torch.cuda.get_device_name(device), capability, self.arch)
        self.small = self._first_rows(args)
        self._reference = None

    def _first_rows(self, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` cut to their first CHECK_ROWS along one runtime dim: the sequence (T), or for
        matrix programs the first matrix's rows (gemm's M), in every tensor that has that dim."""
        import torch

        layouts = {p.name: p.spec.layout for p in self.binding.params if p.present and not p.spec.output}
        matrices = [layout for layout in layouts.values() if len(layout) == 2 and "T" not in layout]
        dim = "T" if "T" in self.binding.sizes else matrices[0][0]
        small = dict(args)
        for name, layout in layouts.items():
            value = args.get(name)
            if isinstance(value, torch.Tensor) and dim in layout:
                axis = layout.index(dim)
                small[name] = value.narrow(axis, 0, min(value.shape[axis], CHECK_ROWS)).contiguous()
        return small

    def _with(self, config: Config, args: dict[str, Any]) -> dict[str, Any]:
        return {**args, **dict(config.consts)}

    def fits(self, config: Config) -> bool:
        """Whether the lowering takes ``config`` (shared memory; no compile)."""
        from .launch import kernel_source

        try:
            kernel_source(self.kernel, self.kernel.bind(self._with(config, self.args)), config.schedule, self.arch)
        except TileError:
            return False
        return True

    def prepare(self, config: Config) -> str | None:
        from .compile import CompileError, compile_cuda, resources
        from .launch import kernel_source

        try:
            binding = self.kernel.bind(self._with(config, self.args))
            source = kernel_source(self.kernel, binding, config.schedule, self.arch)
            usage = resources(compile_cuda(source.source, self.arch, source.name))
        except (TileError, CompileError) as e:
            return str(e).splitlines()[0]
        if config == Config(self.default):
            return None  # what an untuned call runs: timed even if it spills
        if usage["local"] or usage["stack"] > 64:
            return f"spills ({usage['local']} B local, {usage['stack']} B stack)"
        return None

    def _run(self, config: Config, args: dict[str, Any]):
        from tilemix.ops.runtime import run_kernel, use_target

        with use_target(self.target):
            return run_kernel(self.kernel, self._with(config, args), schedule=config.schedule)

    def check(self, config: Config) -> str | None:
        """Against the interpreter on the first rows: no worse than twice the default's error (and
        within the dtype's bound if the default is)."""
        import torch

        from tilemix.reference.tolerance import bound

        if self._reference is None:
            cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.small.items()}
            self._reference = self._run(Config(self.default), cpu)
            self._default_err = max(self._error(self._run(Config(self.default), self.small)).values())
        limit = max(bound(_TORCH_NAMES[self.binding.compute_dtype]), 2 * self._default_err)
        errors = self._error(self._run(config, self.small))
        worst = max(errors, key=errors.get)
        if not errors[worst] <= limit:
            return f"{worst} differs from the interpreter by {errors[worst]:.2e} (limit {limit:.2e})"
        return None

    def _error(self, outputs) -> dict[str, float]:
        from tilemix.reference.tolerance import rel_err

        return {name: rel_err(out.cpu(), self._reference[name].double().numpy()) for name, out in outputs.items()}

    def launch(self, config: Config) -> Callable[[], object]:
        return lambda: self._run(config, self.args)


# -- sequence segments of a scan (ops/_segments.py) ----------------------------------------------------
@dataclass
class SegmentsResult:
    best: int
    default: int
    times: dict[int, float] = field(default_factory=dict)  # ms per segment count timed
    rejected: dict[int, str] = field(default_factory=dict)


def _segments_key(scan, binding: Binding, device) -> str:
    """The cache key of a scan's segment count, for the arch its kernels run as now."""
    import torch

    from tilemix.ops.runtime import device_arch

    gpu, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    return cache_key(scan.kernel, binding, gpu, capability, device_arch(device)) + "-segments"


_SEGMENTS: dict[tuple, int | None] = {}


def tuned_segments(scan, binding: Binding, device, arch: str = "sm_90a") -> int | None:
    """The cached segment count for this call's shape bucket on ``arch`` (the arch its kernels run
    as now), or None (the heuristic decides)."""
    memo = (id(scan), binding.key(), tuple(_bucket(v) for k, v in sorted(binding.sizes.items())), device, arch)
    if memo not in _SEGMENTS:
        try:
            count = json.loads(_cache_path(_segments_key(scan, binding, device)).read_text())["segments"]
            _SEGMENTS[memo] = count if isinstance(count, int) and count >= 1 else None
        except (OSError, ValueError, KeyError, TypeError):
            _SEGMENTS[memo] = None
    return _SEGMENTS[memo]


def tune_segments(scan, args: dict[str, Any], *, timer: Callable[[Callable[[], object]], float] | None = None,
                  progress: Callable[[str], None] | None = None) -> SegmentsResult:
    """Time ``scan`` (a ``SegmentedScan``) on ``args`` at each segment count T allows, checked against
    the sequential scan's outputs (within the dtype's bound), and cache the fastest for the shape."""
    import torch

    from tilemix.reference.tolerance import bound, rel_err

    timer = timer or _gpu_timer()
    binding = scan.kernel.bind(args)
    device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device.index
    default = scan.default_segments(args, tuned=False)
    result = SegmentsResult(best=default, default=default)
    sequential = scan(args, final_states=None, segments=1)
    limit = bound(_TORCH_NAMES.get(binding.compute_dtype, "float32"))  # float64 (CPU tests): float32's
    for count in scan.segment_choices(binding.sizes["T"]):
        errors = {} if count == 1 else {  # the sequential scan is the reference itself
            name: rel_err(out.double().cpu(), sequential[name].double().cpu())
            for name, out in scan(args, final_states=None, segments=count).items()}
        worst = max(errors, key=errors.get, default=None)
        if worst is None or errors[worst] <= limit:
            result.times[count] = timer(lambda count=count: scan(args, final_states=(), segments=count))
        else:
            result.rejected[count] = f"{worst} differs from the sequential scan by {errors[worst]:.2e}"
        if progress:
            progress(f"segments={count}")
    if default not in result.times:
        raise RuntimeError(f"{scan.kernel.name} at its default {default} segments failed: "
                           f"{result.rejected.get(default)}")
    result.best = min(result.times, key=result.times.get)
    key = _segments_key(scan, binding, device)
    _store_text(key, json.dumps({"segments": result.best}))
    _forget_choices()
    return result
