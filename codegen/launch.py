"""Running generated kernels on torch tensors: the schedule (``schedule.launch_schedule``), the
kernel (``specialise``), compiled (cached); then TMA tensor maps or pointers, and a launch on
torch's current stream."""

from __future__ import annotations

import ctypes
import functools
import itertools
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tilemix.tiles import Kernel
from tilemix.tiles.params import Binding
from tilemix.tiles.types import DType

from .compile import compile_cuda
from .knobs import Schedule
from .schedule import heads_per_cta, launch_schedule
from .source import KernelSource, ParamKind
from .specialise import kernel_source

__all__ = ["run_hopper", "run_tiles", "prepare_launch", "Launch"]


def _cupy():
    """cupy, which loads the kernels (the driver launches them); without it, an error naming the extra that
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
    head) or a ``[rows, cols]`` matrix (2-D); 64-column boxes, 128-byte swizzle (none for a box of
    one row), zeros past the edges. Any strides TMA takes (``tma_readable``): a column slice or a
    head-split view is read in place."""
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
    # TMA takes the 128-byte swizzle's pattern from the shared address (it starts at 1024-byte
    # boundaries), the kernels from the row (tm::swz_offset): boxes of whole 8-row pattern blocks
    # agree; a box of fewer rows (a decode step's one token, its panels 128 bytes apart) is moved
    # unswizzled, which is where tm::swz_offset puts row 0
    swizzle = cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B if box_rows % 8 == 0 else \
        cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_NONE
    err, tmap = cu.cuTensorMapEncodeTiled(
        dtype, cu.cuuint32_t(rank), ptr, [cu.cuuint64_t(x) for x in shape],
        [cu.cuuint64_t(x) for x in strides], [cu.cuuint32_t(x) for x in box], [cu.cuuint32_t(1)] * rank,
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed for {name}, a {list(dims)} tensor: {err}")
    return ctypes.string_at(tmap.getPtr(), 128)


@dataclass(frozen=True)
class _Plan:
    """Everything about a launch that does not depend on the tensors' addresses."""

    source: KernelSource
    function: Any


_PLANS: dict[tuple, _Plan] = {}


def _plan(kernel: Kernel, binding: Binding, schedule: Schedule, arch: str = "sm_90a", varlen: bool = False) -> _Plan:
    key = (id(kernel), binding.key(), schedule, arch, varlen)
    plan = _PLANS.get(key)
    if plan is None:
        driver = _cupy().cuda.driver
        source = kernel_source(kernel, binding, schedule, arch, varlen)
        compiled = compile_cuda(source.source, arch, source.name)
        function = _module(compiled.cubin).get_function(source.name)
        driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                source.smem_bytes)
        plan = _PLANS[key] = _Plan(source, function)
    return plan


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
                   device: int, varlen: bool = False, outputs: dict[str, torch.Tensor] | None = None) -> Launch:
    """Everything about launching ``kernel`` on arguments shaped and strided as ``args`` but their
    addresses and scalar values: the schedule (``launch_schedule`` if None), the compiled kernel,
    the grid and the tensor maps' layouts. ``ops`` keeps one per call signature, so a repeated call
    only packs addresses and launches. ``varlen``: the kernel for a packed batch, whose B (the grid's)
    is its sequence count and whose arguments hold its offsets as ``cu_seqlens`` (a second sequence's,
    keys' say, as ``cu_seqlens_S``: ``structure.packed_offsets``). ``outputs``: outputs strided as
    every call's will be (a column block of a wider tensor, say), where TMA stores take their strides;
    by default every output is contiguous."""
    schedule = schedule or launch_schedule(kernel, binding, device, arch)
    sizes = binding.sizes
    per_cta = heads_per_cta(schedule, sizes)  # before compiling: a head count the schedule cannot map is an error
    plan = _plan(kernel, binding, schedule, arch, varlen)
    blocks = 1
    for dim, size in plan.source.grid_loops:  # a packed batch's: over its longest sequence's blocks
        blocks *= -(-sizes[f"{dim}_max" if varlen else dim] // size)
    grid = (plan.source.column_ctas * blocks * (1 if plan.source.matrix else sizes["B"] * sizes["H"] // per_cta), 1, 1)
    size_args = tuple(int(sizes.get(d, sizes.get("H", 1))) for d in plan.source.size_args)  # G defaults to H
    layouts = {}  # tensor maps whose strides TMA reads in place: only the address changes from call to call
    for kind, name in plan.source.params:
        if kind is ParamKind.TMAP and tma_strided(args[name]):
            layouts[name] = (tuple(args[name].shape), _strides(args[name]), args[name].dtype == torch.bfloat16)
        elif kind is ParamKind.TMAP_OUT:  # an output in the compute dtype, contiguous unless given strided
            shape = tuple(binding.param(name).shape)
            given = (outputs or {}).get(name)
            strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
            if given is not None and not given.is_contiguous():
                if not tma_strided(given):
                    raise ValueError(f"{name}: an output's strides {given.stride()} do not suit TMA stores "
                                     "(unit stride along the last dim, the others 16-byte multiples)")
                strides = _strides(given)
            layouts[name] = (shape, strides, binding.compute_dtype is DType.bf16)
    return Launch(plan, grid, size_args, device, layouts)


# each launch compares every parameter's kind with these: module names, as an Enum member lookup costs ~0.2 µs
_TMAP, _TMAP_OUT, _PTR, _PTR_OUT, _F32, _STATE, _SCALAR, _OFFSETS, _CHUNK_STATE = (
    ParamKind.TMAP, ParamKind.TMAP_OUT, ParamKind.PTR, ParamKind.PTR_OUT, ParamKind.F32, ParamKind.STATE,
    ParamKind.SCALAR, ParamKind.OFFSETS, ParamKind.CHUNK_STATE)
# the slots of each kernel parameter in the launch's parameter buffer (``struct`` formats, 8-byte
# multiples): a 128-byte tensor map, a float, a state's two addresses; an address by default
_SLOTS = {_TMAP: ("128s",), _TMAP_OUT: ("128s",), _SCALAR: ("f4x",), _STATE: ("Q", "Q")}
_ADDRESS, _SIZE = ("Q",), "i4x"


@dataclass(frozen=True)
class Launch:
    """A prepared launch (``prepare_launch``): called with the arguments and the outputs (strided as
    ``prepare_launch`` was told, else contiguous; states absent from ``outputs`` are not written), it writes the tensor
    maps, addresses and scalars into a parameter buffer (one per thread, with the sizes already in
    it) and launches on torch's current stream through the driver's ``cuLaunchKernel``: cupy's
    launch converts every argument on each call, several times the host time of the rest."""

    plan: _Plan
    grid: tuple[int, int, int]
    size_args: tuple[int, ...]
    device: int
    layouts: dict[str, tuple]  # tensor-map parameter -> (dims, element strides, bf16) of every call
    buffers: dict = field(default_factory=dict, compare=False, repr=False)  # thread -> (buffer, pointers)
    maps: dict = field(default_factory=dict, compare=False, repr=False)  # parameter -> (address, its last map)

    @functools.cached_property
    def _slots(self) -> tuple[str, str, tuple[int, ...]]:
        """The struct format of the values each call packs, that of the sizes after them (packed
        once), and each kernel parameter's byte offset."""
        slots = [slot for kind, _ in self.plan.source.params for slot in _SLOTS.get(kind, _ADDRESS)]
        sizes = [_SIZE] * len(self.size_args)
        offsets = itertools.accumulate((struct.calcsize("<" + slot) for slot in slots + sizes), initial=0)
        return "<" + "".join(slots), "<" + "".join(sizes), tuple(offsets)[:-1]

    def _buffer(self) -> tuple[Any, int]:
        """This thread's parameter buffer and the address of its array of parameter pointers
        (``cuLaunchKernel``'s ``kernelParams``), made on the thread's first call: the driver copies
        the values at launch, but another thread may pack its own meanwhile."""
        found = self.buffers.get(threading.get_ident())
        if found is None:
            calls, sizes, offsets = self._slots
            buffer = ctypes.create_string_buffer(struct.calcsize(calls) + struct.calcsize(sizes))
            struct.pack_into(sizes, buffer, struct.calcsize(calls), *self.size_args)
            pointers = (ctypes.c_void_p * len(offsets))(*(ctypes.addressof(buffer) + at for at in offsets))
            found = self.buffers[threading.get_ident()] = (buffer, pointers, ctypes.addressof(pointers))
        return found[0], found[2]

    def _map(self, name: str, address: int, layout: tuple) -> bytes:
        """``name``'s tensor map at ``address``: the last call's when the address is the same (one
        compare), else encoded (``_encode_map`` keeps recent ones: a caller alternating between a few
        buffers finds them there)."""
        last = self.maps.get(name)
        if last is None or last[0] != address:
            last = self.maps[name] = (address, _encode_map(address, *layout, name, self.plan.source.tmap_rows[name]))
        return last[1]

    def __call__(self, args: dict[str, Any], outputs: dict[str, torch.Tensor]) -> None:
        if 0 in self.grid:
            return
        source = self.plan.source
        values = []
        keep_alive = []  # converted copies must outlive the launch's parameter copy
        copies = []  # (strided output, the contiguous buffer the kernel writes instead)
        for kind, name in source.params:
            value = args.get(name)
            if kind is _TMAP:
                layout = self.layouts.get(name)
                if layout is not None and value.data_ptr() % 16 == 0:
                    values.append(self._map(name, value.data_ptr(), layout))
                    continue
                t = value if tma_readable(value) else value.contiguous()
                if t.data_ptr() % 16:  # TMA reads from 16-byte aligned addresses: a view at an odd offset
                    t = t.clone()
                keep_alive.append(t)
                values.append(_tensor_map(t, name, source.tmap_rows[name]))
            elif kind is _TMAP_OUT:
                values.append(self._map(name, outputs[name].data_ptr(), self.layouts[name]))
            elif kind is _PTR:  # generic kernels: 16-byte cp.async reads from 16-byte aligned rows
                t = value.contiguous()
                if t.data_ptr() % 16:
                    t = t.clone()
                keep_alive.append(t)
                values.append(t.data_ptr())
            elif kind is _PTR_OUT:  # generic kernels write rows whole: a strided output takes a copy after
                out = outputs[name]
                if not out.is_contiguous():
                    copies.append((out, out.contiguous()))
                    out = copies[-1][1]
                values.append(out.data_ptr())
            elif kind is _F32:
                t = value.to(torch.float32).contiguous()
                keep_alive.append(t)
                values.append(t.data_ptr())
            elif kind is _STATE:
                init = value.contiguous() if value is not None else None
                keep_alive.append(init)
                final = outputs.get(name)
                values += [init.data_ptr() if init is not None else 0, final.data_ptr() if final is not None else 0]
            elif kind is _SCALAR:
                values.append(float(value))
            elif kind is _OFFSETS:  # int32 [N + 1], checked by ops/varlen.py
                values.append(value.data_ptr())
            elif kind is _CHUNK_STATE:  # fp32 [B, H, NC, r, c]: read as given, or written
                t = outputs[name] if value is None else value.to(torch.float32).contiguous()
                keep_alive.append(t)
                values.append(t.data_ptr())
        buffer, pointers = self._buffer()
        struct.pack_into(self._slots[0], buffer, 0, *values)
        _launch_kernel(self.plan.function.ptr, self.grid, source.threads, source.smem_bytes,
                       _current_stream(self.device), pointers, source.name)
        for out, written in copies:
            out.copy_(written)


def _launch_kernel(function: int, grid: tuple[int, int, int], threads: int, smem_bytes: int, stream: int,
                   pointers: int, name: str) -> None:
    """``cuLaunchKernel`` (cuda-bindings) with raw handles and a ``kernelParams`` array's address;
    a failed launch is a RuntimeError naming the kernel."""
    err, = _driver().cuLaunchKernel(function, *grid, threads, 1, 1, smem_bytes, stream, pointers, 0)
    if err:
        raise RuntimeError(f"launching {name} failed: {err!r}")


@functools.cache
def _driver():
    from cuda.bindings import driver

    return driver
