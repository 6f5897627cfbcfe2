"""The CUDA-only host paths, run on the CPU with the device stubbed: ``run_kernel``'s CUDA branch
up to the launch (fake CUDA tensors: shapes, strides and dtypes without memory), and
``prepare_launch`` plus a ``Launch`` with cupy, the tensor-map encoder, the stream and the driver's
launch replaced by recorders (the lowering and NVRTC compile are real). What they catch is what ``pytest -m gpu``
would meet first: a renamed name, a parameter kind the launch does not pack, arguments passed the
old way."""

from __future__ import annotations

import ctypes
import re
import struct
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tilemix import ops
from tilemix.codegen import launch, schedule
from tilemix.codegen import tune as search
from tilemix.codegen.source import ParamKind
from tilemix.ops import runtime
from tilemix.ops.tuning import GpuRunner

la = ops.linear_attention_fwd


def _cuda_like(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    """A tensor that reports a CUDA device, its shape, strides and dtype, and has no memory."""
    with FakeTensorMode():
        return torch.empty(*shape, device="cuda", dtype=dtype)


def test_call_signature_reads_the_sm_count_the_launch_schedule_reads(monkeypatch):
    """A call's signature includes the SM count that ``schedule.launch_schedule`` sees, so a change
    of it (tests patch ``schedule.sm_count``) prepares the call again instead of reusing a launch
    chosen for another count."""
    q = _cuda_like(1, 256, 2, 64)
    args = dict(q=q, k=q, v=q, scale=0.5)
    monkeypatch.setattr(schedule, "sm_count", lambda device: 132)
    first = runtime.call_signature(la, args)
    assert first is not None and first == runtime.call_signature(la, args)
    monkeypatch.setattr(schedule, "sm_count", lambda device: 2)
    assert runtime.call_signature(la, args) != first


class _FakeCupy:
    """cupy as ``launch`` uses it, recording the modules loaded and the shared-memory attribute set
    on a function (whose ``ptr`` is its name)."""

    def __init__(self):
        self.attributes, self.loaded = [], []
        fake = self

        class Module:
            def load(self, cubin):
                fake.loaded.append(cubin)

            def get_function(self, name):
                return SimpleNamespace(ptr=name)

        driver = SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES="max_dynamic_smem",
                                 funcSetAttribute=lambda ptr, attr, value: fake.attributes.append((ptr, attr, value)))
        self.cuda = SimpleNamespace(driver=driver, function=SimpleNamespace(Module=Module))


def _tmap(name: str) -> bytes:
    """The fake encoder's 128-byte tensor map of ``name``."""
    return name.encode().ljust(128, b"\0")


def launched_params(prepared: launch.Launch, pointers: int) -> tuple:
    """The kernel parameters a launch of ``prepared`` passed, read through its ``kernelParams`` array
    (``pointers``) as the driver would: each at its own address, in the slot its kind takes."""
    calls, sizes, offsets = prepared._slots
    slots = re.findall(r"\d*[a-zA-Z]", (calls + sizes).replace("<", ""))
    slots = [s for s in slots if not s.endswith("x")]  # padding follows its value
    addresses = (ctypes.c_void_p * len(offsets)).from_address(pointers)
    assert len(slots) == len(offsets)
    return tuple(struct.unpack_from("<" + slot, ctypes.string_at(address, struct.calcsize("<" + slot)))[0]
                 for slot, address in zip(slots, addresses))


@pytest.fixture
def fake_device(monkeypatch):
    """``launch`` with cupy, the tensor-map encoder, torch's current stream and the driver's launch
    stubbed (each launch recorded with its parameters read back); its caches emptied before and
    after (they would otherwise hold the fakes)."""
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    fake = _FakeCupy()
    maps, launches = [], []

    def encode(ptr, dims, strides, bf16, name, box_rows):
        maps.append(SimpleNamespace(ptr=ptr, dims=dims, strides=strides, bf16=bf16, name=name, box_rows=box_rows))
        return _tmap(name)

    def launch_kernel(function, grid, threads, smem_bytes, stream, pointers, name):
        launches.append(SimpleNamespace(name=function, grid=grid, block=(threads, 1, 1), shared_mem=smem_bytes,
                                        stream=stream, pointers=pointers))

    launch._module.cache_clear()
    monkeypatch.setattr(launch, "_cupy", lambda: fake)
    monkeypatch.setattr(launch, "_encode_map", encode)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 7)
    monkeypatch.setattr(launch, "_launch_kernel", launch_kernel)
    monkeypatch.setattr(launch, "_PLANS", {})
    fake.maps, fake.launches = maps, launches
    yield fake
    launch._module.cache_clear()


