"""Autotuning: search a program's schedules and block sizes on the GPU it runs on.

A ``Config`` is a ``Schedule`` plus overrides of the program's block-size ``Const``s; the space
(``schedule.config_space``) is derived from what the code generator exposes (ring depth, consumer
warpgroups, block sizes); candidates that do not fit shared memory, or that spill, are dropped
before any timing. Each survivor is compiled (in parallel), checked and timed by the runner and
timer the caller passes (``tilemix.ops.runtime.tune`` passes the GPU ones: a check against the
interpreter on the first tokens of the real inputs — a fast wrong kernel never wins — and CUDA
events). The winner is cached per (program, GPU, capability, target arch, dtype, shape bucket) as
a small JSON file written atomically; a damaged file is ignored and rewritten. Both targets tune:
sm_90a's kernels, and the generic ones (sm_8x, or sm_90 where an H100 is told to run them), each
with its own cache entries.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tilemix.tiles import Kernel
from tilemix.tiles.errors import TileError
from tilemix.tiles.params import Binding

from .env import cache_root, read
from .schedule import Config, Schedule, config_space, legal

__all__ = ["TuneResult", "tune", "cached_config", "cache_key", "config_for",
           "SegmentsResult", "tuned_segments", "store_segments", "forget_choices"]



@dataclass
class TuneResult:
    best: Config
    default: Config
    times: dict[Config, float] = field(default_factory=dict)  # ms of every candidate timed
    rejected: dict[Config, str] = field(default_factory=dict)  # why the others were dropped


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
    return cache_root() / "tuned" / f"{key}.json"


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
        if config is None and autotune is not None and read("TILEMIX_AUTOTUNE") == "1":
            config = autotune()
        _LOOKUPS[memo] = config
    return _LOOKUPS[memo]


def usable(kernel: Kernel, args: dict[str, Any], config: Config, arch: str = "sm_90a") -> bool:
    """Whether the code generator still lowers ``config`` for these arguments on ``arch`` (a cached
    config may come from an older version of it, or name a block size the program no longer has)."""
    from .specialise import kernel_source

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
