"""Cross-attention (k and v with Tk != Tq tokens): the ``*_cross`` programs (keys along
``Seq.along("S")``) through the interpreter against the float64 reference, causal aligned to the end
as FlashAttention does, rows that see no key at 0; float64 gradients; the argument errors; the
language's second sequence dim; the programs compiled for sm_90a and sm_80; on a GPU (``gpu``) the
kernels against the interpreter."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from compile_checks import check_compiled
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gqa import assert_gpu_attention_matches_interpreter

from tilemix import ops, reference
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import GroupSeq, Head, Out, Seq, TileError, chunks, kernel, rowsum, zeros

attention_programs = importlib.import_module("tilemix.ops.attention")


def _qkv(Tq, Tk, H=4, H_kv=2, D=16, Dv=16, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, Tq, H, D), (2, Tk, H_kv, D), (2, Tk, H_kv, Dv))
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
                 for s in shapes)


def _masked_softmax(q, k, v, causal, scale):
    """Cross-attention in torch ops, the end-aligned causal mask written out (query i sees key
    j <= i + Tk - Tq), rows that see no key at 0: what the programs must compute."""
    r = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(r, 2), v.repeat_interleave(r, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if causal:
        Tq, Tk = q.shape[1], k.shape[1]
        hidden = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)
        s = s.masked_fill(hidden, float("-inf"))
    p = torch.where(s.isinf().all(-1, keepdim=True), 0.0, s.softmax(-1).nan_to_num(0.0))
    return torch.einsum("bhts,bshv->bthv", p, v)


@settings(max_examples=12, deadline=None)
@given(Tq=st.sampled_from([1, 5, 63, 64, 70, 130]), Tk=st.sampled_from([1, 17, 64, 100, 200]),
       causal=st.booleans(), H_kv=st.sampled_from([1, 2, 4]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_cross_attention_matches_float64(Tq, Tk, causal, H_kv, dtype):
    """Tq < Tk and Tq > Tk, lengths on and off the 64-row blocks, one query, grouped heads."""
    q, k, v = _qkv(Tq, Tk, H_kv=H_kv, seed=Tq * 1000 + Tk, dtype=dtype)
    o = ops.attention(q, k, v, causal=causal)
    assert o.shape == (2, Tq, 4, 16) and o.dtype == dtype
    assert rel_err(o, reference.attention(q, k, v, causal=causal)) <= bound(dtype)


@pytest.mark.parametrize("Tq, Tk", [(3, 130), (130, 70), (64, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_is_the_masked_softmax(Tq, Tk, causal):
    """The float64 reference's end-aligned mask and empty rows, against the formula in torch."""
    q, k, v = _qkv(Tq, Tk, seed=Tk)
    expected = _masked_softmax(q, k, v, causal, 16 ** -0.5)
    np.testing.assert_allclose(reference.attention(q, k, v, causal=causal), expected, rtol=1e-12, atol=1e-12)


def test_queries_that_see_no_key_output_zero():
    """Tq > Tk, causal: the first Tq - Tk queries see no key (FlashAttention 2.1+: 0), their
    gradients are 0 and no NaN reaches any gradient."""
    q, k, v = _qkv(100, 30, requires_grad=True)
    o = ops.attention(q, k, v, causal=True)
    assert torch.equal(o[:, :70], torch.zeros_like(o[:, :70])) and o[:, 70:].abs().min() > 0
    o.square().sum().backward()
    assert torch.equal(q.grad[:, :70], torch.zeros_like(q.grad[:, :70]))
    assert all(t.grad.isfinite().all() for t in (q, k, v))


@pytest.mark.parametrize("Tq, Tk", [(20, 70), (70, 20), (1, 65)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H_kv", [1, 4])
def test_cross_attention_gradcheck(Tq, Tk, causal, H_kv):
    q, k, v = _qkv(Tq, Tk, H_kv=H_kv, requires_grad=True, seed=Tq + Tk)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, causal=causal, scale=0.3), (q, k, v),
                                    fast_mode=True)


