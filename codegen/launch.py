"""Running generated sm_90a kernels on torch tensors: specialise, lower,
compile (cached), build TMA tensor maps, launch on torch's current stream."""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from tilemix.tiles import Kernel
from tilemix.tiles.errors import ResourceError
from tilemix.tiles.kernel import kernel_names
from tilemix.tiles.params import Binding
from tilemix.tiles.types import DType

from .compile import compile_cuda
from .generic import lower_generic
from .hopper import lower_hopper
from .schedule import SMEM_LIMIT, SMEM_LIMITS, Schedule, column_blocks
from .source import KernelSource, ParamKind

__all__ = ["run_hopper", "run_tiles", "prepare_launch", "Launch", "hopper_source", "generic_source", "kernel_source",
           "default_schedule", "launch_schedule"]

SPLIT_WIDTH = 64
MAX_STAGES = 3  # 4 measured no faster (gemm 8192³: 0.81x vs 0.91x cuBLAS at 3); the tuner may try more
IDLE_STAGES = 6  # a scan that leaves most SMs idle (``_idle_ring``); 8 measured no faster


def _probe_size(binding: Binding) -> int:
    """A tile width no other dim or chunk size has (a multiple of 16)."""
    taken = set(binding.sizes.values()) | set(binding.static.values())
    size = 16 * 61
    while size in taken:
        size += 16
    return size


def splittable(kernel: Kernel, binding: Binding, dim: str) -> bool:
    """Whether ``dim`` can be cut into independent column blocks: trace with a
    width no other dim has and check that no matmul contracts over it and no
    reduction runs along it."""
    probe = _probe_size(binding)
    traced = kernel.trace(replace(binding, static=dict(binding.static, **{dim: probe})), target="cpu")
    for op in traced.walk():
        if op.name == "matmul":
            a = op.operands[0].type
            contracted = a.rows if op.attrs["ta"] else a.cols
            if contracted == probe:
                return False
        if op.name in ("rowsum", "rowmax") and op.operands[0].type.cols == probe:
            return False
        if op.name in ("colsum", "colmax", "cumsum", "segsum") and op.operands[0].type.rows == probe:
            return False
    return True


def default_schedule(kernel: Kernel, binding: Binding, arch: str = "sm_90a") -> Schedule:
    """Scans: split the state's column dim into 64-wide blocks (state and output tiles then
    fit the registers), two per CTA. Grid programs: two neighbouring grid blocks per CTA. Where
    shared memory is short: one consumer, then one stage. Then the ring as deep as shared memory
    allows (up to MAX_STAGES; scans on sm_90a only, the generic target's scans unmeasured)."""
    split = []
    for p in binding.params:
        if p.spec.kind == "state":
            dim = p.spec.dims[1]
            if binding.extent(dim) > SPLIT_WIDTH and splittable(kernel, binding, dim):
                split.append((dim, SPLIT_WIDTH))
    if split:
        split = tuple(split)
        pairs = [Schedule(split=split, consumers=2)] if column_blocks(split, binding.static) % 2 == 0 else []
        # two consumers share a CTA's loads; fewer consumers or stages when shared memory is short
        schedule = _first_fitting(kernel, binding, pairs + [Schedule(split=split, consumers=1),
                                                            Schedule(split=split, consumers=1, stages=1)], arch)
        return _deepest_ring(kernel, binding, schedule, arch) if arch == "sm_90a" else schedule
    program = kernel.trace(binding, target=arch)
    if any(op.name == "loop" and op.kind == "blocks" for op in program.body):
        # neighbouring grid blocks share loads
        schedule = _first_fitting(kernel, binding, [Schedule(consumers=2, consumer_axis="blocks"), Schedule(),
                                                    Schedule(stages=1)], arch)
        return _deepest_ring(kernel, binding, schedule, arch)
    schedule = _first_fitting(kernel, binding, [Schedule(), Schedule(stages=1)], arch)
    return _deepest_ring(kernel, binding, schedule, arch) if arch == "sm_90a" else schedule


