"""FlashAttention's varlen with ``cu_seqlens_q != cu_seqlens_k``: query sequence i against key
sequence i (the ``*_cross`` programs, keys packed by offsets of their own), causal aligned to the
end of each pair. Against the float64 reference run on each pair alone (empty query or key
sequences, Tq_i above and below Tk_i, grouped heads), float64 gradients, the argument errors, the
kernels compiled for sm_90a and sm_80; on a GPU (``gpu``) the kernels against the interpreter."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from compile_checks import check_compiled
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix import reference
from tilemix.ops import attention
from tilemix.ops.examples import kernel_specs

attention_programs = importlib.import_module("tilemix.ops.attention")


def offsets(lengths, device="cpu"):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def packed_inputs(q_lengths, k_lengths, heads=4, kv_heads=2, D=16, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = ((1, sum(q_lengths), heads, D), (1, sum(k_lengths), kv_heads, D), (1, sum(k_lengths), kv_heads, D))
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes)


def one_pair_at_a_time(q, k, v, q_lengths, k_lengths, run, **options):
    """Each (query, key) sequence pair through ``run`` alone, the outputs packed as q is."""
    qo, ko = offsets(q_lengths).tolist(), offsets(k_lengths).tolist()
    return torch.cat([run(q[:, qo[i]:qo[i + 1]], k[:, ko[i]:ko[i + 1]], v[:, ko[i]:ko[i + 1]], **options)
                      for i in range(len(q_lengths))], dim=1)


def reference_pair(q, k, v, causal):
    """reference.attention on one pair; a pair with no query or no key has zeros (no key is seen)."""
    if q.shape[1] == 0 or k.shape[1] == 0:
        return torch.zeros(*q.shape[:3], v.shape[3], dtype=q.dtype)
    return torch.as_tensor(reference.attention(q, k, v, causal=causal))


lengths = st.lists(st.tuples(st.sampled_from([0, 1, 5, 64, 70, 130]), st.sampled_from([0, 1, 17, 64, 100])),
                   min_size=1, max_size=4)


@settings(max_examples=15, deadline=None)
@given(pairs=lengths, causal=st.booleans(), kv_heads=st.sampled_from([1, 2, 4]))
def test_packed_pairs_match_each_pair_alone_in_float64(pairs, causal, kv_heads):
    """Empty query or key sequences, Tq_i > Tk_i and Tq_i < Tk_i, grouped heads; max_seqlen_q given
    or not."""
    q_lengths, k_lengths = [p[0] for p in pairs], [p[1] for p in pairs]
    q, k, v = packed_inputs(q_lengths, k_lengths, kv_heads=kv_heads, seed=len(pairs))
    longest = dict(max_seqlen_q=max(q_lengths)) if causal else {}
    o = attention(q, k, v, causal=causal, cu_seqlens_q=offsets(q_lengths), cu_seqlens_k=offsets(k_lengths),
                  **longest)
    want = one_pair_at_a_time(q, k, v, q_lengths, k_lengths, reference_pair, causal=causal)
    assert o.shape == q.shape
    torch.testing.assert_close(o, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_pairs_gradcheck(causal):
    q_lengths, k_lengths = [3, 0, 2], [2, 4, 0]
    q, k, v = (t.requires_grad_() for t in packed_inputs(q_lengths, k_lengths, heads=2, kv_heads=1, D=8))
    torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, causal=causal, cu_seqlens_q=offsets(q_lengths),
                                                       cu_seqlens_k=offsets(k_lengths)), (q, k, v))


def test_packed_pairs_gradients_match_each_pair_alone():
    q_lengths, k_lengths = [70, 5, 0, 9], [17, 64, 3, 0]
    q, k, v = (t.requires_grad_() for t in packed_inputs(q_lengths, k_lengths))
    packed = attention(q, k, v, causal=True, cu_seqlens_q=offsets(q_lengths), cu_seqlens_k=offsets(k_lengths))
    alone = one_pair_at_a_time(q, k, v, q_lengths, k_lengths, attention, causal=True)
    weights = torch.randn_like(packed)
    for got, want in zip(torch.autograd.grad((packed * weights).sum(), (q, k, v)),
                         torch.autograd.grad((alone * weights).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_one_offsets_tensor_for_both_is_cu_seqlens():
    lengths = [5, 70]
    q, k, v = packed_inputs(lengths, lengths)
    both = attention(q, k, v, causal=True, cu_seqlens_q=offsets(lengths), cu_seqlens_k=offsets(lengths))
    torch.testing.assert_close(both, attention(q, k, v, causal=True, cu_seqlens=offsets(lengths)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options, error, name", [
    (dict(cu_seqlens_q=offsets([2, 3]), cu_seqlens_k=offsets([4])), ValueError, "cu_seqlens_k"),
    (dict(cu_seqlens_q=offsets([2, 3]), cu_seqlens_k=offsets([1, 3]).long()), TypeError, "cu_seqlens_k"),
    (dict(cu_seqlens_q=offsets([2, 3]).long(), cu_seqlens_k=offsets([1, 3])), TypeError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 2, 5], dtype=torch.int32), cu_seqlens_k=offsets([1, 1, 2])),
     ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=offsets([2, 3]), cu_seqlens_k=torch.tensor([0, 3, 1], dtype=torch.int32)),
     ValueError, "cu_seqlens_k"),
    (dict(cu_seqlens_q=offsets([2, 2]), cu_seqlens_k=offsets([1, 3])), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=offsets([2, 3]), cu_seqlens_k=offsets([1, 2])), ValueError, "cu_seqlens_k"),
    (dict(cu_seqlens_q=offsets([2, 3])), ValueError, "cu_seqlens_k"),
    (dict(cu_seqlens_k=offsets([1, 3])), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens=offsets([2, 3]), cu_seqlens_q=offsets([2, 3]), cu_seqlens_k=offsets([1, 3])), ValueError,
     "cu_seqlens"),
    (dict(cu_seqlens_q=offsets([2, 3]), cu_seqlens_k=offsets([1, 3]), max_seqlen_q=2), ValueError, "max_seqlen_q"),
    (dict(cu_seqlens_q=offsets([2, 3]), cu_seqlens_k=offsets([1, 3]), max_seqlen_k=2), ValueError, "max_seqlen_k"),
    (dict(cu_seqlens_q=offsets([2, 3]), cu_seqlens_k=offsets([1, 3]), max_seqlen_q=3.0), TypeError, "max_seqlen_q"),
    (dict(cu_seqlens_q=offsets([2, 3]), cu_seqlens_k=offsets([1, 3]), window=2), ValueError, "cu_seqlens_k"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_packing_names_the_argument(options, error, name):
    """Mismatched N, non-int32, non-monotonic, a last offset other than the tokens, one of the pair
    missing, both conventions at once, a max_seqlen below the longest (it would drop rows)."""
    q, k, v = packed_inputs([2, 3], [1, 3])
    causal = "window" in options
    with pytest.raises(error, match=rf"^{name}\b"):
        attention(q, k, v, causal=causal, **options)


CROSS_PROGRAMS = [f"attention_{part}_cross{gqa}" for part in ("fwd", "fwd_lse", "bwd_dq", "bwd_dkdv")
                  for gqa in ("", "_gqa")]
# local memory measured in the packed cross kernels (bytes), as in the packed dk/dv kernels on sm_80
# (tests/test_varlen.py's VARLEN_SPILLING)
SPILLING = {("attention_bwd_dkdv_cross", "sm_80"): 16, ("attention_bwd_dkdv_cross_gqa", "sm_80"): 8}


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("program", CROSS_PROGRAMS)
def test_packed_cross_kernels_compile(program, arch):
    """The packed kernels read each pair's query and key offsets (cu_seqlens, cu_seqlens_S), the grid
    spans the longest sequence of its loop's dim, and they compile with tensor cores."""
    pytest.importorskip("cuda.bindings")
    kernel = getattr(attention_programs, program)
    binding = kernel.bind({**kernel_specs(kernel, size=128), "is_causal": True})
    source = check_compiled(kernel, binding, arch, (program, arch), SPILLING, varlen=True)
    assert "S = cu_seqlens_S[b + 1] - bos_S" in source.source and "T = cu_seqlens[b + 1] - bos" in source.source
    assert source.size_args[-1] == ("S_max" if "dkdv" in program else "T_max")


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["hopper", "generic"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_gpu_packed_pairs_match_the_interpreter(kv_heads, causal, target):
    """The generated kernels (bf16, D = 128) against the interpreter on each pair alone, forward and
    gradients; lengths off the blocks, empty sequences, both with and without max_seqlen_q."""
    if target == "hopper" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90a GPU")
    q_lengths, k_lengths = [300, 0, 64, 17, 129, 5], [70, 40, 0, 200, 129, 1000]
    cpu = [t.requires_grad_() for t in packed_inputs(q_lengths, k_lengths, kv_heads=kv_heads, D=128,
                                                     dtype=torch.bfloat16)]
    gpu = [t.detach().cuda().requires_grad_() for t in cpu]
    for longest in ({}, dict(max_seqlen_q=300, max_seqlen_k=1000)):
        got = attention(*gpu, causal=causal, cu_seqlens_q=offsets(q_lengths, "cuda"),
                        cu_seqlens_k=offsets(k_lengths, "cuda"), target=target, **longest)
        want = attention(*[t.double() for t in cpu], causal=causal, cu_seqlens_q=offsets(q_lengths),
                         cu_seqlens_k=offsets(k_lengths))
        torch.testing.assert_close(got.double().cpu(), want, rtol=2e-2, atol=2e-2)
        weights = torch.randn(want.shape, dtype=torch.float64)
        for g, w in zip(torch.autograd.grad((got.double().cpu() * weights).sum(), gpu),
                        torch.autograd.grad((want * weights).sum(), cpu)):
            torch.testing.assert_close(g.double().cpu(), w.double(), rtol=3e-2, atol=3e-2)