def _la_args(T=200, H=2, D=64, state=True):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D, generator=g).bfloat16() for _ in range(3))
    return dict(q=q, k=k, v=v, scale=0.25, s=torch.randn(1, H, D, D, generator=g) if state else None)


def test_sm90a_launch_packs_every_parameter_kind(fake_device):
    """Linear attention on sm_90a: its compiled kernel loaded once with its shared memory set, a grid
    of one CTA per (batch, head) pair of consumers' column blocks, and one launch argument per
    ``ParamKind`` entry as the kind says (tensor maps at the tensors' own addresses, the state's
    initial and final addresses, the scale as a float32), on torch's current stream."""
    args = _la_args()
    binding = la.bind(args)
    sched = schedule.default_schedule(la, binding)
    prepared = launch.prepare_launch(la, binding, args, sched, "sm_90a", 0)
    source = prepared.plan.source
    assert fake_device.attributes == [(source.name, "max_dynamic_smem", source.smem_bytes)]
    assert [kind for kind, _ in source.params] == [ParamKind.TMAP] * 3 + [ParamKind.SCALAR, ParamKind.TMAP_OUT,
                                                                          ParamKind.STATE]
    assert set(prepared.layouts) == {"q", "k", "v", "o"}  # maps whose layout every call shares
    outputs = dict(o=torch.empty(1, 200, 2, 64, dtype=torch.bfloat16), s=torch.empty(1, 2, 64, 64))
    prepared(args, outputs)
    prepared(args, outputs)
    assert len(fake_device.loaded) == 1 and len(fake_device.launches) == 2
    call = fake_device.launches[0]
    assert call.name == source.name and call.block == (source.threads, 1, 1)
    assert call.grid == (source.column_ctas * 2, 1, 1) and call.shared_mem == source.smem_bytes
    assert call.stream == 7
    params = launched_params(prepared, call.pointers)
    assert params[:3] == (_tmap("q"), _tmap("k"), _tmap("v"))
    assert params[3] == 0.25 and params[4] == _tmap("o")
    assert params[5] == args["s"].data_ptr()  # contiguous float32 already: read in place
    assert params[6] == outputs["s"].data_ptr()
    assert params[7:] == tuple(prepared.size_args) and len(params) == 7 + len(source.size_args)
    by_name = {m.name: m for m in fake_device.maps}
    assert len(fake_device.maps) == 4  # a second call at the same addresses reuses the maps
    assert by_name["q"].ptr == args["q"].data_ptr() and by_name["q"].dims == (1, 200, 2, 64)
    assert by_name["o"].ptr == outputs["o"].data_ptr() and by_name["o"].bf16
    assert all(m.box_rows == source.tmap_rows[m.name] for m in fake_device.maps)
    moved = dict(outputs, o=torch.empty(1, 200, 2, 64, dtype=torch.bfloat16))
    prepared(args, moved)  # a new output address: its map encoded again, the inputs' reused
    assert [m.name for m in fake_device.maps[4:]] == ["o"] and fake_device.maps[4].ptr == moved["o"].data_ptr()


def test_generic_launch_passes_addresses(fake_device):
    """The generic target (sm_80): plain addresses where sm_90a passes tensor maps, no encoder call;
    a view at an odd offset is copied to an aligned one first."""
    args = _la_args(state=False)
    args["q"] = torch.randn(1, 200, 2, 65).bfloat16()[..., 1:]  # 2-byte offset: not 16-byte aligned
    binding = la.bind(args)
    prepared = launch.prepare_launch(la, binding, args, schedule.default_schedule(la, binding, "sm_80"), "sm_80", 0)
    source = prepared.plan.source
    assert [kind for kind, _ in source.params] == [ParamKind.PTR] * 3 + [ParamKind.SCALAR, ParamKind.PTR_OUT,
                                                                         ParamKind.STATE]
    outputs = dict(o=torch.empty(1, 200, 2, 64, dtype=torch.bfloat16))
    prepared(args, outputs)
    params = launched_params(prepared, fake_device.launches[0].pointers)
    assert not fake_device.maps
    assert params[0] % 16 == 0 and params[0] != args["q"].data_ptr()
    assert params[1] == args["k"].data_ptr()  # contiguous and aligned: read in place
    assert params[4] == outputs["o"].data_ptr() and params[5:7] == (0, 0)  # no initial state, final not wanted