def _deepest_ring(kernel: Kernel, binding: Binding, schedule: Schedule, arch: str,
                  limit: int = MAX_STAGES) -> Schedule:
    """``schedule`` with as many ring stages as shared memory holds, up to ``limit``: more loads in
    flight while the consumers work. H200, same process (bench/NOTES.md, session 9): linear attention
    D=64 B·H·T = 8·16·4096 0.083 -> 0.073 ms at 3 stages (4: 0.074, 6: 0.077), D=128 0.151 -> 0.148,
    D=128 T=8192 (one consumer per CTA) 0.197 -> 0.186; SSD N=P=128 0.183 -> 0.178."""
    source = kernel_source(kernel, binding, schedule, arch)
    if not source.stage_bytes:
        return schedule
    room = (_smem_limit(arch) - source.smem_bytes) // source.stage_bytes
    return replace(schedule, stages=max(schedule.stages, min(limit, schedule.stages + room)))


def _smem_limit(arch: str) -> int:
    return SMEM_LIMIT if arch == "sm_90a" else SMEM_LIMITS[arch]


def _first_fitting(kernel: Kernel, binding: Binding, candidates: list[Schedule], arch: str = "sm_90a") -> Schedule:
    """The first schedule whose kernel fits the target, then the same with staging buffers shared
    (a program that fits without keeps the code every GPU test so far has run); the last one's
    error if none fits."""
    for schedule in candidates + [replace(c, share_staging=True) for c in candidates]:
        try:
            kernel_source(kernel, binding, schedule, arch)
            return schedule
        except ResourceError as e:
            error = e
    raise error


def hopper_source(kernel: Kernel, binding: Binding, schedule: Schedule | None = None) -> KernelSource:
    schedule = schedule or default_schedule(kernel, binding)
    traced = replace(binding, static=dict(binding.static, **dict(schedule.split)))
    program = kernel.trace(traced, target="sm_90a")
    return lower_hopper(program, schedule, dict(binding.static))


def generic_source(kernel: Kernel, binding: Binding, schedule: Schedule | None = None,
                   arch: str = "sm_80") -> KernelSource:
    """The generic (mma.sync) kernel for ``arch``, one of ``GENERIC_ARCHS``: same schedules, same
    tracing, with the arch's shared-memory limit."""
    schedule = schedule or default_schedule(kernel, binding, arch)
    traced = replace(binding, static=dict(binding.static, **dict(schedule.split)))
    program = kernel.trace(traced, target=arch)
    return lower_generic(program, arch, schedule, dict(binding.static))


def kernel_source(kernel: Kernel, binding: Binding, schedule: Schedule | None = None,
                  arch: str = "sm_90a") -> KernelSource:
    """The kernel for ``arch``: sm_90a lowers for Hopper, the others for the generic target."""
    if arch == "sm_90a":
        return hopper_source(kernel, binding, schedule)
    return generic_source(kernel, binding, schedule, arch)


# ------------------------------------------------------------------- launch ----
def _cupy():
    """cupy, which loads and launches the kernels; without it, an error naming the extra that
    installs it (cupy is not a dependency: CPU tensors run without it)."""
    try:
        import cupy
    except ImportError as e:
        raise ImportError("running tilemix kernels on CUDA tensors needs cupy: pip install 'tilemix[cuda]' "
                          "(cupy-cuda13x and the codegen extra)") from e
    return cupy


@functools.cache
def _module(cubin: bytes):
    module = _cupy().cuda.function.Module()
    module.load(cubin)
    return module


def _tensor_map(t: torch.Tensor, name: str, box_rows: int):
    """A TMA map over a 16-bit tensor: ``[B, T, H, D]`` (4-D, a box of ``box_rows`` tokens of one
    head) or a ``[rows, cols]`` matrix (2-D); 64-column boxes, 128-byte swizzle, zeros past the
    edges. Any strides TMA takes (``tma_readable``): a column slice or a head-split view is read in
    place."""
    return _encode_map(t.data_ptr(), tuple(t.shape), _strides(t), t.dtype == torch.bfloat16, name, box_rows)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides in elements, a dim of size 1 given its contiguous stride (torch leaves any
    value there; it addresses nothing)."""
    strides, step = [], 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        strides.append(step if size == 1 else stride)
        step *= size
    return tuple(reversed(strides))


def tma_readable(t: torch.Tensor) -> bool:
    """Whether TMA reads ``t`` where it lies: 16-byte aligned and ``tma_strided``."""
    return t.data_ptr() % 16 == 0 and tma_strided(t)


def tma_strided(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides suit TMA: unit stride along the last dim, the other strides positive
    multiples of 16 bytes."""
    *outer, inner = _strides(t)
    return inner == 1 and all(stride > 0 and stride * t.element_size() % 16 == 0 for stride in outer)


