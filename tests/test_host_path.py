"""The host side of a CUDA call: a call signature seen before skips the checks and choices
(``run_kernel``'s remembered launches), and whole training steps capture into CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from tilemix import ops, reference
from tilemix.reference.tolerance import bound, rel_err


@pytest.fixture
def prepared(monkeypatch):
    """The programs ``prepare_launch`` resolves, in order: what calls did not find remembered."""
    from tilemix.codegen import launch

    names, real = [], launch.prepare_launch
    monkeypatch.setattr(launch, "prepare_launch", lambda kernel, *a: names.append(kernel.name) or real(kernel, *a))
    return names


def test_interpreter_calls_are_not_remembered():
    """CPU tensors (and arguments no call accepts) have no call signature: no launch or segment count
    is remembered and ``run_kernel``'s checks run every time (a public call's replay, ``ops/fastpath.py``,
    runs the interpreter again)."""
    from tilemix.ops import runtime

    q = torch.randn(1, 64, 1, 16)
    assert runtime.call_signature(ops.linear_attention_fwd, dict(q=q, k=q, v=q, scale=0.5)) is None
    assert runtime.call_signature(ops.linear_attention_fwd, dict(q=[1.0], k=q, v=q, scale=0.5)) is None
    ops.linear_attention(q, q, q)
    assert not runtime._BY_SIGNATURE["launch"] and not runtime._BY_SIGNATURE["segments"]


def test_capture_calls_records_what_a_backward_launches():
    """``capture_calls`` lists each ``run_kernel`` call made inside it, in order, with its arguments
    (``tilemix tune <op>-bwd`` tunes those): a linear-attention backward's four programs, nothing of
    the forward before it; an inner capture keeps its calls from the outer one."""
    from tilemix.ops.runtime import capture_calls

    q, k, v = (torch.randn(1, 100, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    o = ops.linear_attention(q, k, v)[0]
    with capture_calls() as calls:
        o.sum().backward()
        with capture_calls() as inner:
            ops.linear_attention(q.detach(), k.detach(), v.detach())
    assert [kernel.name for kernel, _ in calls] == ["linear_attention_bwd_dq", "linear_attention_bwd_total",
                                                    "linear_attention_bwd_dv", "linear_attention_bwd_dk"]
    assert [kernel.name for kernel, _ in inner] == ["linear_attention_fwd"]
    assert calls[0][1]["k"].shape == (1, 100, 2, 16)


@pytest.mark.gpu
def test_gpu_remembered_calls_prepare_once_per_signature(prepared, monkeypatch):
    """A repeated call prepares nothing; new scalars and new tensors of the same shape do not either,
    while a new shape, stride, dtype, schedule override or SM count prepares again."""
    q, k, v = (torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ops.linear_attention(q, k, v)
    assert prepared == ["linear_attention_fwd"]
    ops.linear_attention(q, k, v, scale=0.5)
    ops.linear_attention(q.clone(), k.clone(), v.clone())
    assert prepared == ["linear_attention_fwd"]
    ops.linear_attention(q[:, :128], k[:, :128], v[:, :128])  # a shorter sequence
    ops.linear_attention(q.half(), k.half(), v.half())
    wide = torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16)[..., :64]  # rows of 128 elements
    ops.linear_attention(wide, k, v)
    assert prepared == ["linear_attention_fwd"] * 4
    monkeypatch.setenv("TILEMIX_SCHEDULE", "linear_attention_fwd:stages=1")
    ops.linear_attention(q, k, v)
    monkeypatch.delenv("TILEMIX_SCHEDULE")
    monkeypatch.setattr("tilemix.codegen.schedule.sm_count", lambda device: 2)
    ops.linear_attention(q, k, v)
    assert prepared == ["linear_attention_fwd"] * 6


@pytest.mark.gpu
def test_gpu_remembered_calls_use_each_calls_values(prepared):
    """Remembered calls launch on each call's own scalars and addresses: other scales, other data and
    a view at an address TMA cannot read in place (copied first), each against the reference."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 200, 2, 72, generator=g).bfloat16()
    k, v = (torch.randn(1, 200, 2, 64, generator=g).bfloat16() for _ in range(2))
    gpu = base.cuda()
    for columns, scale in ((slice(0, 64), 0.125), (slice(0, 64), 0.5), (slice(8, 72), 0.5), (slice(1, 65), 0.5)):
        o, _ = ops.linear_attention(gpu[..., columns], k.cuda(), v.cuda(), scale=scale)
        ref, _ = reference.linear_attention(base[..., columns], k, v, scale=scale)
        assert rel_err(o.cpu(), ref) <= bound(torch.bfloat16), (columns, scale)
    assert prepared == ["linear_attention_fwd"]  # one shape, one stride pattern (16-byte aligned or not)


