"""Extreme but valid input: decays at the edges of their range, and inf/NaN in an input token.

The chunked algorithms multiply masked-out (zero) weights by every value of a chunk, so a NaN or
inf in token t may poison outputs from the start of t's 64-token chunk on, though causally only
outputs from t on depend on it (the naive reference, a full product then a mask, even poisons all
of them). What is guaranteed (README, "Guarantees"): every output at or after t that the reference
makes non-finite is non-finite here too, outputs of earlier chunks stay finite, nothing hangs. On CPU these run
through the interpreter; with ``-m gpu`` through the generated kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilemix import ops, reference
from tilemix.reference.tolerance import MAX_CONDITION, bound, rel_err

CHUNK = 64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("log_decay", [-1e-6, -1e-3, -1.0, -50.0])
def test_ssd_decay_edges(device, log_decay):
    """dt·A from -1e-6 (a state that barely decays over 300 tokens) to -50 (one that forgets at
    once: exp(-50) ~ 2e-22)."""
    g = torch.Generator().manual_seed(0)
    B, T, H, N = 1, 300, 2, 64
    dtype = _dtype(device)
    x, Bm, Cm = (torch.randn(B, T, *s, generator=g).to(dtype) for s in ((H, N), (1, N), (1, N)))
    dt = torch.ones(B, T, H)
    A = torch.full((H,), log_decay)
    s0 = torch.randn(B, H, N, N, generator=g)
    y, s = ops.ssd(x.to(device), dt.to(device), A.to(device), Bm.to(device), Cm.to(device),
                   initial_state=s0.to(device), output_final_state=True)
    ref_y, ref_s = reference.ssd(x, dt, A, Bm, Cm, initial_state=s0, output_final_state=True)
    mag_y, mag_s = reference.ssd(x.abs(), dt, A, Bm.abs(), Cm.abs(), initial_state=s0.abs(), output_final_state=True)
    condition = MAX_CONDITION[str(dtype).replace("torch.", "")]
    assert rel_err(y.cpu(), ref_y, mag_y, condition) <= bound(dtype)
    assert rel_err(s.cpu(), ref_s, mag_s, condition) <= bound(dtype)


def _poisoned(op, device, arg, value, t):
    g = torch.Generator().manual_seed(1)
    B, T, H, D = 1, 200, 2, 64
    args = {n: torch.randn(B, T, H, D, generator=g).to(_dtype(device)) for n in ("q", "k", "v")}
    args[arg][0, t, 1, 3] = value
    run = (lambda a: ops.linear_attention(**a)[0]) if op == "linear_attention" else \
        (lambda a: ops.attention(**a, causal=True))
    out = run({n: a.to(device) for n, a in args.items()}).float().cpu().numpy()
    ref = (reference.linear_attention(**args)[0] if op == "linear_attention"
           else reference.attention(**args, causal=True))
    return out, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["linear_attention", "attention"])
@pytest.mark.parametrize("arg", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_propagates(device, op, arg, value):
    t = 150  # inside the third 64-token chunk
    out, ref = _poisoned(op, device, arg, value, t)
    depends = ~np.isfinite(ref[:, t:])
    assert not np.isfinite(out[:, t:][depends]).any(), "an output the poisoned token reaches came out finite"
    chunk_start = t // CHUNK * CHUNK
    assert np.isfinite(out[:, :chunk_start]).all(), "a chunk before the poisoned token was poisoned"


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["linear_attention", "ssd"])
def test_gpu_million_tokens(op):
    """T = 1,000,000 (B=1, H=4, D=64): no 32-bit index overflow, no state drift beyond bf16 bounds
    against the float64 token-by-token reference (~1 min of reference on the host)."""
    g = torch.Generator().manual_seed(2)
    B, T, H, D = 1, 1_000_000, 4, 64
    x = (torch.randn(B, T, H, D, generator=g) * 0.1).to(torch.bfloat16)
    if op == "linear_attention":
        args = dict(q=x, k=(torch.randn(B, T, H, D, generator=g) * 0.1).to(torch.bfloat16),
                    v=torch.randn(B, T, H, D, generator=g).to(torch.bfloat16))
    else:
        args = dict(x=x, dt=torch.rand(B, T, H, generator=g) * 0.1, A=-torch.rand(H, generator=g) - 0.01,
                    B=torch.randn(B, T, 1, D, generator=g).to(torch.bfloat16),
                    C=torch.randn(B, T, 1, D, generator=g).to(torch.bfloat16))
    out, state = getattr(ops, op)(**{n: a.cuda() for n, a in args.items()}, output_final_state=True)
    ref, ref_state = getattr(reference, op)(**args, output_final_state=True)
    assert rel_err(out.cpu(), ref) <= bound(torch.bfloat16)
    assert rel_err(state.cpu(), ref_state) <= bound(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["linear_attention", "ssd", "attention", "gemm"])
def test_gpu_empty_inputs(op):
    """T = 0 (M = 0 for gemm): empty outputs, the initial state as the final state, no launch."""
    s0 = torch.randn(2, 3, 64, 64, device="cuda")
    x = torch.zeros(2, 0, 3, 64, device="cuda", dtype=torch.bfloat16)
    if op == "gemm":
        assert ops.gemm(x[0, :, 0], torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16)).shape == (0, 64)
    elif op == "attention":
        assert ops.attention(x, x, x).shape == x.shape
    elif op == "linear_attention":
        out, state = ops.linear_attention(x, x, x, initial_state=s0, output_final_state=True)
        assert out.shape == x.shape and torch.equal(state, s0)
    else:
        bm = torch.zeros(2, 0, 1, 64, device="cuda", dtype=torch.bfloat16)
        out, state = ops.ssd(x, torch.zeros(2, 0, 3, device="cuda"), -torch.ones(3, device="cuda"), bm, bm,
                             initial_state=s0, output_final_state=True)
        assert out.shape == x.shape and torch.equal(state, s0)


@pytest.mark.parametrize("empty", ["B", "H", "K"])
def test_empty_batch_heads_or_head_dim(empty):
    """B = 0 or H = 0 (no program instance) and a zero head dim K are valid: outputs of the right
    (empty or zero) shape, no crash; with K = 0 every score is 0 and the default scale is moot."""
    B, H, K = {"B": (0, 2, 16), "H": (1, 0, 16), "K": (1, 2, 0)}[empty]
    q, v = torch.randn(B, 5, H, K), torch.randn(B, 5, H, 16)
    o, state = ops.linear_attention(q, q, v, initial_state=torch.randn(B, H, K, 16), output_final_state=True)
    assert o.shape == v.shape and state.shape == (B, H, K, 16) and not o.abs().sum()
    out = ops.attention(q, q, v, causal=True)
    expected = v.cumsum(1) / torch.arange(1, 6).view(1, 5, 1, 1)  # equal scores: running means of v
    torch.testing.assert_close(out, expected if empty == "K" else torch.empty_like(v), atol=1e-5, rtol=1e-5)
    y, h = ops.ssd(v, torch.rand(B, 5, H), -torch.rand(H), torch.randn(B, 5, 1, 16), torch.randn(B, 5, 1, 16),
                   output_final_state=True)
    assert y.shape == v.shape and h.shape == (B, H, 16, 16)


@pytest.mark.parametrize("K, V", [(24, 40), (8, 8), (1, 3), (100, 72)])
def test_cpu_runs_any_head_dim(K, V):
    """CPU tensors run the interpreter at any head dim (the 16-wide tile rule is the tensor-core targets'):
    every op matches its float64 reference."""
    g = torch.Generator().manual_seed(K * 1000 + V)
    q, k, v = torch.randn(2, 150, 3, K, generator=g), torch.randn(2, 150, 3, K, generator=g), \
        torch.randn(2, 150, 3, V, generator=g)
    for causal in (False, True):
        got = ops.attention(q, k, v, causal=causal)
        assert rel_err(got, reference.attention(q, k, v, causal=causal)) <= bound(torch.float32)
    s0 = torch.randn(2, 3, K, V, generator=g)
    got = ops.linear_attention(q, k, v, initial_state=s0, output_final_state=True)
    for a, b in zip(got, reference.linear_attention(q, k, v, initial_state=s0, output_final_state=True)):
        assert rel_err(a, b) <= bound(torch.float32)
    dt, A, D = torch.rand(2, 150, 3, generator=g), -torch.rand(3, generator=g), torch.randn(3, generator=g)
    got = ops.ssd(v, dt, A, k[:, :, :1], q[:, :, :1], D=D, initial_state=s0, output_final_state=True)
    expected = reference.ssd(v, dt, A, k[:, :, :1], q[:, :, :1], D=D, initial_state=s0, output_final_state=True)
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= bound(torch.float32)
    a, b = torch.randn(70, K, generator=g), torch.randn(K, V, generator=g)
    assert rel_err(ops.gemm(a, b), reference.gemm(a, b)) <= bound(torch.float32)


def test_value_head_dim_zero():
    """A value (or state) head dim of 0 is valid: empty outputs of the right shape, no crash."""
    q, v = torch.randn(2, 70, 3, 16), torch.randn(2, 70, 3, 0)
    for causal in (False, True):
        assert ops.attention(q, q, v, causal=causal).shape == v.shape
        assert ops.attention(v, v, v, causal=causal).shape == v.shape
    o, state = ops.linear_attention(q, q, v, initial_state=torch.randn(2, 3, 16, 0), output_final_state=True)
    assert o.shape == v.shape and state.shape == (2, 3, 16, 0)
    y, h = ops.ssd(v, torch.rand(2, 70, 3), -torch.rand(3), q[:, :, :1], q[:, :, :1], output_final_state=True)
    assert y.shape == v.shape and h.shape == (2, 3, 16, 0)
