"""The sm_90a code generator: SASS checks on any machine, numerics on an H100.

The CPU half compiles every lowered op through NVRTC and reads its SASS and
resource usage (no GPU needed). The GPU half (``-m gpu``) runs the generated
kernels against the float64 references and the interpreter, with outputs
poisoned with NaN so an unwritten element fails.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix import ops, reference
from tilemix.ops.examples import example_specs
from tilemix.reference.tolerance import MAX_CONDITION, bound, rel_err

pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from tilemix.codegen.compile import compile_cuda, ptxas_report, resources, sass  # noqa: E402
from tilemix.codegen.schedule import default_source  # noqa: E402
from tilemix.codegen.specialise import hopper_source  # noqa: E402

LOWERED = ["gemm", "attention", "linear_attention", "ssd"]
SPILLING: dict[str, str] = {}  # known register spills (op -> why), tracked until the lowering fixes them


def _compile(op: str):
    program = ops.PROGRAMS[op]
    source = default_source(program, program.bind(example_specs(op)))
    return compile_cuda(source.source, "sm_90a", source.name)


@pytest.mark.parametrize("op", LOWERED)
def test_sass_uses_wgmma(op):
    assert "HGMMA" in sass(_compile(op)), f"{op}: no warpgroup MMA in the SASS"


@pytest.mark.parametrize("op", LOWERED)
def test_wgmma_not_serialised(op):
    """ptxas serialises every wgmma of a kernel (remark C7515) when other instructions write an
    accumulator while its wgmma may be in flight: the asynchronous lowering must never cause that."""
    program = ops.PROGRAMS[op]
    source = default_source(program, program.bind(example_specs(op)))
    report = ptxas_report(source.source, "sm_90a", source.name)
    assert "Used" in report and "C7515" not in report, report


@pytest.mark.parametrize("op", LOWERED)
def test_no_local_memory(op):
    binary = _compile(op)
    text, usage = sass(binary), resources(binary)
    spills = "LDL" in text or "STL" in text or usage["stack"] or usage["local"]
    if op in SPILLING:
        assert spills, f"{op} no longer spills: take it off SPILLING"
        pytest.xfail(f"{op} spills: {SPILLING[op]}")
    assert not spills, f"{op}: local memory in the SASS or stack use: {usage}"


# -- on the H100 -------------------------------------------------------------------
def _inputs(op: str, B, T, H, D, dtype, seed, initial_state):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    if op == "linear_attention":
        args = dict(q=rnd(B, T, H, D).to(dtype), k=rnd(B, T, H, D).to(dtype), v=rnd(B, T, H, D).to(dtype))
    else:
        G = 1 if H % 2 else 2
        args = dict(x=rnd(B, T, H, D).to(dtype), dt=torch.rand(B, T, H, generator=g) * 0.5 + 0.01,
                    A=-(torch.rand(H, generator=g) * 4 + 0.1), B=rnd(B, T, G, D).to(dtype),
                    C=rnd(B, T, G, D).to(dtype), D=rnd(H))
    if initial_state:
        args["initial_state"] = rnd(B, H, D, D)
    args["output_final_state"] = True
    return args


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["linear_attention", "ssd"])
@pytest.mark.parametrize("T", [1, 63, 64, 100, 300, 1024])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("initial_state", [False, True])
def test_gpu_matches_reference(op, T, D, dtype, initial_state, monkeypatch):
    monkeypatch.setenv("TILEMIX_POISON", "1")
    args = _inputs(op, 2, T, 3, D, dtype, seed=T * D, initial_state=initial_state)
    cuda_args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out, state = getattr(ops, op)(**cuda_args)
    torch.cuda.synchronize()
    ref_out, ref_state = getattr(reference, op)(**args)
    assert rel_err(out.cpu(), ref_out) <= bound(dtype)
    assert rel_err(state.cpu(), ref_state) <= bound(dtype)
    cpu_out, _ = getattr(ops, op)(**args)  # the interpreter predicts the kernel
    assert rel_err(out.cpu(), cpu_out.double().numpy()) <= bound(dtype)
    assert np.isfinite(out.float().cpu().numpy()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["linear_attention", "ssd"])
@pytest.mark.parametrize("T, segments", [(1024, 4), (4096, 16), (4096, 64)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("initial_state", [False, True])
def test_gpu_segments_match_reference(op, T, segments, D, initial_state, monkeypatch):
    """Sequence-parallel state passing (forced segment counts) against the float64 reference."""
    monkeypatch.setenv("TILEMIX_POISON", "1")
    monkeypatch.setenv("TILEMIX_SEGMENTS", str(segments))
    args = _inputs(op, 1, T, 2, D, torch.bfloat16, seed=segments + D, initial_state=initial_state)
    cuda_args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out, state = getattr(ops, op)(**cuda_args)
    ref_out, ref_state = getattr(reference, op)(**args)
    assert rel_err(out.cpu(), ref_out) <= bound(torch.bfloat16)
    assert rel_err(state.cpu(), ref_state) <= bound(torch.bfloat16)


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(op=st.sampled_from(["linear_attention", "ssd"]), B=st.integers(1, 3), T=st.integers(1, 700),
       H=st.integers(1, 4), D=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       initial_state=st.booleans(), seed=st.integers(0, 2**16))
def test_gpu_scans_drawn(op, B, T, H, D, dtype, initial_state, seed):
    """Hypothesis-drawn shapes (T mostly not a multiple of the chunk) against float64 and the
    interpreter, outputs poisoned. Outputs that are small differences of large terms are judged
    against the terms (as in test_ops: hypothesis found ssd at T=1 with c·b·dt·x cancelling D·x)."""
    args = _inputs(op, B, T, H, D, dtype, seed=seed, initial_state=initial_state)
    cuda_args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TILEMIX_POISON", "1")
        out, state = getattr(ops, op)(**cuda_args)
    ref_out, ref_state = getattr(reference, op)(**args)
    absolute = {k: (v.abs() if isinstance(v, torch.Tensor) and k not in ("dt", "A") else v) for k, v in args.items()}
    mag_out, mag_state = getattr(reference, op)(**absolute)
    condition = MAX_CONDITION[str(dtype).replace("torch.", "")]
    assert rel_err(out.cpu(), ref_out, mag_out, condition) <= bound(dtype)
    assert rel_err(state.cpu(), ref_state, mag_state, condition) <= bound(dtype)
    cpu_out, _ = getattr(ops, op)(**args)
    assert rel_err(out.cpu(), cpu_out.double().numpy()) <= bound(dtype)


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 700), H=st.integers(1, 3), D=st.sampled_from([64, 128]),
       causal=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_gpu_attention_drawn(B, T, H, D, causal, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TILEMIX_POISON", "1")
        out = ops.attention(q.cuda(), k.cuda(), v.cuda(), causal=causal).cpu()
    assert rel_err(out, reference.attention(q, k, v, causal=causal)) <= bound(dtype)
    assert rel_err(out, ops.attention(q, k, v, causal=causal).double().numpy()) <= bound(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 63, 100, 300, 1000])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention(T, D, causal, dtype, monkeypatch):
    monkeypatch.setenv("TILEMIX_POISON", "1")
    g = torch.Generator().manual_seed(T + D)
    q, k, v = (torch.randn(2, T, 3, D, generator=g).to(dtype) for _ in range(3))
    out = ops.attention(q.cuda(), k.cuda(), v.cuda(), causal=causal).cpu()
    assert rel_err(out, reference.attention(q, k, v, causal=causal)) <= bound(dtype)
    assert rel_err(out, ops.attention(q, k, v, causal=causal).double().numpy()) <= bound(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("M, N, K", [(128, 128, 64), (200, 136, 72), (1000, 512, 320), (1, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gemm(M, N, K, dtype, monkeypatch):
    monkeypatch.setenv("TILEMIX_POISON", "1")
    g = torch.Generator().manual_seed(M + N + K)
    a, b = torch.randn(M, K, generator=g).to(dtype), torch.randn(K, N, generator=g).to(dtype)
    out = ops.gemm(a.cuda(), b.cuda()).cpu()
    assert rel_err(out, reference.gemm(a, b)) <= bound(dtype)


@pytest.mark.parametrize("op, D, arch, stages", [
    ("linear_attention", 64, "sm_90a", 3),   # one consumer, 24 KiB a stage
    ("linear_attention", 128, "sm_90a", 3),  # two consumers: 192 KiB at three stages
    ("ssd", 128, "sm_90a", 3),
    ("linear_attention", 64, "sm_80", 2),    # the generic target's scans keep two (unmeasured deeper)
])
def test_default_schedule_of_scans_has_the_deepest_ring_that_fits(op, D, arch, stages):
    """Scans get as many ring stages as shared memory holds, up to MAX_STAGES, on sm_90a."""
    from tilemix.codegen.schedule import MAX_STAGES, default_schedule
    from tilemix.codegen.specialise import kernel_source

    program = ops.PROGRAMS[op]
    binding = program.bind(example_specs(op, D=D))
    schedule = default_schedule(program, binding, arch)
    assert schedule.stages == stages <= MAX_STAGES
    kernel_source(program, binding, schedule, arch)  # it fits


@pytest.mark.parametrize("B, H, consumers", [(8, 16, 2), (4, 16, 1), (1, 8, 1)])
def test_launch_schedule_fills_the_gpu(B, H, consumers, monkeypatch):
    """Scans whose two-consumer CTAs would fill less than half of a 132-SM GPU get one consumer per
    CTA (twice the CTAs)."""
    from tilemix.codegen.schedule import launch_schedule

    monkeypatch.setattr("tilemix.codegen.schedule.sm_count", lambda device: 132)
    program = ops.PROGRAMS["linear_attention"]
    binding = program.bind(example_specs("linear_attention", B=B, H=H))
    assert launch_schedule(program, binding, 0).consumers == consumers


@pytest.mark.parametrize("B, sms, paired", [(32, 132, True), (8, 132, False)])
def test_launch_schedule_pairs_heads_of_one_consumer_scans(B, sms, paired, monkeypatch):
    """A one-consumer scan (linear attention at D = 64: no column split) runs two heads per CTA where
    its B·H heads are at least as many as the SMs (the pairs keep over half of them busy)."""
    from tilemix.codegen.schedule import launch_schedule

    monkeypatch.setattr("tilemix.codegen.schedule.sm_count", lambda device: sms)
    program = ops.PROGRAMS["linear_attention"]
    binding = program.bind(example_specs("linear_attention", B=B, H=16, D=64))
    schedule = launch_schedule(program, binding, 0)
    assert (schedule.consumer_axis == "heads" and schedule.consumers == 2) == paired, schedule


@pytest.mark.parametrize("B, D, stages", [(4, 64, 6), (8, 64, 3), (1, 128, 5)])
def test_launch_schedule_deepens_the_ring_where_sms_idle(B, D, stages, monkeypatch):
    """A scan whose CTAs leave over half of a 132-SM GPU idle gets the deepest ring shared memory
    holds, up to IDLE_STAGES (64 CTAs of linear attention at D = 64: 6; D = 128, 16 one-consumer CTAs:
    the 5 that fit); with a CTA per SM it keeps MAX_STAGES."""
    from tilemix.codegen.schedule import launch_schedule

    monkeypatch.setattr("tilemix.codegen.schedule.sm_count", lambda device: 132)
    program = ops.PROGRAMS["linear_attention"]
    binding = program.bind(example_specs("linear_attention", B=B, H=16 if D == 64 else 8, D=D))
    schedule = launch_schedule(program, binding, 0)
    assert schedule.stages == stages, schedule
    hopper_source(program, binding, schedule)  # it fits


def test_paired_heads_scan_has_no_local_memory(monkeypatch):
    """Two heads per CTA take the three-warpgroup register split (168 registers a thread at launch):
    linear attention at D = 64, paired as on a full H100/H200, compiles without spills."""
    from tilemix.codegen.schedule import launch_schedule

    monkeypatch.setattr("tilemix.codegen.schedule.sm_count", lambda device: 132)
    program = ops.PROGRAMS["linear_attention"]
    binding = program.bind(example_specs("linear_attention", B=32, T=1024, H=16, D=64))
    schedule = launch_schedule(program, binding, 0)
    assert schedule.consumer_axis == "heads"
    source = hopper_source(program, binding, schedule)
    usage = resources(compile_cuda(source.source, "sm_90a", source.name))
    assert not usage["stack"] and not usage["local"], usage


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["linear_attention", "ssd"])
@pytest.mark.parametrize("T, segments", [(300, 1), (4096, 8)])
@pytest.mark.parametrize("initial_state", [False, True])
def test_gpu_scans_with_two_heads_per_cta(op, T, segments, initial_state, monkeypatch):
    """One-consumer scans (D = 64) with two heads per CTA, as they run where the heads fill the GPU
    (the SM count lowered here so that a small problem pairs), plain and in segments, against the
    float64 reference."""
    monkeypatch.setattr("tilemix.codegen.schedule.sm_count", lambda device: 2)
    monkeypatch.setenv("TILEMIX_POISON", "1")
    monkeypatch.setenv("TILEMIX_SEGMENTS", str(segments))
    args = _inputs(op, 2, T, 4, 64, torch.bfloat16, seed=T + segments, initial_state=initial_state)
    cuda_args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out, state = getattr(ops, op)(**cuda_args)
    ref_out, ref_state = getattr(reference, op)(**args)
    assert rel_err(out.cpu(), ref_out) <= bound(torch.bfloat16)
    assert rel_err(state.cpu(), ref_state) <= bound(torch.bfloat16)


@pytest.mark.gpu
def test_gpu_more_heads_than_grid_y_allows(monkeypatch):
    """B·H = 70000 > 65535 (the grid's y limit): batch x head rides in grid x."""
    monkeypatch.setenv("TILEMIX_POISON", "1")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70000, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    out, _ = ops.linear_attention(q.cuda(), k.cuda(), v.cuda())
    ref, _ = reference.linear_attention(q, k, v)
    assert rel_err(out.cpu(), ref) <= bound(torch.bfloat16)


def test_column_blocks_of_a_head_are_neighbouring_ctas():
    """At D = 256 linear attention's state splits into four 64-column blocks, one CTA each; they run
    side by side (the fastest part of blockIdx.x), so q and k reach the other three from L2. As grid
    z they ran a wave apart and read q and k from HBM four times (H200, B=8 T=4096 H=16: 0.630 ->
    0.456 ms)."""
    program = ops.PROGRAMS["linear_attention"]
    source = default_source(program, program.bind(example_specs("linear_attention", D=256)))
    assert source.column_ctas == 4 and "blockIdx.z" not in source.source
    decode = source.source.index("colcta = rest % 4; rest /= 4;")
    assert decode < source.source.index("const int b = rest / H")
    narrow = default_source(program, program.bind(example_specs("linear_attention", D=128)))
    assert narrow.column_ctas == 1  # two consumers take both blocks of a head


def test_views_tma_reads_in_place():
    """TMA takes any 16-byte multiple strides: head-split views of a fused projection, column
    slices and transposed layouts are read where they lie; an offset off 16 bytes, a broadcast dim
    or a strided last dim are copied first."""
    from tilemix.codegen.launch import tma_readable

    qkv = torch.empty(2, 100, 4, 3, 64, dtype=torch.bfloat16)  # [B, T, H, (q, k, v), D]
    wide = torch.empty(2, 100, 4, 128, dtype=torch.bfloat16)
    assert all(tma_readable(view) for view in (qkv[..., 0, :], qkv[..., 2, :], wide[..., 64:],
                                                 wide.transpose(1, 2).contiguous().transpose(1, 2), wide[:1, :, :1]))
    assert not any(tma_readable(view) for view in (wide[..., 1:65], wide[:, :, :1].expand(2, 100, 4, 128),
                                                     wide[..., ::2], wide.flatten()[1:51201].view(2, 100, 4, 64)))


@pytest.mark.gpu
def test_gpu_unaligned_and_strided_inputs():
    """Views TMA reads in place (head-split, column slice, transposed layout) and views it cannot
    read (a storage offset off 16 bytes) give the same result as contiguous inputs."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 100, 2, 64, generator=g).to(torch.bfloat16).cuda() for _ in range(3))
    flat = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    shifted = flat[1:].view_as(q)  # 2 bytes past an aligned address
    shifted.copy_(q)
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] view of a [B, H, T, D] tensor
    fused = torch.stack([k, q, v], dim=3)[..., 1, :]  # q's head-split view of a fused projection
    sliced = torch.cat([v, q], dim=-1)[..., 64:]  # q as the right half of a 128-wide tensor
    expected, _ = ops.linear_attention(q, k, v)
    for view in (shifted, strided, fused, sliced):
        out, _ = ops.linear_attention(view, k, v)
        assert torch.equal(out, expected)


def test_one_stage_ring_releases_each_chunk_at_once():
    """With a single stage, a chunk's stage must be released in its own iteration: deferring the
    release to the next iteration (as deeper rings do for gemm) deadlocks producer and consumer."""
    from dataclasses import replace

    from tilemix.codegen.schedule import default_schedule

    program = ops.PROGRAMS["gemm"]
    binding = program.bind(example_specs("gemm"))
    source = hopper_source(program, binding, replace(default_schedule(program, binding), stages=1)).source
    assert "mbar_arrive(&empty[(c - 1)" not in source and "mbar_arrive(&empty[stage])" in source
    deep = default_source(program, binding).source
    assert "mbar_arrive(&empty[(c - 1)" in deep


def test_per_token_vectors_ride_in_the_ring():
    """A chunk's Seq[1] loads (SSD's dt) are copied into the ring by the producer's first warp, each
    lane arriving on the stage's barrier (initialised to expect them), and read from shared memory;
    a program without them keeps its one-thread producer. The generic target copies them with the
    chunk's tiles."""
    program = ops.PROGRAMS["ssd"]
    binding = program.bind(example_specs("ssd"))
    src = default_source(program, binding).source
    producer = src[src.index("setmaxnreg_dec"):src.index("setmaxnreg_inc")]
    assert "if (threadIdx.x < 32) {" in producer and "tm::load_col_async<64, 32>(" in producer
    assert "tm::cp_async_arrive(&full[stage]);" in producer and "tm::mbar_init(&full[s], 33);" in src
    consumer = src[src.index("setmaxnreg_inc"):]
    assert "tm::load_col_shared(" in consumer and "tm::load_col(" not in consumer
    la = ops.PROGRAMS["linear_attention"]
    plain = default_source(la, la.bind(example_specs("linear_attention"))).source
    assert "load_col" not in plain and "tm::mbar_init(&full[s], 1);" in plain and "if (threadIdx.x == 0) {" in plain
    generic = default_source(program, binding, "sm_90").source
    start = generic.index("auto load_chunk")
    assert "tm::load_col_async<64, " in generic[start:generic.index("};", start)]
    assert "tm::load_col_shared(" in generic and "tm::load_col(" not in generic


