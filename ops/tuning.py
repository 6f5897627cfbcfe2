"""The runtime's side of tuning: running, checking and timing the candidates that ``codegen.tune``
searches (the search and its cache know nothing of torch tensors, the interpreter or the
reference tolerances; this module brings them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tilemix.codegen.compile import CompileError, compile_cuda, resources
from tilemix.codegen.schedule import Config, Schedule, launch_schedule, segment_choices
from tilemix.codegen.specialise import kernel_source
from tilemix.codegen.tune import SegmentsResult, cache_key, store_segments
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import Kernel
from tilemix.tiles.errors import TileError
from tilemix.tiles.types import DType

__all__ = ["GpuRunner", "search_segments", "CHECK_ROWS"]

CHECK_ROWS = 256  # tokens (or matrix rows) of the real inputs each candidate is checked on
_TORCH_NAMES = {DType.f32: "float32", DType.f16: "float16", DType.bf16: "bfloat16"}

# run(kernel, args, schedule) -> outputs: a call on the arch being tuned (CUDA tensors) or the
# interpreter (CPU tensors); the runtime passes it, so this module does not import the runtime
Run = Callable[[Kernel, dict[str, Any], Schedule], dict[str, torch.Tensor]]


class GpuRunner:
    """Compiles, checks and launches candidate configs of one call on the current GPU: the runner
    ``codegen.tune.tune`` takes."""

    def __init__(self, kernel: Kernel, args: dict[str, Any], arch: str, run: Run):
        device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device
        args = {**kernel.consts_for(arch, args), **args}  # the block shapes an untuned call runs here
        self.kernel, self.args, self.arch, self._call = kernel, args, arch, run
        self.binding = kernel.bind(args)
        self.default = launch_schedule(kernel, self.binding, device.index, arch)  # what an untuned call runs
        self.key = cache_key(kernel, self.binding, torch.cuda.get_device_name(device),
                             torch.cuda.get_device_capability(device), arch)
        self.small = self._first_rows(args)
        self._reference = None

    def _first_rows(self, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` cut to their first CHECK_ROWS along one runtime dim: the sequence (T), or for
        matrix programs the first matrix's rows (gemm's M), in every tensor that has that dim."""
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
        try:
            kernel_source(self.kernel, self.kernel.bind(self._with(config, self.args)), config.schedule, self.arch)
        except TileError:
            return False
        return True

    def prepare(self, config: Config) -> str | None:
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
        return self._call(self.kernel, self._with(config, args), config.schedule)

    def check(self, config: Config) -> str | None:
        """Against the interpreter on the first rows: no worse than twice the default's error (and
        within the dtype's bound if the default is)."""
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
        return {name: rel_err(out.cpu(), self._reference[name].double().numpy()) for name, out in outputs.items()}

    def launch(self, config: Config) -> Callable[[], object]:
        return lambda: self._run(config, self.args)


def search_segments(scan, args: dict[str, Any], arch: str, timer: Callable[[Callable[[], object]], float],
                    progress: Callable[[str], None] | None = None) -> SegmentsResult:
    """Time ``scan`` (a ``SegmentedScan``) on ``args`` at each segment count T allows, checked against
    the sequential scan's outputs (within the dtype's bound), and cache the fastest for the shape
    on ``arch``."""
    binding = scan.kernel.bind(args)
    device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device.index
    default = scan.default_segments(args, tuned=False)
    result = SegmentsResult(best=default, default=default)
    sequential = scan(args, final_states=None, segments=1)
    limit = bound(_TORCH_NAMES.get(binding.compute_dtype, "float32"))  # float64 (CPU tests): float32's
    for count in segment_choices(binding.sizes["T"]):
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
    store_segments(scan, binding, device, arch, result.best)
    return result
