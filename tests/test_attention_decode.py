"""The KV-cache decode path (``ops/attention_decode.py``, flash-decoding): the split and combine
programs through the interpreter against the float64 reference, the rule that picks the path, the
language pieces it takes (stores by block number, output-only dims sized by the call, one consumer
per CTA for own-block programs), ``MultiHeadAttention.extend`` on it, the programs compiled for
sm_90a and sm_80, the bench row, and on a GPU (``gpu``) the kernels against the reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from compile_checks import check_compiled
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix import ops, reference
from tilemix.ops.layers import KVCache
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import Out, Seq, TileError, blocks, kernel, rowsum

decode = importlib.import_module("tilemix.ops.attention_decode")


def _qkv(B, Tq, Tk, H, H_kv, D=16, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Tq, H, D), (B, Tk, H_kv, D), (B, Tk, H_kv, D))
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes)


@settings(max_examples=10, deadline=None)
@given(Tq=st.sampled_from([1, 2, 16, 64]), Tk=st.sampled_from([513, 1100, 2048]), causal=st.booleans(),
       H_kv=st.sampled_from([1, 2, 4]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_decode_path_matches_float64(Tq, Tk, causal, H_kv, dtype):
    """Through ``attention()`` (no gradient: the split path): one to 64 queries, caches on and off
    the 512-key splits, grouped heads; the causal rule aligned to the cache's end."""
    q, k, v = _qkv(1, Tq, Tk, 4, H_kv, dtype=dtype, seed=Tq + Tk)
    assert decode.decode_split(q, k) == 512
    o = ops.attention(q, k, v, causal=causal)
    assert o.shape == q.shape and o.dtype == dtype
    assert rel_err(o, reference.attention(q, k, v, causal=causal)) <= bound(dtype)


def test_attention_takes_the_decode_path_only_without_gradients(monkeypatch):
    calls = []
    run = decode.attention_decode
    attention_module = importlib.import_module("tilemix.ops.attention")  # the package's name is the function
    monkeypatch.setattr(attention_module, "attention_decode", lambda *a: calls.append(a[-1]) or run(*a))
    q, k, v = _qkv(2, 1, 1500, 4, 2)
    expected = reference.attention(q, k, v, causal=True)
    assert rel_err(ops.attention(q, k, v, causal=True), expected) <= 1e-12 and calls == [512]
    q.requires_grad_()
    assert rel_err(ops.attention(q, k, v, causal=True).detach(), expected) <= 1e-12 and calls == [512]


def test_decode_opcheck():
    """The split and combine ops as torch.compile sees them (fake kernels, schemas)."""
    q, k, v = _qkv(1, 3, 700, 4, 2, dtype=torch.float32)
    torch.library.opcheck(torch.ops.tilemix.attention_decode_split_gqa.default, (q, k, v, True, 0.2, 512))
    o_part, lse_part = torch.ops.tilemix.attention_decode_split_gqa(q, k, v, True, 0.2, 512)
    assert o_part.shape == (1, 128, 4, 16) and lse_part.shape == (1, 128, 4)
    torch.library.opcheck(torch.ops.tilemix.attention_decode_combine.default, (o_part, lse_part, 3))


def test_decode_split_rule():
    """Splits only where batch x heads leave the GPU short of two instances per SM, at most 64
    queries, two splits or more, each a power of two of at least 512 keys (132 SMs for CPU tensors)."""
    def split(B, Tq, Tk, H):
        return decode.decode_split(torch.empty(B, Tq, H, 0), torch.empty(B, Tk, 1, 0))

    assert split(8, 1, 32768, 32) == 16384  # 256 instances: two splits reach 264
    assert split(1, 1, 32768, 8) == 1024  # 33 splits wanted: 32768 / 33 rounded up to a power of two
    assert split(1, 16, 100_000, 8) == 4096
    assert split(8, 1, 32768, 64) is None  # 512 instances fill the GPU already
    assert split(1, 65, 32768, 8) is None  # more than one query block
    assert split(1, 1, 512, 8) is None  # a single split
    assert decode.decode_split(torch.empty(1, 1, 8), torch.empty(1, 4096, 1, 8)) is None  # the binding names q


def test_stores_by_block_number():
    """``o[j] = tile`` with j over another dim than o's: block j writes o's rows ``j·r …`` (r the
    tile's rows), one tile per block; o's dim, which no input has, is sized by the call."""

    @kernel
    def block_sums(x: Seq.along("S")[1], sums: Out[Seq.along("P")[1]]):
        for j in blocks(128, dim="S"):
            total = rowsum(x[j].T) + 0 * x[j][0:16]
            sums[j] = total

    x = torch.arange(300, dtype=torch.float64).reshape(1, 300, 1)
    out = torch.as_tensor(block_sums(x=x, P=48)["sums"])[0, :, 0]
    assert out[0::16].tolist() == [sum(range(128)), sum(range(128, 256)), sum(range(256, 300))]
    assert block_sums(x=x, P=64)["sums"].shape == (1, 64, 1)  # a size the call gives, not one remembered
    with pytest.raises(TypeError, match=r"^P: the length of the outputs along it, a non-negative int; got 4.5"):
        block_sums(x=x, P=4.5)
    with pytest.raises(TypeError, match=r"output sums: dims \['P'\] are not sized by any input"):
        block_sums(x=x)


