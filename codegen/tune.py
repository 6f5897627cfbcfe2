"""Autotuning: search a program's schedules and block sizes on the GPU it runs on.

A ``Config`` is a ``Schedule`` plus overrides of the program's block-size ``Const``s. The space is
derived from what the code generator exposes (ring depth, consumer warpgroups, block sizes);
candidates that do not fit shared memory, or that spill, are dropped before any timing. Each
survivor is compiled (in parallel), checked and timed by the runner and timer the caller passes
(``tilemix.ops.runtime.tune`` passes the GPU ones: a check against the interpreter on the first
tokens of the real inputs — a fast wrong kernel never wins — and CUDA events). The winner is
cached per (program, GPU, capability, target arch, dtype, shape bucket) as a small JSON file
written atomically; a damaged file is ignored and rewritten. Both targets tune: sm_90a's kernels,
and the generic ones (sm_8x, or sm_90 where an H100 is told to run them), each with its own cache
entries.
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

from .schedule import Schedule

__all__ = ["Config", "TuneResult", "config_space", "tune", "cached_config", "cache_key", "config_for",
           "SegmentsResult", "tuned_segments", "store_segments", "forget_choices"]

MAX_STAGES = 4


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


def config_for(kernel: Kernel, binding: Binding, args: dict[str, Any], device, arch: str = "sm_90a",
               autotune: Callable[[], Config] | None = None) -> Config | None:
    """The tuned config of this call on ``arch``: from memory, else from the cache dir, else (with
    ``TILEMIX_AUTOTUNE=1``) ``autotune()``, which tunes it now; None means the default schedule."""
    memo = (id(kernel), binding.key(), tuple(_bucket(v) for k, v in sorted(binding.sizes.items())), device, arch)
    if memo not in _LOOKUPS:
        import torch

        key = cache_key(kernel, binding, torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device),
                        arch)
        config = cached_config(key)
        if config is not None and not usable(kernel, args, config, arch):
            config = None  # tuned by an older code generator; the default (or a new tune) instead
        if config is None and autotune is not None and os.environ.get("TILEMIX_AUTOTUNE") == "1":
            config = autotune()
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
def tune(kernel: Kernel, runner, *, timer: Callable[[Callable[[], object]], float],
         progress: Callable[[str], None] | None = None, workers: int | None = None) -> TuneResult:
    """Search ``kernel``'s configs with ``runner`` and ``timer`` and cache the winner under
    ``runner.key``.

    ``runner`` has the call's ``binding``, ``default`` schedule and cache ``key``, and
    ``prepare(config) -> error or None`` (lower and compile), ``check(config) -> error or None``
    (correctness), ``launch(config) -> callable`` and optionally ``fits(config) -> bool``;
    ``timer(callable) -> ms``. ``tilemix.ops.runtime.tune`` passes the GPU ones; tests pass fakes."""
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
    forget_choices()
    return result


def forget_choices() -> None:
    """After a tune: calls in this process look their configs and segment counts up again (the
    runtime also forgets the calls it prepared with the old ones)."""
    _LOOKUPS.clear()
    _SEGMENTS.clear()


# -- sequence segments of a scan (ops/_segments.py) ----------------------------------------------------
@dataclass
class SegmentsResult:
    best: int
    default: int
    times: dict[int, float] = field(default_factory=dict)  # ms per segment count timed
    rejected: dict[int, str] = field(default_factory=dict)


def _segments_key(scan, binding: Binding, device, arch: str) -> str:
    """The cache key of a scan's segment count for the kernels of ``arch``."""
    import torch

    gpu, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    return cache_key(scan.kernel, binding, gpu, capability, arch) + "-segments"


_SEGMENTS: dict[tuple, int | None] = {}


def tuned_segments(scan, binding: Binding, device, arch: str = "sm_90a") -> int | None:
    """The cached segment count for this call's shape bucket on ``arch`` (the arch its kernels run
    as now), or None (the heuristic decides)."""
    memo = (id(scan), binding.key(), tuple(_bucket(v) for k, v in sorted(binding.sizes.items())), device, arch)
    if memo not in _SEGMENTS:
        try:
            count = json.loads(_cache_path(_segments_key(scan, binding, device, arch)).read_text())["segments"]
            _SEGMENTS[memo] = count if isinstance(count, int) and count >= 1 else None
        except (OSError, ValueError, KeyError, TypeError):
            _SEGMENTS[memo] = None
    return _SEGMENTS[memo]


def store_segments(scan, binding: Binding, device, arch: str, count: int) -> None:
    """Cache ``count`` as the segment count of this call's shape bucket on ``arch`` (what
    ``tuned_segments`` then gives)."""
    _store_text(_segments_key(scan, binding, device, arch), json.dumps({"segments": count}))
    forget_choices()