def test_transposes_and_reductions_exchange_through_separate_buffers():
    """A transpose returns right after reading its buffer, and a column sum or scan writes its own at
    once: through one buffer, a column sum right after a transpose could overwrite values a slower
    warp was still reading. Each kind has its buffer, sized for the program's widest exchange (the
    user mixer gla_fwd: a 64x128 cumsum and column sum, 512 floats, and a 128-row transpose)."""
    from test_generic import PROGRAMS

    program, specs = PROGRAMS["gla_fwd"]
    src = default_source(program, program.bind(specs)).source
    assert re.search(r"tm::transpose\(\w+, \w+, transposed, bar_id\);", src)
    assert re.search(r"tm::reduce_cols\([^;]*, scratch, bar_id\);", src)
    assert re.search(r"tm::cumsum_rows\([^;]*, scratch, bar_id\);", src)
    assert "float* transposed = scratch + 512;" in src


def test_per_token_vectors_need_no_exchange():
    """SSD's chunk reads dtᵀ's elements from its ring stage where it multiplies by them (a view, no
    registers, no transpose through a buffer: two barriers fewer), and its total log decay from the
    prefix scan its cumsums read (no column reduction): no exchange buffer but the scan's."""
    program = ops.PROGRAMS["ssd"]
    src = default_source(program, program.bind(example_specs("ssd"))).source
    view = re.search(r"const tm::shared_row<64> (\w+)\{\(const float\*\)\(smem \+ \d+ \+ stage \* \d+", src)
    assert view and re.search(rf"tm::map2\(.*, {view.group(1)}\);", src)  # read where it multiplies
    assert "tm::transpose(" not in src and "tm::reduce_cols(" not in src
    scan = re.search(r"tm::prefix_scan\(\w+, (\(\(float\*\)\(smem \+ \d+\) \+ wg \* (\d+)\))", src)
    assert scan and f"{scan.group(1)}[{int(scan.group(2)) - 1}]);" in src  # its last inclusive sum
    assert "transposed" not in src