@functools.lru_cache(maxsize=1024)
def _encode_map(ptr: int, dims: tuple[int, ...], element_strides: tuple[int, ...], bf16: bool, name: str,
                box_rows: int):
    """The 128-byte descriptor; a pure function of its arguments, so cached (steady-state
    calls reuse the caching allocator's addresses)."""
    from cuda.bindings import driver as cu

    if len(dims) == 4:  # the map's dims run innermost first: D, H, T, B
        B, T, H, D = dims
        shape, box, order = (D, H, T, B), (64, 1, box_rows, 1), (2, 1, 0)
    else:
        shape, box, order = tuple(reversed(dims)), (64, box_rows), (0,)
    strides = [element_strides[i] * 2 for i in order]  # bytes, of every dim but the innermost
    if any(stride % 16 for stride in strides):
        raise ValueError(f"{name}: TMA needs rows of a multiple of 16 bytes; shape {list(dims)} has "
                         f"{shape[0] * 2}-byte rows")
    dtype = (cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 if bf16
             else cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16)
    rank = len(shape)
    err, tmap = cu.cuTensorMapEncodeTiled(
        dtype, cu.cuuint32_t(rank), ptr, [cu.cuuint64_t(x) for x in shape],
        [cu.cuuint64_t(x) for x in strides], [cu.cuuint32_t(x) for x in box], [cu.cuuint32_t(1)] * rank,
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed for {name}, a {list(dims)} tensor: {err}")
    raw = ctypes.string_at(tmap.getPtr(), 128)
    return np.frombuffer(raw, dtype=np.dtype((np.void, 128)))[0]


@dataclass(frozen=True)
class _Plan:
    """Everything about a launch that does not depend on the tensors' addresses."""

    source: KernelSource
    function: Any


_PLANS: dict[tuple, _Plan] = {}
_DEFAULTS: dict[tuple, Schedule] = {}
_HEADS: dict[tuple, Schedule | None] = {}  # launch_schedule's two-heads choice per specialisation


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def heads_per_cta(schedule: Schedule, sizes: dict[str, int]) -> int:
    """How many consecutive heads one CTA runs: ``consumers`` with ``consumer_axis='heads'`` (one
    per consumer warpgroup, sharing the group's tiles), else 1. Raises ``ValueError`` where H or the
    heads of a group (H/G) are not a multiple of it (a CTA's heads must share one group)."""
    if schedule.consumer_axis != "heads":
        return 1
    C, H = schedule.consumers, sizes.get("H", 0)  # (a Matrix program has no heads: its lowering refuses the axis)
    G = sizes.get("G")  # absent without GroupSeq parameters: nothing shared, any H that C divides
    if H % C or (G and (H // G) % C):
        raise ValueError(f"consumer_axis='heads' with consumers={C} runs {C} heads of one group per CTA: "
                         f"H and H/G must be multiples of {C}, got H={H}, G={G}")
    return C


@functools.lru_cache(maxsize=8)
def schedule_overrides(text: str) -> dict[str, dict[str, Any]]:
    """``$TILEMIX_SCHEDULE``, e.g. ``"ssd_bwd_dc:consumers=2,consumer_axis=heads,stages=1;gemm_fwd:stages=3"``:
    per program name, Schedule fields that replace its default schedule's (for experiments; a tuned
    config still wins). ``split`` is written ``V/64`` (several ``V/64+K/64``, none ``-``), booleans
    ``true``/``false``."""
    kinds = {f.name: f.default for f in fields(Schedule)}
    overrides: dict[str, dict[str, Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, assignments = part.partition(":")
        values = {}
        for item in filter(None, (a.strip() for a in assignments.split(","))):
            field_name, _, value = item.partition("=")
            if field_name not in kinds or not value:
                raise ValueError(f"TILEMIX_SCHEDULE: {item!r} in {part!r} is not FIELD=VALUE with FIELD one of "
                                 f"{sorted(kinds)}")
            default = kinds[field_name]
            if isinstance(default, bool):
                if value not in ("true", "false"):
                    raise ValueError(f"TILEMIX_SCHEDULE: {field_name} is true or false, got {value!r}")
                values[field_name] = value == "true"
            elif isinstance(default, int):
                if not value.isdigit():
                    raise ValueError(f"TILEMIX_SCHEDULE: {field_name} is a whole number, got {value!r}")
                values[field_name] = int(value)
            elif isinstance(default, tuple):  # split: V/64+K/64 or -
                pairs = [] if value == "-" else [p.split("/") for p in value.split("+")]
                if not all(len(p) == 2 and p[1].isdigit() for p in pairs):
                    raise ValueError(f"TILEMIX_SCHEDULE: split is DIM/WIDTH (several joined by +) or -, got {value!r}")
                values[field_name] = tuple((d, int(w)) for d, w in pairs)
            else:
                values[field_name] = value
        if not name or not values:
            raise ValueError(f"TILEMIX_SCHEDULE: {part!r} is not PROGRAM:FIELD=VALUE[,FIELD=VALUE...]")
        overrides[name] = values
    unknown = sorted(set(overrides) - kernel_names())
    if unknown:  # a typo would otherwise change nothing, silently
        warnings.warn(f"TILEMIX_SCHEDULE names no @kernel program defined so far: {unknown}", stacklevel=2)
    return overrides


def overridden(kernel: Kernel, schedule: Schedule) -> Schedule:
    """``schedule`` with the fields ``$TILEMIX_SCHEDULE`` sets for ``kernel`` (itself where it sets none)."""
    forced = schedule_overrides(os.environ.get("TILEMIX_SCHEDULE", "")).get(kernel.name)
    return replace(schedule, **forced) if forced else schedule


def launch_schedule(kernel: Kernel, binding: Binding, device_index: int, arch: str = "sm_90a") -> Schedule:
    """The default schedule, adapted to the grid: a scan whose two-consumer CTAs would fill less
    than half the GPU (few batch x heads, long sequences) runs one consumer per CTA, twice the
    CTAs (H100, linear attention, D=128, bench/NOTES.md: T=4096 B·H=128 two consumers 0.189 ms vs
    one 0.280; T=8192 B·H=64: 0.254 vs 0.210; T=16384 B·H=32: 0.485 vs 0.353); a one-consumer scan
    may run two heads per CTA (``_heads_pair``); and one that still leaves SMs idle a deeper ring
    (``_idle_ring``)."""
    key = (id(kernel), binding.key(), arch)
    base = _DEFAULTS.get(key)
    if base is None:
        base = _DEFAULTS[key] = default_schedule(kernel, binding, arch)
    forced = overridden(kernel, base)
    if forced is not base:
        return forced
    if base.consumer_axis != "columns" or "B" not in binding.sizes:
        return base
    if base.consumers == 1:
        chosen = _heads_pair(kernel, binding, base, device_index, arch) or base
    else:
        chosen = replace(base, consumers=1) if 2 * _ctas(binding, base) < sm_count(device_index) else base
    return _idle_ring(kernel, binding, chosen, device_index, arch)


def _ctas(binding: Binding, schedule: Schedule) -> int:
    """The CTAs a scan's grid has: one per (batch, head, column block), shared by its consumers."""
    return binding.sizes["B"] * binding.sizes["H"] * column_blocks(schedule.split, binding.static) // schedule.consumers


def _idle_ring(kernel: Kernel, binding: Binding, schedule: Schedule, device_index: int, arch: str) -> Schedule:
    """A scan whose CTAs leave more than half the SMs idle streams its chunks alone on each SM, where
    the bytes its ring keeps in flight bound it (bandwidth per SM = bytes in flight / latency): the ring
    as deep as shared memory holds, up to IDLE_STAGES. H200, B=4 T=8192 H=16 (64 CTAs), 3 -> 6 stages:
    linear attention D=64 0.1050 -> 0.0975 ms, SSD N=P=64 0.1812 -> 0.1753; with a CTA per SM (T=4096,
    128 CTAs) 6 stages cost linear attention D=64 3% (0.0720 -> 0.0743) and kept 3."""
    if arch != "sm_90a" or 2 * _ctas(binding, schedule) >= sm_count(device_index):
        return schedule
    return _deepest_ring(kernel, binding, schedule, arch, IDLE_STAGES)


def _heads_pair(kernel: Kernel, binding: Binding, base: Schedule, device_index: int, arch: str) -> Schedule | None:
    """Two heads (of one group) per CTA (``consumer_axis="heads"``) for a one-consumer scan with no
    column split: two warpgroups per SM hide each other's latency, and per-group tiles (GroupSeq:
    SSD's B and C) load once for both; None where that does not apply, would leave more than half
    the GPU idle, or does not fit. H200: SSD backward B=8 T=4096 H=16 N=P=128 (its P blocks run as 32
    heads): 1.834 ms one head per CTA, 1.509 two heads at one stage, 1.356 two heads at two stages
    sharing staging buffers; linear attention D=64 (no group tiles), B·H·T = 8·16·4096: T=1024 0.087
    -> 0.074 ms, T=2048 0.086 -> 0.076, segmented T >= 16k 0.162-0.168 -> 0.130-0.134; at T=4096
    (B·H = 128, fewer than the SMs: no pair) two heads measured 0.084 -> 0.102."""
    sizes = binding.sizes
    if arch != "sm_90a" or base.split or "H" not in sizes:
        return None
    try:
        heads_per_cta(replace(base, consumers=2, consumer_axis="heads"), sizes)
    except ValueError:  # odd H or H/G: a CTA's heads must share a group
        return None
    if sizes["B"] * sizes["H"] < sm_count(device_index):  # fewer than half the SMs busy
        return None
    key = (id(kernel), binding.key(), arch)
    if key not in _HEADS:
        _HEADS[key] = None
        for candidate in (replace(base, consumers=2, consumer_axis="heads", stages=2, share_staging=True),
                          replace(base, consumers=2, consumer_axis="heads", stages=1)):
            try:
                kernel_source(kernel, binding, candidate, arch)
            except ResourceError:
                continue
            _HEADS[key] = candidate
            break
    return _HEADS[key]


def _plan(kernel: Kernel, binding: Binding, schedule: Schedule, arch: str = "sm_90a") -> _Plan:
    key = (id(kernel), binding.key(), schedule, arch)
    plan = _PLANS.get(key)
    if plan is None:
        driver = _cupy().cuda.driver
        source = kernel_source(kernel, binding, schedule, arch)
        compiled = compile_cuda(source.source, arch, source.name)
        function = _module(compiled.cubin).get_function(source.name)
        driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                source.smem_bytes)
        plan = _PLANS[key] = _Plan(source, function)
    return plan


@functools.cache
def _stream(handle: int):
    return _cupy().cuda.ExternalStream(handle)


def _current_stream(device_index: int) -> int:
    """Torch's current stream on the device, as a raw handle. torch._C's accessor (the one Triton
    launches with) skips building a Stream object, ~8 µs per call."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device_index) if raw is not None else torch.cuda.current_stream(device_index).cuda_stream


def run_hopper(kernel: Kernel, binding: Binding, args: dict[str, Any], outputs: dict[str, torch.Tensor],
               schedule: Schedule | None = None) -> None:
    """Launch the sm_90a kernel for ``kernel`` writing into ``outputs`` (allocated by the caller;
    states absent from ``outputs`` are not written). Source, cubin and module are cached per
    specialisation; a call only builds tensor maps and launches."""
    run_tiles(kernel, binding, args, outputs, schedule, "sm_90a")


def run_tiles(kernel: Kernel, binding: Binding, args: dict[str, Any], outputs: dict[str, torch.Tensor],
              schedule: Schedule | None = None, arch: str = "sm_90a") -> None:
    """``run_hopper`` for any arch: sm_90a (tensor maps) or a generic one (plain pointers)."""
    device = next(iter(outputs.values())).device.index
    prepare_launch(kernel, binding, args, schedule, arch, device)(args, outputs)


def prepare_launch(kernel: Kernel, binding: Binding, args: dict[str, Any], schedule: Schedule | None, arch: str,
                   device: int) -> Launch:
    """Everything about launching ``kernel`` on arguments shaped and strided as ``args`` but their
    addresses and scalar values: the schedule (``launch_schedule`` if None), the compiled kernel,
    the grid and the tensor maps' layouts. ``ops`` keeps one per call signature, so a repeated call
    only packs addresses and launches."""
    schedule = schedule or launch_schedule(kernel, binding, device, arch)
    sizes = binding.sizes
    per_cta = heads_per_cta(schedule, sizes)  # before compiling: a head count the schedule cannot map is an error
    plan = _plan(kernel, binding, schedule, arch)
    blocks = 1
    for dim, size in plan.source.grid_loops:
        blocks *= -(-sizes[dim] // size)
    grid = (plan.source.column_ctas * blocks * (1 if plan.source.matrix else sizes["B"] * sizes["H"] // per_cta), 1, 1)
    size_args = tuple(np.int32(sizes.get(d, sizes.get("H", 1))) for d in plan.source.size_args)  # G defaults to H
    layouts = {}  # tensor maps whose strides TMA reads in place: only the address changes from call to call
    for kind, name in plan.source.params:
        if kind is ParamKind.TMAP and tma_strided(args[name]):
            layouts[name] = (tuple(args[name].shape), _strides(args[name]), args[name].dtype == torch.bfloat16)
        elif kind is ParamKind.TMAP_OUT:  # a contiguous output in the compute dtype
            shape = tuple(binding.param(name).shape)
            strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
            layouts[name] = (shape, strides, binding.compute_dtype is DType.bf16)
    return Launch(plan, grid, size_args, device, layouts)


@dataclass(frozen=True)
class Launch:
    """A prepared launch (``prepare_launch``): called with the arguments and the outputs (allocated
    contiguous by the caller; states absent from ``outputs`` are not written), it builds the tensor
    maps and pointers and launches on torch's current stream."""

    plan: _Plan
    grid: tuple[int, int, int]
    size_args: tuple[np.int32, ...]
    device: int
    layouts: dict[str, tuple]  # tensor-map parameter -> (dims, element strides, bf16) of every call

    def __call__(self, args: dict[str, Any], outputs: dict[str, torch.Tensor]) -> None:
        if 0 in self.grid:
            return
        source = self.plan.source
        params = []
        keep_alive = []  # converted copies must outlive the launch's argument packing
        for kind, name in source.params:
            value = args.get(name)
            if kind is ParamKind.TMAP:
                layout = self.layouts.get(name)
                if layout is not None and value.data_ptr() % 16 == 0:
                    params.append(_encode_map(value.data_ptr(), *layout, name, source.tmap_rows[name]))
                    continue
                t = value if tma_readable(value) else value.contiguous()
                if t.data_ptr() % 16:  # TMA reads from 16-byte aligned addresses: a view at an odd offset
                    t = t.clone()
                keep_alive.append(t)
                params.append(_tensor_map(t, name, source.tmap_rows[name]))
            elif kind is ParamKind.TMAP_OUT:
                params.append(_encode_map(outputs[name].data_ptr(), *self.layouts[name], name, source.tmap_rows[name]))
            elif kind is ParamKind.PTR:  # generic kernels: 16-byte cp.async reads from 16-byte aligned rows
                t = value.contiguous()
                if t.data_ptr() % 16:
                    t = t.clone()
                keep_alive.append(t)
                params.append(np.uint64(t.data_ptr()))
            elif kind is ParamKind.PTR_OUT:
                params.append(np.uint64(outputs[name].data_ptr()))
            elif kind is ParamKind.F32:
                t = value.to(torch.float32).contiguous()
                keep_alive.append(t)
                params.append(np.uint64(t.data_ptr()))
            elif kind is ParamKind.STATE:
                init = value.contiguous() if value is not None else None
                keep_alive.append(init)
                final = outputs.get(name)
                params += [np.uint64(init.data_ptr() if init is not None else 0),
                           np.uint64(final.data_ptr() if final is not None else 0)]
            elif kind is ParamKind.SCALAR:
                params.append(np.float32(value))
        self.plan.function(self.grid, (source.threads, 1, 1), (*params, *self.size_args),
                           shared_mem=source.smem_bytes, stream=_stream(_current_stream(self.device)))
