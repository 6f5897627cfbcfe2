"""Grouped-query attention (k and v with H_kv < H heads): the ``*_gqa`` programs through the
interpreter against the float64 reference (k and v repeated per query head), float64 gradients, the
argument checks, and the programs lowered for sm_90a (wgmma) without a GPU. The generic lowering of
every program, these included, is tested in test_generic.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilemix import ops, reference
from tilemix.reference.tolerance import bound, rel_err


def _qkv(T, H, H_kv, D=16, Dv=16, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, T, H, D), (2, T, H_kv, D), (2, T, H_kv, Dv))
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
                 for s in shapes)


def _repeated(q, k, v, causal, scale):
    """Plain attention in torch ops on k and v repeated per query head: what GQA means."""
    r = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(r, 2), v.repeat_interleave(r, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if causal:
        T = q.shape[1]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshv->bthv", s.softmax(-1), v)


@pytest.mark.parametrize("T, H, H_kv, Dv", [(70, 4, 2, 16), (130, 4, 1, 32), (1, 6, 3, 16)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_matches_reference(T, H, H_kv, Dv, causal, dtype):
    q, k, v = _qkv(T, H, H_kv, Dv=Dv, seed=T, dtype=dtype)
    o = ops.attention(q, k, v, causal=causal)
    assert o.shape == (2, T, H, Dv) and o.dtype == dtype
    assert rel_err(o, reference.attention(q, k, v, causal=causal)) <= bound(dtype)


def test_reference_repeats_the_kv_heads():
    """The reference's grouped heads are the repeated ones (head h reads kv head h // (H // H_kv))."""
    q, k, v = _qkv(20, 6, 2)
    expected = reference.attention(q, k.repeat_interleave(3, 2), v.repeat_interleave(3, 2), causal=True)
    np.testing.assert_array_equal(reference.attention(q, k, v, causal=True), expected)


@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_gradcheck(T, causal):
    """dk and dv are per kv head, the sum of the query heads' shares over each group."""
    q, k, v = _qkv(T, 4, 2, requires_grad=True, seed=T)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, causal=causal, scale=0.3), (q, k, v),
                                    fast_mode=True)


