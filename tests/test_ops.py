"""The four ops through the interpreter against the float64 references.

Hypothesis draws shapes (T from 1 to ~300, including partial chunks), head
dims, dtypes, scales and decays; inputs are rounded to the dtype first and
the same rounded tensors go to the reference, so the bound measures the
program, not the input rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tilemix import ops, reference
from tilemix.reference.tolerance import MAX_CONDITION, bound, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 32, 48, 64, 96, 128]

seq_len = st.integers(1, 300)
head_dim = st.sampled_from(HEAD_DIMS)
dtype = st.sampled_from(DTYPES)
seed = st.integers(0, 2**31 - 1)


def log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(float(np.log(lo)), float(np.log(hi))).map(lambda x: float(np.exp(x)))


# scales: log-uniform, or None for the op's default (head dim ** -0.5). Attention scales its logits in
# fp32 after q·kᵀ, so large scales are as accurate as small ones (scaling q first, a bf16 operand, missed
# 1e-2 at scale 1.65, D = 96).
scales = log_uniform(0.05, 2.0) | st.none()


def randn(rng: np.random.Generator, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)


def check(actual, expected, dtype, magnitude=None):
    """Within the dtype's bound; ``magnitude`` (the computation on absolute values) lets badly
    cancelling outputs be judged against their terms (see ``reference.tolerance.MAX_CONDITION``)."""
    error = rel_err(actual, expected, magnitude, MAX_CONDITION[str(dtype).replace("torch.", "")])
    assert error <= bound(dtype), f"relative error {error:.3g} > {bound(dtype):g} for {dtype}"


@given(M=st.integers(1, 300), N=st.integers(1, 300), K=st.integers(1, 300), dtype=dtype, seed=seed)
@example(M=128, N=128, K=64, dtype=torch.float32, seed=0)
@example(M=1, N=1, K=1, dtype=torch.bfloat16, seed=1)
def test_gemm(M, N, K, dtype, seed):
    rng = np.random.default_rng(seed)
    a, b = randn(rng, M, K, dtype=dtype), randn(rng, K, N, dtype=dtype)
    c = ops.gemm(a, b)
    assert c.dtype == dtype and c.shape == (M, N)
    check(c, reference.gemm(a, b), dtype, reference.gemm(a.abs(), b.abs()))


@given(B=st.integers(1, 2), T=seq_len, H=st.integers(1, 3), D=head_dim, Dv=head_dim,
       causal=st.booleans(), dtype=dtype, scale=scales, seed=seed)
@example(B=1, T=65, H=1, D=64, Dv=64, causal=True, dtype=torch.float32, scale=None, seed=0)
@example(B=2, T=63, H=3, D=16, Dv=128, causal=True, dtype=torch.float16, scale=0.5, seed=4)
@example(B=1, T=64, H=1, D=48, Dv=96, causal=False, dtype=torch.float32, scale=0.05, seed=5)
@example(B=1, T=300, H=1, D=128, Dv=128, causal=True, dtype=torch.bfloat16, scale=None, seed=6)
@example(B=1, T=1, H=1, D=16, Dv=16, causal=False, dtype=torch.bfloat16, scale=None, seed=0)
@example(B=1, T=129, H=1, D=32, Dv=48, causal=False, dtype=torch.float16, scale=0.3, seed=2)
def test_attention(B, T, H, D, Dv, causal, dtype, scale, seed):
    rng = np.random.default_rng(seed)
    q, k = randn(rng, B, T, H, D, dtype=dtype), randn(rng, B, T, H, D, dtype=dtype)
    v = randn(rng, B, T, H, Dv, dtype=dtype)
    o = ops.attention(q, k, v, causal=causal, scale=scale)
    assert o.dtype == dtype and o.shape == (B, T, H, Dv)
    check(o, reference.attention(q, k, v, causal=causal, scale=scale), dtype,
          reference.attention(q, k, v.abs(), causal=causal, scale=scale))


@given(B=st.integers(1, 2), T=seq_len, H=st.integers(1, 3), K=head_dim, V=head_dim, dtype=dtype,
       scale=scales, with_state=st.booleans(), final=st.booleans(), seed=seed)
@example(B=1, T=1, H=1, K=16, V=16, dtype=torch.float32, scale=None, with_state=False, final=True, seed=0)
@example(B=2, T=63, H=2, K=64, V=32, dtype=torch.float32, scale=0.5, with_state=True, final=True, seed=1)
@example(B=1, T=64, H=1, K=128, V=128, dtype=torch.bfloat16, scale=None, with_state=True, final=True, seed=2)
@example(B=1, T=65, H=3, K=48, V=96, dtype=torch.float16, scale=None, with_state=False, final=True, seed=3)
@example(B=2, T=129, H=2, K=16, V=128, dtype=torch.float32, scale=2.0, with_state=False, final=False, seed=5)
@example(B=1, T=300, H=1, K=32, V=32, dtype=torch.float32, scale=None, with_state=True, final=True, seed=4)
def test_linear_attention(B, T, H, K, V, dtype, scale, with_state, final, seed):
    rng = np.random.default_rng(seed)
    q, k = randn(rng, B, T, H, K, dtype=dtype), randn(rng, B, T, H, K, dtype=dtype)
    v = randn(rng, B, T, H, V, dtype=dtype)
    s0 = randn(rng, B, H, K, V) if with_state else None
    o, s = ops.linear_attention(q, k, v, scale=scale, initial_state=s0, output_final_state=final)
    ref_o, ref_s = reference.linear_attention(q, k, v, scale=scale, initial_state=s0, output_final_state=True)
    mag_o, mag_s = reference.linear_attention(q.abs(), k.abs(), v.abs(), scale=scale,
                                              initial_state=None if s0 is None else s0.abs(), output_final_state=True)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    check(o, ref_o, dtype, mag_o)
    if not final:
        assert s is None
        return
    assert s.dtype == torch.float32 and s.shape == (B, H, K, V)
    check(s, ref_s, dtype, mag_s)


def ssd_inputs(rng, B, T, H, G, N, P, dtype, log_decay_range, with_D, with_state, param_dtype=torch.float32):
    """dt·A spans ``log_decay_range`` per step: from near 1 (≈ -1e-3) to strong (≈ -20).
    dt, A and D are ``param_dtype`` (float32 or x's dtype)."""
    lo, hi = log_decay_range
    A = -torch.from_numpy(np.exp(rng.uniform(np.log(lo), np.log(hi), H)).astype(np.float32)).to(param_dtype)
    dt = torch.from_numpy(rng.uniform(0.5, 1.0, (B, T, H)).astype(np.float32)).to(param_dtype)
    return dict(x=randn(rng, B, T, H, P, dtype=dtype), dt=dt, A=A, B=randn(rng, B, T, G, N, dtype=dtype),
                C=randn(rng, B, T, G, N, dtype=dtype), D=randn(rng, H, dtype=param_dtype) if with_D else None,
                initial_state=randn(rng, B, H, N, P) if with_state else None)


@given(B=st.integers(1, 2), T=seq_len, H_G=st.sampled_from([(1, 1), (2, 1), (2, 2), (3, 1), (4, 2)]),
       N=head_dim, P=head_dim, dtype=dtype, decay=st.sampled_from([(1e-3, 1e-2), (0.05, 1.0), (1.0, 20.0)]),
       with_D=st.booleans(), with_state=st.booleans(), final=st.booleans(), params_f32=st.booleans(), seed=seed)
@example(B=1, T=1, H_G=(1, 1), N=16, P=16, dtype=torch.float32, decay=(1e-3, 1e-2), with_D=False,
         with_state=False, final=True, params_f32=True, seed=0)
@example(B=2, T=130, H_G=(4, 2), N=64, P=32, dtype=torch.float32, decay=(1.0, 20.0), with_D=True,
         with_state=True, final=True, params_f32=True, seed=1)
@example(B=1, T=64, H_G=(2, 1), N=128, P=128, dtype=torch.bfloat16, decay=(0.05, 1.0), with_D=True,
         with_state=True, final=True, params_f32=False, seed=2)
@example(B=1, T=300, H_G=(3, 1), N=32, P=48, dtype=torch.float16, decay=(1e-3, 1e-2), with_D=False,
         with_state=True, final=True, params_f32=True, seed=3)
@example(B=2, T=63, H_G=(3, 3), N=96, P=16, dtype=torch.float16, decay=(1.0, 20.0), with_D=True,
         with_state=False, final=True, params_f32=False, seed=4)
@example(B=1, T=65, H_G=(2, 1), N=48, P=64, dtype=torch.float32, decay=(0.05, 1.0), with_D=True,
         with_state=True, final=False, params_f32=True, seed=5)
@example(B=1, T=129, H_G=(4, 2), N=16, P=96, dtype=torch.bfloat16, decay=(1e-3, 1e-2), with_D=True,
         with_state=True, final=True, params_f32=True, seed=6)
def test_ssd(B, T, H_G, N, P, dtype, decay, with_D, with_state, final, params_f32, seed):
    H, G = H_G
    rng = np.random.default_rng(seed)
    args = ssd_inputs(rng, B, T, H, G, N, P, dtype, decay, with_D, with_state,
                      torch.float32 if params_f32 else dtype)
    y, h = ops.ssd(**args, output_final_state=final)
    ref_y, ref_h = reference.ssd(**args, output_final_state=True)
    absolute = {k: (v.abs() if isinstance(v, torch.Tensor) and k not in ("dt", "A") else v) for k, v in args.items()}
    mag_y, mag_h = reference.ssd(**absolute, output_final_state=True)
    assert y.dtype == dtype and y.shape == (B, T, H, P)
    check(y, ref_y, dtype, mag_y)
    if not final:
        assert h is None
        return
    assert h.dtype == torch.float32 and h.shape == (B, H, N, P)
    check(h, ref_h, dtype, mag_h)


# -- carried state: T1 then T2 equals T1 + T2 (fp32) ----------------------------------------
@given(T1=st.integers(1, 150), T2=st.integers(1, 150), H=st.integers(1, 2), K=head_dim, V=head_dim,
       with_state=st.booleans(), seed=seed)
@example(T1=64, T2=64, H=2, K=32, V=32, with_state=False, seed=0)
@example(T1=1, T2=100, H=1, K=16, V=128, with_state=True, seed=1)
@example(T1=63, T2=66, H=2, K=128, V=16, with_state=True, seed=2)
def test_linear_attention_state_round_trip(T1, T2, H, K, V, with_state, seed):
    rng = np.random.default_rng(seed)
    q, k = randn(rng, 1, T1 + T2, H, K), randn(rng, 1, T1 + T2, H, K)
    v = randn(rng, 1, T1 + T2, H, V)
    s0 = randn(rng, 1, H, K, V) if with_state else None
    whole, s_whole = ops.linear_attention(q, k, v, initial_state=s0, output_final_state=True)
    first, s1 = ops.linear_attention(q[:, :T1], k[:, :T1], v[:, :T1], initial_state=s0, output_final_state=True)
    second, s2 = ops.linear_attention(q[:, T1:], k[:, T1:], v[:, T1:], initial_state=s1, output_final_state=True)
    assert rel_err(torch.cat([first, second], dim=1), whole.double().numpy()) <= 1e-5
    assert rel_err(s2, s_whole.double().numpy()) <= 1e-5


@given(T1=st.integers(1, 150), T2=st.integers(1, 150), H_G=st.sampled_from([(1, 1), (2, 1), (3, 3)]), N=head_dim,
       P=head_dim, decay=st.sampled_from([(1e-3, 1e-2), (0.05, 1.0), (1.0, 20.0)]), with_D=st.booleans(),
       with_state=st.booleans(), seed=seed)
@example(T1=64, T2=64, H_G=(2, 1), N=32, P=16, decay=(0.05, 1.0), with_D=True, with_state=False, seed=0)
@example(T1=1, T2=129, H_G=(1, 1), N=128, P=16, decay=(1e-3, 1e-2), with_D=False, with_state=True, seed=1)
@example(T1=65, T2=63, H_G=(3, 3), N=16, P=96, decay=(1.0, 20.0), with_D=True, with_state=True, seed=2)
def test_ssd_state_round_trip(T1, T2, H_G, N, P, decay, with_D, with_state, seed):
    H, G = H_G
    rng = np.random.default_rng(seed)
    args = ssd_inputs(rng, 1, T1 + T2, H, G, N, P, torch.float32, decay, with_D, with_state)
    whole, h_whole = ops.ssd(**args, output_final_state=True)

    def part(sl, state):
        return ops.ssd(**{k: (v[:, sl] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()
                          if k != "initial_state"}, initial_state=state, output_final_state=True)

    first, h1 = part(slice(0, T1), args["initial_state"])
    second, h2 = part(slice(T1, None), h1)
    assert rel_err(torch.cat([first, second], dim=1), whole.double().numpy()) <= 1e-5
    assert rel_err(h2, h_whole.double().numpy()) <= 1e-5


# -- edges --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("with_state", [True, False])
def test_empty_sequence_keeps_the_state(dtype, with_state):
    rng = np.random.default_rng(0)
    q, v = randn(rng, 2, 0, 3, 16, dtype=dtype), randn(rng, 2, 0, 3, 32, dtype=dtype)
    s0 = randn(rng, 2, 3, 16, 32) if with_state else None
    o, s = ops.linear_attention(q, q, v, initial_state=s0, output_final_state=True)
    assert o.shape == (2, 0, 3, 32) and o.dtype == dtype and s.dtype == torch.float32
    assert torch.equal(s, s0 if with_state else torch.zeros(2, 3, 16, 32))
    args = ssd_inputs(rng, 2, 0, 4, 2, 16, 48, dtype, (0.1, 1.0), True, with_state)
    y, h = ops.ssd(**args, output_final_state=True)
    assert y.shape == (2, 0, 4, 48) and y.dtype == dtype and h.dtype == torch.float32
    assert torch.equal(h, args["initial_state"] if with_state else torch.zeros(2, 4, 16, 48))


def test_final_state_only_when_asked():
    rng = np.random.default_rng(0)
    q = randn(rng, 1, 10, 1, 16)
    assert ops.linear_attention(q, q, q)[1] is None
    args = ssd_inputs(rng, 1, 10, 2, 1, 16, 16, torch.float32, (0.1, 1.0), True, True)
    assert ops.ssd(**args)[1] is None


def test_bad_arguments_name_what_was_expected():
    rng = np.random.default_rng(0)
    q, k = randn(rng, 1, 10, 2, 32), randn(rng, 1, 10, 2, 16)
    with pytest.raises(ValueError, match=r"k: expected shape \[B, T, H, K\]"):
        ops.linear_attention(q, k, q)
    with pytest.raises(TypeError, match="initial_state: the state is float32"):
        ops.linear_attention(q, q, q, initial_state=torch.zeros(1, 2, 32, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="initial_state: expected shape"):
        ops.linear_attention(q, q, q, initial_state=torch.zeros(1, 2, 32, 16))
    with pytest.raises(TypeError, match="k: dtype bf16 differs from q's f32"):
        ops.linear_attention(q, q.to(torch.bfloat16), q)
    with pytest.raises(ValueError, match="groups must divide the 3 heads"):
        args = ssd_inputs(rng, 1, 10, 3, 2, 16, 16, torch.float32, (0.1, 1.0), False, False)
        ops.ssd(**args)