def test_elementwise_maps_read_loaded_tiles_in_place():
    """SSD's ``x[c] * (dt·decay)`` reads x's elements from the ring stage where it multiplies (a
    view of the swizzled tile, no 32-register copy live until x's last reader), on both targets."""
    program = ops.PROGRAMS["ssd"]
    binding = program.bind(example_specs("ssd"))
    for src in (default_source(program, binding).source, default_source(program, binding, "sm_80").source):
        assert re.search(r"tm::map2\(\w+, .*, tm::shared_tile<true, 64, \d+>\{\(smem \+ stage \* stage_bytes", src)
        assert "tm::load_shared<" not in src


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_gpu_gemm_every_ring_depth(stages):
    from dataclasses import replace

    from tilemix.codegen.schedule import default_schedule
    from tilemix.ops.runtime import run_kernel

    g = torch.Generator().manual_seed(stages)
    a, b = (torch.randn(300, 200, generator=g).bfloat16(), torch.randn(200, 264, generator=g).bfloat16())
    program = ops.PROGRAMS["gemm"]
    schedule = replace(default_schedule(program, program.bind(dict(a=a, b=b))), stages=stages)
    try:
        out = run_kernel(program, dict(a=a.cuda(), b=b.cuda()), schedule=schedule)["c"]
    except Exception as e:  # a ring too deep for shared memory is refused, never run
        assert "shared memory" in str(e)
        return
    assert rel_err(out.cpu(), reference.gemm(a, b)) <= bound(torch.bfloat16)