@pytest.mark.parametrize("H_kv", [1, 2])
def test_gqa_gradients_match_torch(H_kv):
    """Every gradient against torch autograd of the repeated-heads formula, through ``ops.attention``
    (the training forward) and ``torch.ops.tilemix.attention_gqa`` called directly (recomputes the
    log-sum-exp)."""
    q, k, v = _qkv(150, 4, H_kv, Dv=32, seed=H_kv)
    do = torch.randn(2, 150, 4, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected = torch.autograd.grad(_repeated(*(t.requires_grad_() for t in (q, k, v)), True, 0.25), (q, k, v), do)
    for forward in (lambda *a: ops.attention(*a, causal=True, scale=0.25),
                    lambda *a: torch.ops.tilemix.attention_gqa(*a, True, 0.25)):
        grads = torch.autograd.grad(forward(q, k, v), (q, k, v), do)
        for ours, ref in zip(grads, expected):
            assert ours.shape == ref.shape
            assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_gqa_opcheck():
    q, k, v = _qkv(70, 4, 2, dtype=torch.float32, requires_grad=True)
    for name in ("attention_gqa", "attention_gqa_lse"):
        torch.library.opcheck(getattr(torch.ops.tilemix, name).default, (q, k, v, True, 0.2))


def test_kv_heads_must_divide_query_heads():
    q, k, v = _qkv(10, 4, 3)
    with pytest.raises(ValueError, match=r"^k: its 3 heads must divide q's 4 heads"):
        ops.attention(q, k, v)
    q, k, _ = _qkv(10, 4, 2)
    with pytest.raises(ValueError, match=r"^v"):
        ops.attention(q, k, _qkv(10, 4, 1)[2])
    with pytest.raises(ValueError, match=r"^k: expected shape \[B, T, H_kv, D\] with H_kv dividing H = 4"):
        reference.attention(q, _qkv(10, 4, 3)[1], v)


@pytest.mark.parametrize("D, chunk", [(128, None), (256, 64)])
def test_gqa_programs_take_the_forward_choices(D, chunk):
    """The derived forward programs keep the declared key chunk (64 keys beyond head dim 128) and the
    generic target's block shapes."""
    import importlib

    from tilemix.codegen import schedule

    at = importlib.import_module("tilemix.ops.attention")
    x = torch.zeros(1, 64, 1, D)
    for plain, grouped in ((at.attention_fwd, at.attention_fwd_gqa), (at.attention_fwd_lse, at.attention_fwd_lse_gqa)):
        assert schedule.call_consts(grouped, dict(q=x, v=x)).get("chunk") == chunk
        assert grouped.target_consts == plain.target_consts != {}


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_programs_lower_for_sm90a(causal):
    """The grouped programs at the GQA bench shape (H = 32, H_kv = 8, D = 128) compile for sm_90a:
    wgmma, no local memory, no wgmma serialisation (ptxas C7515)."""
    pytest.importorskip("cuda.bindings")
    import importlib

    from tilemix.codegen.compile import compile_cuda, ptxas_report, resources, sass
    from tilemix.codegen.schedule import default_source
    from tilemix.tiles import TensorSpec

    at = importlib.import_module("tilemix.ops.attention")  # the module (tilemix.ops.attention is the op)

    seq, kv, vec = (TensorSpec((2, 4096, 32, 128), "bfloat16"), TensorSpec((2, 4096, 8, 128), "bfloat16"),
                    TensorSpec((2, 4096, 32), "float32"))
    forward = dict(q=seq, k=kv, v=kv, scale=0.1, is_causal=causal)
    backward = dict(forward, do=seq, lse=vec)
    for kernel, args in ((at.attention_fwd_gqa, forward), (at.attention_fwd_lse_gqa, forward),
                         (at.attention_bwd_dq_gqa, dict(backward, o=seq)),
                         (at.attention_bwd_dkdv_gqa, dict(backward, delta=vec))):
        source = default_source(kernel, kernel.bind(args))
        assert "h / (H / G)" in source.source, kernel.name  # k and v are read at the group's head
        binary = compile_cuda(source.source, "sm_90a", source.name)
        text, usage = sass(binary), resources(binary)
        assert "HGMMA" in text, kernel.name
        assert not ("LDL" in text or "STL" in text or usage["stack"] or usage["local"]), (kernel.name, usage)
        report = ptxas_report(source.source, "sm_90a", source.name)
        assert "Used" in report and "C7515" not in report, report


@pytest.mark.gpu
@pytest.mark.parametrize("T, H, H_kv", [(100, 4, 1), (300, 4, 2), (1024, 6, 3)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("target", ["auto", "generic"])
def test_gpu_gqa_matches_interpreter(T, H, H_kv, causal, target, monkeypatch):
    """The GPU kernels (sm_90a or generic), outputs poisoned so an unwritten element fails: output and
    gradients against the interpreter running the same programs (bf16 numerics emulated) and the
    forward against the float64 reference."""
    monkeypatch.setenv("TILEMIX_POISON", "1")
    assert_gpu_attention_matches_interpreter(*_qkv(T, H, H_kv, D=128, Dv=128, seed=T, dtype=torch.bfloat16),
                                             causal, target)


def assert_gpu_attention_matches_interpreter(q, k, v, causal: bool, target: str) -> None:
    """bf16 ``q, k, v`` on the GPU (``target``) and on the interpreter: output and gradients within the
    bf16 bound of each other, the output within it of the float64 reference; nothing left NaN."""
    do = torch.randn(*q.shape[:3], v.shape[-1], generator=torch.Generator().manual_seed(1)).bfloat16()
    results = []
    for device in ("cuda", "cpu"):
        xs = [t.to(device).requires_grad_() for t in (q, k, v)]
        with ops.use_target(target if device == "cuda" else None):
            o = ops.attention(*xs, causal=causal)
            o.backward(do.to(device))
        results.append([o.detach().cpu()] + [t.grad.cpu() for t in xs])
    assert rel_err(results[0][0], reference.attention(q, k, v, causal=causal)) <= bound(torch.bfloat16)
    for ours, interp in zip(*results):
        assert not ours.isnan().any()
        assert rel_err(ours, interp.double().numpy()) <= bound(torch.bfloat16)


def test_bench_has_grouped_query_rows():
    """``tilemix bench attention-gqa attention-gqa-bwd`` time H = 32 query heads on 8 kv heads beside
    SDPA's ``enable_gqa``; the backward case (CPU stand-in: the interpreter at a small shape) returns
    gradients of k and v per kv head."""
    from tilemix.bench import bench

    assert {row[0]: row[1:] for row in bench.default_rows(["attention-gqa", "attention-gqa-bwd"])} == {
        "attention-gqa": bench.GQA_SHAPE, "attention-gqa-bwd": bench.GQA_SHAPE}
    assert bench.direction("attention-gqa-bwd") == "bwd"
    ours, _, peer, nbytes, flops, shape = bench.CASES["attention-gqa-bwd"](1, 70, 8, 16, torch.float32, device="cpu")
    dq, dk, dv = ours()
    assert dq.shape == (1, 70, 8, 16) and dk.shape == dv.shape == (1, 70, 2, 16)
    assert shape == dict(B=1, T=70, H=8, H_kv=2, gqa=True, D=16, causal=True) and peer == "sdpa-cudnn"
