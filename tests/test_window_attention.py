"""Sliding-window attention, ``ops.attention(..., causal=True, window=W)``: the interpreter against
the float64 reference (partial chunks, windows narrower than a chunk and wider than the sequence),
gradients (gradcheck), bad windows named, the four programs' lowering for sm_90a and sm_80, and on
a GPU bf16 forward and backward against float64."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from tilemix import ops
from tilemix.ops.attention import attention_bwd_dkdv, attention_bwd_dq, attention_fwd, attention_fwd_lse
from tilemix.reference import attention as reference_attention
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import TensorSpec


def _windowed(q, k, v, window, scale=None):
    """float64 torch attention with the sliding-window mask, differentiable (the gradients' reference)."""
    T, D = q.shape[1], q.shape[-1]
    heads = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(heads, 2), v.repeat_interleave(heads, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * (D ** -0.5 if scale is None else scale)
    t = torch.arange(T)
    seen = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores.masked_fill(~seen, float("-inf")), -1), v)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 129, 300])
@pytest.mark.parametrize("window", [1, 17, 64, 100, 200, 512])
def test_window_attention_matches_float64(T, window):
    g = torch.Generator().manual_seed(T * 1000 + window)
    q, k, v = (torch.randn(2, T, 2, 32, generator=g) for _ in range(3))
    out = ops.attention(q, k, v, causal=True, window=window)
    expected = reference_attention(q.numpy(), k.numpy(), v.numpy(), causal=True, window=window)
    assert rel_err(out, expected) <= bound(torch.float32)


def test_window_attention_grouped_kv_matches_float64():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 150, 4, 32, generator=g)
    k, v = (torch.randn(1, 150, 2, 32, generator=g) for _ in range(2))
    out = ops.attention(q, k, v, causal=True, window=40)
    expected = reference_attention(q.numpy(), k.numpy(), v.numpy(), causal=True, window=40)
    assert rel_err(out, expected) <= bound(torch.float32)


def test_a_window_holding_the_sequence_runs_causal_attention(monkeypatch):
    """``W >= T`` runs the causal programs (no window specialisation per such W)."""
    module = importlib.import_module("tilemix.ops.attention")  # the package's name is the function
    calls = []
    # the op's arguments: q, k, v, causal, scale, window, cu_seqlens
    monkeypatch.setattr(module, "call_with_target", lambda target, op, *args: calls.append(args[5]) or args[0])
    x = torch.randn(1, 50, 1, 16)
    for window in (49, 50, 10 ** 12):
        module.attention(x, x, x, causal=True, window=window)
    assert calls == [49, 0, 0]


def test_the_reference_window_is_the_last_w_keys():
    """The reference's window against a token loop: query t averages the values of keys
    ``max(0, t - W + 1) … t`` when all scores are equal."""
    v = np.random.default_rng(0).standard_normal((1, 20, 1, 4))
    zeros = np.zeros((1, 20, 1, 8))
    out = reference_attention(zeros, zeros, v, causal=True, window=3)
    expected = np.stack([v[0, max(0, t - 2):t + 1, 0].mean(0) for t in range(20)])
    np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-12)


@pytest.mark.parametrize("T, window", [(40, 7), (70, 64), (130, 30)])
def test_window_attention_gradcheck(T, window):
    """The backward programs (dq; dk and dv over the query chunks inside the window) against the
    float64 torch attention's gradients, and gradcheck at a small size."""
    g = torch.Generator().manual_seed(T)
    xs = [torch.randn(1, T, 2, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    do = torch.randn(1, T, 2, 16, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(ops.attention(*xs, causal=True, window=window), xs, do)
    expected = torch.autograd.grad(_windowed(*xs, window), xs, do)
    for name, a, e in zip("qkv", ours, expected):
        assert rel_err(a, e.numpy()) <= 1e-12, name
    if T == 40:
        assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, causal=True, window=window), xs)


def test_window_attention_grouped_kv_gradients():
    """Grouped k and v: the dk/dv program's per-query-head shares, summed over each group."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 90, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 90, 2, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    do = torch.randn(1, 90, 4, 16, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(ops.attention(q, k, v, causal=True, window=21), (q, k, v), do)
    expected = torch.autograd.grad(_windowed(q, k, v, 21), (q, k, v), do)
    for name, a, e in zip("qkv", ours, expected):
        assert rel_err(a, e.numpy()) <= 1e-12, name


def test_the_plain_op_recomputes_the_windowed_log_sum_exp():
    """``torch.ops.tilemix.attention`` called directly saves no log-sum-exp; its backward recomputes
    it with the same window."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 100, 2, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    do = torch.randn(1, 100, 2, 16, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(torch.ops.tilemix.attention(*xs, True, 0.25, 33), xs, do)
    expected = torch.autograd.grad(_windowed(*xs, 33, scale=0.25), xs, do)
    for a, e in zip(ours, expected):
        assert rel_err(a, e.numpy()) <= 1e-12


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(causal=True, window=0), ValueError, "window: expected a positive int"),
    (dict(causal=True, window=-4), ValueError, "window: expected a positive int"),
    (dict(causal=True, window=2.0), TypeError, "window: expected a positive int"),
    (dict(causal=True, window=True), TypeError, "window: expected a positive int"),
    (dict(window=16), ValueError, "window: a sliding window is causal"),
])
def test_bad_windows_are_named(kwargs, error, message):
    x = torch.randn(1, 16, 1, 16)
    with pytest.raises(error, match=message):
        ops.attention(x, x, x, **kwargs)