def test_matrix_launch_passes_sizes_and_two_dim_maps(fake_device):
    """gemm (a Matrix program): a CTA per 256 columns and 128 rows (two consumers of 64-row blocks),
    2-D tensor maps over the matrices as they lie, the output's over a contiguous [M, N], and the
    runtime sizes (K, M, N) as int32 after the parameters."""
    gemm = ops.PROGRAMS["gemm"]
    args = dict(a=torch.randn(300, 200).bfloat16(), b=torch.randn(200, 264).bfloat16())
    binding = gemm.bind(args)
    prepared = launch.prepare_launch(gemm, binding, args, schedule.default_schedule(gemm, binding), "sm_90a", 0)
    outputs = dict(c=torch.empty(300, 264, dtype=torch.bfloat16))
    prepared(args, outputs)
    call = fake_device.launches[0]
    assert call.grid == (2 * 3, 1, 1)  # ceil(264 / 256) x ceil(300 / 128)
    params = launched_params(prepared, call.pointers)
    assert params[:3] == (_tmap("a"), _tmap("b"), _tmap("c"))
    assert params[3:] == (200, 300, 264)
    maps = {m.name: m for m in fake_device.maps}
    assert maps["a"].dims == (300, 200) and maps["a"].strides == (200, 1)
    assert maps["c"].dims == (300, 264) and maps["c"].strides == (264, 1) and maps["c"].ptr == outputs["c"].data_ptr()


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """An H100 as the runtime's CUDA branch asks about it (capability, name, SM count, current
    device), an empty tuning cache, and ``prepare_launch`` recorded: each call's (kernel, binding,
    args, schedule, arch, device), its launch recording the outputs it is handed."""
    monkeypatch.setenv("TILEMIX_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(schedule, "sm_count", lambda device: 132)
    calls = []

    def prepare(kernel, binding, args, sched, arch, device):
        call = SimpleNamespace(kernel=kernel, binding=binding, args=args, schedule=sched, arch=arch, device=device)
        calls.append(call)
        return lambda args, outputs: setattr(call, "outputs", outputs)

    monkeypatch.setattr(launch, "prepare_launch", prepare)
    search.forget_choices()
    runtime.forget_calls()
    yield calls
    search.forget_choices()
    runtime.forget_calls()


def test_cuda_call_fills_a_left_out_scalar_with_its_default(fake_gpu):
    """A Scalar left out (gla_fwd's ``scale = 1.0``, as a mixer's op passes it when the default is
    kept) reaches the launch as its default, as the interpreter binds it, not as None."""
    from tilemix.ops.gated import gla_fwd

    with FakeTensorMode():
        x = torch.empty(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
        runtime.run_kernel(gla_fwd, dict(q=x, k=x, v=x, g=x))
    assert fake_gpu[-1].args["scale"] == 1.0


def test_cuda_call_prepares_with_the_arch_its_consts_and_a_tuned_config(fake_gpu):
    """``run_kernel`` on CUDA tensors: the target's arch (generic forced on a 9.0 device: sm_90) and
    its block shapes passed to the launch, outputs allocated on the device in the inputs' dtype; a
    config ``tilemix tune`` cached for the shape is read back and launched with its block sizes."""
    at = ops.attention_fwd
    with FakeTensorMode():
        q = torch.empty(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
        args = dict(q=q, k=q, v=q, scale=0.125, is_causal=True)
        with runtime.use_target("generic"):
            out = runtime.run_kernel(at, args)
        call = fake_gpu[-1]
        assert (call.kernel, call.arch, call.device, call.schedule) == (at, "sm_90", 0, None)
        assert call.args["block"] == call.binding.values["block"] == at.target_consts["sm_90"]["block"]
        assert call.outputs is not None and set(out) == {"o"}
        assert (out["o"].shape, out["o"].dtype, out["o"].device.type) == ((1, 256, 2, 64), torch.bfloat16, "cuda")

        binding = at.bind({**args, **at.consts_for("sm_90a", args)})
        tuned = search.Config(schedule.Schedule(stages=1), (("chunk", 64),))
        search.store_config(search.cache_key(at, binding, "NVIDIA H100 80GB HBM3", (9, 0), "sm_90a"), tuned)
        runtime.run_kernel(at, args)
    call = fake_gpu[-1]
    assert (call.arch, call.schedule, call.args["chunk"], call.binding.values["chunk"]) == ("sm_90a", tuned.schedule,
                                                                                            64, 64)


def test_tuner_checks_times_and_caches_through_the_runtime(monkeypatch, tmp_path):
    """``runtime.tune`` with its real runner (``ops.tuning.GpuRunner``: lowering, NVRTC, resource
    check, the check against the interpreter) on CPU tensors, which the runtime runs on the
    interpreter, with the device queries stubbed, a fake clock and two ring depths: every candidate
    is compiled, checked and timed, the fastest cached where ``config_for`` finds it."""
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    monkeypatch.setenv("TILEMIX_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(schedule, "sm_count", lambda device: 132)
    monkeypatch.setattr(schedule, "knob_choices", lambda: {"stages": (1, 2)})
    search.forget_choices()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 64, generator=g).bfloat16() for _ in range(3))
    args = dict(q=q, k=k, v=v, scale=0.125, s=None)
    clock = {1: 2.0, 2: 1.0}  # ms by ring depth (the default has 3)

    def timer(fn):
        fn()
        return clock.get(timed[-1].schedule.stages, 3.0)

    timed = []
    real_launch = GpuRunner.launch
    monkeypatch.setattr(GpuRunner, "launch", lambda self, config: timed.append(config) or real_launch(self, config))
    result = runtime.tune(la, args, arch="sm_90a", timer=timer, workers=1)
    assert not result.rejected, result.rejected
    assert sorted(c.schedule.stages for c in result.times) == sorted({result.default.schedule.stages, 1, 2})
    assert result.best.schedule.stages == 2
    search.forget_choices()
    assert search.config_for(la, la.bind(args), args, None, "sm_90a") == result.best


def test_segment_count_of_a_cuda_call(fake_gpu, monkeypatch):
    """``SegmentedScan.default_segments`` on CUDA tensors (1 on CPU ones): the schedule's heuristic
    for a long sequence with few heads, a count ``tilemix tune`` cached for the shape instead, and
    ``$TILEMIX_SEGMENTS`` over both."""
    scan = ops.SEGMENTED["linear_attention"]
    q = _cuda_like(1, 32768, 2, 64)
    args = dict(q=q, k=q, v=q, scale=0.125, s=None)
    assert scan.default_segments(args) == 32  # 2 CTAs on 132 SMs: as many as MIN_SEGMENT (1024 tokens) allows
    search.store_segments(scan, la.bind(args), 0, "sm_90a", 4)
    runtime.forget_calls()
    assert scan.default_segments(args) == 4
    monkeypatch.setenv("TILEMIX_SEGMENTS", "2")
    assert scan.default_segments(args) == 2
    assert ops.SEGMENTED["linear_attention"].default_segments(_la_args()) == 1


def test_outputs_shaped_like_an_input_are_allocated_like_it(fake_gpu):
    """A remembered call allocates an output with ``empty_like`` of an input of its shape, dtype and
    contiguous strides (cheaper than ``torch.empty``), and only of such an input: views of other
    strides (half of a 4-head tensor's heads) are never the template, nor is a state of no input's dtype."""
    with FakeTensorMode():
        q = torch.empty(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
        wide = torch.empty_strided((1, 256, 2, 64), (65536, 256, 64, 1), device="cuda", dtype=torch.bfloat16)
        for args, template in ((dict(q=q, k=q, v=q, scale=0.125, s=None), "q"),
                               (dict(q=wide, k=wide, v=wide, scale=0.125, s=None), None)):
            out = runtime.run_kernel(la, args)
            prepared = runtime.recall(runtime.call_signature(la, args, None, None, ()))
            assert [(name, like) for name, _, _, like in prepared.outputs] == [("o", template), ("s", None)]
            assert out["o"].shape == (1, 256, 2, 64) and out["o"].is_contiguous()