def _ssd_inputs(B, T, H, D):
    return [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16),
            torch.rand(B, T, H, device="cuda") * 0.5 + 0.01, -(torch.rand(H, device="cuda") + 0.1),
            torch.randn(B, T, 1, D, device="cuda", dtype=torch.bfloat16),
            torch.randn(B, T, 1, D, device="cuda", dtype=torch.bfloat16), torch.randn(H, device="cuda")]


GRAPH_STEPS = {  # inputs, then the forward whose output the step differentiates
    "gemm": (lambda: [torch.randn(192, 128, device="cuda", dtype=torch.bfloat16),
                      torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)], ops.gemm),
    "attention": (lambda: [torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)],
                  lambda q, k, v: ops.attention(q, k, v, causal=True)),
    "linear_attention": (lambda: [torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)],
                         lambda q, k, v: ops.linear_attention(q, k, v)[0]),
    "linear_attention in segments": (
        lambda: [torch.randn(1, 16384, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)],
        lambda q, k, v: ops.linear_attention(q, k, v)[0]),
    "ssd": (lambda: _ssd_inputs(1, 300, 2, 64), lambda *a: ops.ssd(*a)[0]),
    "ssd in segments": (lambda: _ssd_inputs(1, 16384, 1, 64), lambda *a: ops.ssd(*a)[0]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GRAPH_STEPS))
def test_gpu_training_step_replays_from_a_cuda_graph(name):
    """Forward and backward of each op captured in a CUDA graph (after warm-up calls, as torch asks)
    and replayed on new inputs copied into the captured ones: the same outputs and gradients as an
    eager step on those inputs (the kernels are deterministic: equal to the bit). Long sequences
    with one head run in segments, whose combine is torch ops in the same graph."""
    make, forward = GRAPH_STEPS[name]

    def step(inputs, weight):
        out = forward(*inputs)
        return [out, *torch.autograd.grad((out.float() * weight).sum(), inputs)]

    captured = [t.requires_grad_() for t in make()]
    weight = torch.randn(forward(*captured).shape, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(captured, weight)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = step(captured, weight)
    fresh = make()
    with torch.no_grad():
        for t, new in zip(captured, fresh):
            t.copy_(new)
    graph.replay()
    expected = step([t.requires_grad_() for t in fresh], weight)
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


def test_host_bench_times_every_row_on_the_cpu(tmp_path):
    """``tilemix bench --host``'s loop on tiny CPU tensors (the interpreter: the numbers mean nothing):
    a record per row and direction, written to the JSON file."""
    import json

    from tilemix.bench.host import HOST_ROWS, run_host_bench

    records = run_host_bench("cpu", shape=(1, 16, 1, 8), calls=1, json_path=str(tmp_path / "host.json"))
    steps = [r for r in HOST_ROWS if r.endswith("_step")]
    assert [(r["op"], r["direction"]) for r in records] == [
        (f"host-{row}", direction) for row in HOST_ROWS
        for direction in (("decode",) if row in steps else ("fwd", "fwd+bwd"))]
    assert all(r["host_us"] > 0 and r["gpu_busy"] is None and r["device"] == "cpu" for r in records)
    assert json.loads((tmp_path / "host.json").read_text())["records"] == records
    with pytest.raises(ValueError, match="rows: unknown"):
        run_host_bench("cpu", rows=("gemm", "nope"))


def test_host_bench_rows_run_in_bf16():
    """The GPU's dtype on the CPU: every row's inputs agree with what its op accepts in bf16."""
    from tilemix.bench.host import HOST_ROWS, run_host_bench

    assert len(run_host_bench("cpu", shape=(1, 16, 1, 8), calls=1, dtype=torch.bfloat16)) == 2 * len(HOST_ROWS) - 2


def test_host_bench_explains_a_missing_gpu(monkeypatch, capsys):
    from tilemix.bench.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--host"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_gpu_host_bench_keeps_the_gpu_busy():
    """On the GPU every timed loop ends with the GPU still busy (the host never waited for it)."""
    from tilemix.bench.host import run_host_bench

    records = run_host_bench("cuda", calls=10, rows=("gemm", "linear_attention_step"))
    assert records and all(r["gpu_busy"] for r in records), records  # idle: a call waited for the GPU