def test_the_reference_refuses_a_window_without_causal():
    x = np.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="window: expected a positive int with causal=True"):
        reference_attention(x, x, x, window=2)


PROGRAMS = {attention_fwd: ("q", "k", "v"), attention_fwd_lse: ("q", "k", "v"),
            attention_bwd_dq: ("q", "k", "v", "o", "do"), attention_bwd_dkdv: ("q", "k", "v", "do")}


def _specs(program, T=16384, D=128) -> dict:
    args = {n: TensorSpec((1, T, 2, D), "bfloat16") for n in PROGRAMS[program]}
    args.update({n: TensorSpec((1, T, 2), "float32") for n in ("lse", "delta") if n in program.specs})
    return dict(args, scale=D ** -0.5, is_causal=True, window=512)


# sm_80 at head dim 64: its dk/dv program at 128 keeps a few bytes of stack, with a window or without
@pytest.mark.parametrize("arch, mma, D", [("sm_90a", "HGMMA", 128), ("sm_80", "HMMA", 64)])
@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.name)
def test_window_programs_compile_with_tensor_cores_and_no_local_memory(program, arch, mma, D):
    """Each program with ``window=512`` lowers with its chunk loop started (forward, dq) or stopped
    (dk/dv) by the window, and compiles to tensor-core code without local memory."""
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    from tilemix.codegen.compile import compile_cuda, resources, sass
    from tilemix.codegen.schedule import default_source

    specs = _specs(program, D=D)
    source = default_source(program, program.bind({**program.consts_for(arch, specs), **specs}), arch)
    windowed = "+ 511)" if program is attention_bwd_dkdv else "- 511) /"
    assert windowed in source.source
    binary = compile_cuda(source.source, arch, source.name)
    code, usage = sass(binary), resources(binary)
    assert mma in code
    assert "LDL" not in code and "STL" not in code and not usage["stack"] and not usage["local"], usage


@pytest.mark.gpu
@pytest.mark.parametrize("T, window", [(1, 17), (300, 17), (333, 100), (1000, 64), (2100, 512), (4096, 2048)])
@pytest.mark.parametrize("target", ["auto", "generic"])
def test_gpu_window_attention_matches_float64(T, window, target):
    """bf16 forward and backward on the GPU against float64 on the same (rounded) inputs."""
    g = torch.Generator().manual_seed(T + window)
    q, k, v, do = (torch.randn(1, T, 2, 128, generator=g).bfloat16() for _ in range(4))
    xs = [t.cuda().requires_grad_() for t in (q, k, v)]
    o = ops.attention(*xs, causal=True, window=window, target=target)
    o.backward(do.cuda())
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    expected = _windowed(*ref, window)
    expected.backward(do.double())
    assert rel_err(o, expected.detach().numpy()) <= bound(torch.bfloat16)
    for name, ours, e in zip("qkv", xs, ref):
        assert rel_err(ours.grad, e.grad.numpy()) <= bound(torch.bfloat16), name


@pytest.mark.parametrize("name", ["attention-window512", "attention-window2048-bwd"])
def test_window_bench_rows_run_and_carry_the_window(name):
    """The bench rows build and run on the interpreter at a small shape, at the bar's shape by
    default, and their records' shape says the window."""
    from tilemix.bench import bench
    from tilemix.bench.windows import WINDOW_SHAPE

    ours, peer, peer_name, nbytes, flops, shape = bench.CASES[name](1, 70, 2, 16, torch.float32, device="cpu")
    out = ours()
    if bench.direction(name) == "bwd":
        assert len(out) == 3 and all(g.isfinite().all() for g in out)
    else:
        assert out.shape == (1, 70, 2, 16) and out.isfinite().all()
    assert peer_name == "flex_attention" and callable(peer) and nbytes > 0 and flops > 0
    assert shape == dict(B=1, T=70, H=2, D=16, causal=True, window=int(name.split("-")[1][6:]))
    assert dict((row[0], row[1:]) for row in bench.default_rows([name]))[name] == WINDOW_SHAPE


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_flex_peer_masks_the_same_window(monkeypatch):
    """The peer's block mask is the same sliding window (flex_attention run eagerly here; the bench
    compiles it on the GPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    from tilemix.bench import windows

    monkeypatch.setattr(windows, "_compiled_flex", lambda: flex_attention)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 200, 2, 16, generator=g) for _ in range(3))
    out = windows._flex_forward(q, k, v, 37)()
    expected = reference_attention(q.numpy(), k.numpy(), v.numpy(), causal=True, window=37)
    assert rel_err(out, expected) <= bound(torch.float32)