def test_loads_take_an_index_over_their_own_dim():
    @kernel
    def foreign(x: Seq.along("S")[1], z: Seq[1], y: Out[Seq[1]]):
        for j in blocks(64):
            y[j] = x[j] + z[j]

    with pytest.raises(TileError, match="an index over T cannot address the S axis"):
        foreign(x=torch.zeros(1, 64, 1), z=torch.zeros(1, 64, 1))


def test_split_programs_run_one_consumer_per_cta():
    """Neighbouring splits would walk the union of their keys with two consumers sharing loads:
    ``declare(own_blocks=True)`` keeps the default schedule at one (forward attention: two)."""
    from tilemix.codegen.schedule import default_schedule
    from tilemix.ops.examples import kernel_specs

    attention_programs = importlib.import_module("tilemix.ops.attention")
    for program, consumers in ((decode.attention_decode_split_gqa, 1), (attention_programs.attention_fwd_cross, 2)):
        binding = program.bind(kernel_specs(program, size=128))
        assert default_schedule(program, binding, "sm_90a").consumers == consumers


def test_multi_head_attention_extends_a_cache_without_torch_sdpa(monkeypatch):
    """``extend`` with a cache runs the attention op (cross-attention, the decode path for one token),
    not SDPA, and equals the full forward."""
    def refuse(*args, **kwargs):
        raise AssertionError("extend called torch SDPA")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)
    torch.manual_seed(0)
    layer = ops.MultiHeadAttention(dim=64, heads=4, kv_heads=2).double()
    x = torch.randn(1, 600, 64, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        y, cache = layer.extend(x[:, :530])
        parts = [y]
        for t in range(530, 600, 35):
            y, cache = layer.extend(x[:, t:t + 35], cache)
            parts.append(y)
        y, _ = layer.extend(x[:, 599:], _first_tokens(cache, 599))
    assert torch.allclose(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-12)
    assert torch.allclose(y, full[:, 599:], rtol=1e-10, atol=1e-12)


def _first_tokens(cache, length):
    """The cache's first ``length`` tokens (re-running the last token as a decode step)."""
    return KVCache(cache.k[:, :length], cache.v[:, :length])


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["attention_decode_split", "attention_decode_split_gqa", "attention_decode_combine"])
def test_decode_programs_compile(name, causal, arch):
    """At the bench row's shape (B = 8, one query, a 32k cache, H = 32 on 8 kv heads of 128, two
    splits): tensor-core matmuls in the split program, no local memory."""
    pytest.importorskip("cuda.bindings")
    from tilemix.tiles import TensorSpec

    q, kv = TensorSpec((8, 1, 32, 128), "bfloat16"), TensorSpec((8, 32768, 32 if name.endswith("split") else 8, 128),
                                                                   "bfloat16")
    program = getattr(decode, name)
    if name == "attention_decode_combine":
        if causal:
            pytest.skip("the combine program has no mask")
        args = dict(o_part=TensorSpec((8, 128, 32, 128), "bfloat16"), lse_part=TensorSpec((8, 128, 32), "float32"),
                    T=1)
    else:
        args = dict(q=q, k=kv, v=kv, scale=0.1, is_causal=causal, split=16384, P=128)
    check_compiled(program, program.bind(args), arch, name, {}, mma=name != "attention_decode_combine")


def test_bench_has_attention_decode_rows():
    """``tilemix bench attention-step`` (issue 24's decode row): one query (16 for -q16) against a 32k
    cache beside cuDNN's SDPA; the CPU stand-in runs the decode path on the interpreter."""
    from tilemix.bench import bench

    assert bench.default_rows(["attention-step", "attention-step-q16"]) == [
        ("attention-step", 8, 32768, 32, 128), ("attention-step-q16", 8, 32768, 32, 128)]
    assert bench.direction("attention-step") == "decode"
    ours, peer, name, nbytes, flops, shape = bench.CASES["attention-step-q16"](1, 1500, 8, 16, torch.float32,
                                                                              device="cpu")
    assert ours().shape == (1, 16, 8, 16) and name == "sdpa-cudnn" and callable(peer) and nbytes > 0 < flops
    assert shape == dict(B=1, Tq=16, T=1500, H=8, H_kv=2, gqa=True, D=16)


@pytest.mark.gpu
@pytest.mark.parametrize("B, Tq, Tk, H, H_kv", [(8, 1, 32768, 32, 8), (1, 16, 10000, 8, 1), (2, 5, 3000, 4, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("target", ["auto", "generic"])
def test_gpu_decode_matches_reference(B, Tq, Tk, H, H_kv, causal, target, monkeypatch):
    """The split and combine kernels, outputs poisoned so an unwritten element fails, against the
    float64 reference; the shape takes the decode path."""
    monkeypatch.setenv("TILEMIX_POISON", "1")
    q, k, v = _qkv(B, Tq, Tk, H, H_kv, D=128, dtype=torch.bfloat16, seed=Tk, device="cuda")
    assert decode.decode_split(q, k) is not None
    with ops.use_target(target):
        o = ops.attention(q, k, v, causal=causal)
    assert not o.isnan().any()
    assert rel_err(o.cpu(), reference.attention(q.cpu(), k.cpu(), v.cpu(), causal=causal)) <= bound(torch.bfloat16)