@pytest.mark.parametrize("H_kv", [2, 4])
def test_cross_attention_gradients_match_torch(H_kv):
    """Every gradient against torch autograd of the written-out formula, through ``ops.attention``
    (the training forward) and the plain op called directly (it recomputes the log-sum-exp)."""
    q, k, v = _qkv(90, 150, H_kv=H_kv, Dv=32, seed=H_kv)
    do = torch.randn(2, 90, 4, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected = torch.autograd.grad(_masked_softmax(*(t.requires_grad_() for t in (q, k, v)), True, 0.25),
                                   (q, k, v), do)
    op = torch.ops.tilemix.attention_cross if H_kv == 4 else torch.ops.tilemix.attention_cross_gqa
    for forward in (lambda *a: ops.attention(*a, causal=True, scale=0.25), lambda *a: op(*a, True, 0.25)):
        grads = torch.autograd.grad(forward(q, k, v), (q, k, v), do)
        for ours, ref in zip(grads, expected):
            assert ours.shape == ref.shape
            assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_cross_attention_opcheck():
    q, k, v = _qkv(70, 100, dtype=torch.float32, requires_grad=True)
    for name in ("attention_cross_gqa", "attention_cross_gqa_lse"):
        torch.library.opcheck(getattr(torch.ops.tilemix, name).default, (q, k, v, True, 0.2))


def test_bad_cross_attention_arguments_name_them():
    q, k, v = _qkv(10, 20)
    with pytest.raises(ValueError, match=r"^k: a sliding window takes keys and queries of one length; k has 20"):
        ops.attention(q, k, v, causal=True, window=4)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^k: with cu_seqlens q, k and v pack the same sequences"):
        ops.attention(q[:1], k[:1], v[:1], cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"^v: expected shape"):
        ops.attention(q, k, v[:, :19])
    with pytest.raises(ValueError, match=r"^window: a sliding window takes keys and queries of one length"):
        reference.attention(q, k, v, causal=True, window=4)


def test_seq_along_declares_a_second_sequence():
    """``Seq.along("S")``: its own length in the layout and the repr; indexed only by a loop over S;
    nothing but Seq and GroupSeq has a sequence to put along another dim."""
    spec = Seq.along("S")["D"]
    assert spec.layout == ("B", "S", "H", "D") and repr(Out[spec]) == "Out[Seq.along('S')['D']]"
    assert GroupSeq.along("S")["D"].layout == ("B", "S", "G", "D")
    with pytest.raises(TypeError, match="head parameters have no sequence dim"):
        Head.along("S")
    with pytest.raises(TypeError, match=r"along\('H'\): expected a dim name"):
        Seq.along("H")

    @kernel
    def wrong_index(q: Seq["D"], k: Seq.along("S")["D"], o: Out[Seq[1]]):
        for c in chunks(64):
            o[c] = rowsum(k[c])

    with pytest.raises(TileError, match="an index over T cannot address the S axis"):
        wrong_index(q=torch.zeros(1, 64, 1, 16), k=torch.zeros(1, 32, 1, 16))


def test_loop_bounds_between_two_dims_align_their_ends():
    """``chunks(dim="S", through=i)`` for a query block i over T stops after key row
    ``(i+1)·64 - 1 + S - T``: counted keys per query block, S = T + 64 and S = T - 64."""

    @kernel
    def keys_seen(q: Seq[1], k: Seq.along("S")[1], n: Out[Seq[1]]):
        for c in chunks(64):
            count = zeros(64, 1)
            for _ in chunks(64, dim="S", through=c):
                count = count + 64
            n[c] = count + q[c] * 0

    for T, S in ((128, 192), (192, 128)):
        n = torch.as_tensor(keys_seen(q=torch.zeros(1, T, 1), k=torch.zeros(1, S, 1))["n"])
        assert n[0, ::64, 0].tolist() == [min(S, max(0, 64 * (i + 1) + S - T)) for i in range(T // 64)]


# measured 2026-12-05: the non-causal dk/dv program at the bench shape, two groups per CTA on sm_80
# (attention_bwd_dkdv spills there too, tests/test_generic.py)
SPILLING = {("attention_bwd_dkdv_cross_gqa", "sm_80", False): 8}


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["attention_fwd_cross_gqa", "attention_fwd_lse_cross_gqa",
                                  "attention_bwd_dq_cross_gqa", "attention_bwd_dkdv_cross_gqa"])
def test_cross_programs_compile(name, causal, arch):
    """Queries 1000, keys 3000 (H = 32, H_kv = 8, D = 128): tensor-core instructions, no local memory;
    the kernel takes the keys' length S and reads k at it."""
    pytest.importorskip("cuda.bindings")
    from tilemix.codegen.schedule import default_source
    from tilemix.tiles import TensorSpec

    q, kv, vec = (TensorSpec((2, 1000, 32, 128), "bfloat16"), TensorSpec((2, 3000, 8, 128), "bfloat16"),
                  TensorSpec((2, 1000, 32), "float32"))
    args = dict(q=q, k=kv, v=kv, scale=0.1, is_causal=causal)
    args.update({"attention_bwd_dq_cross_gqa": dict(do=q, lse=vec, o=q),
                 "attention_bwd_dkdv_cross_gqa": dict(do=q, lse=vec, delta=vec)}.get(name, {}))
    program = getattr(attention_programs, name)
    binding = program.bind(args)
    source = default_source(program, binding, "sm_90a")
    assert source.size_args == ["T", "H", "G", "S"]
    if causal:
        assert "(S - T)" in source.source or "(T - S)" in source.source
    check_compiled(program, binding, arch, (name, arch, causal), SPILLING)


@pytest.mark.gpu
@pytest.mark.parametrize("Tq, Tk, H, H_kv", [(1, 3000, 8, 2), (100, 300, 4, 4), (1000, 200, 6, 3), (16, 4096, 4, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("target", ["auto", "generic"])
def test_gpu_cross_attention_matches_interpreter(Tq, Tk, H, H_kv, causal, target, monkeypatch):
    """The GPU kernels (sm_90a or generic), outputs poisoned so an unwritten element fails: output and
    gradients against the interpreter running the same programs (bf16 numerics emulated) and the
    forward against the float64 reference."""
    monkeypatch.setenv("TILEMIX_POISON", "1")
    assert_gpu_attention_matches_interpreter(*_qkv(Tq, Tk, H, H_kv, D=128, Dv=128, seed=Tq, dtype=torch.bfloat16),
                                             causal, target)
