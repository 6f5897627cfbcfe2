"""mlstm (ops/mlstm.py): against the float64 token loop of the stabilised recurrence
(reference/mlstm.py), gate pre-activations up to where exp overflows float64 (the stabiliser is all
that keeps the loop finite), state round trips, float64 gradients through the derived backward
(through the running max: its subgradient's share cancels, ties included), argument errors, the layer,
and GPU runs in bf16 against float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix.ops import MLSTMLayer, mlstm
from tilemix.reference import mlstm as reference
from tilemix.reference.tolerance import bound, rel_err


def _inputs(B=1, T=70, H=2, K=16, V=16, seed=0, gate_scale=1.0, forget_bias=2.0, dtype=torch.float64):
    """q, k, v, i, f: keys and queries of unit norm or so, input gates ``gate_scale · N(0, 1)``,
    forget gates ``forget_bias + gate_scale · N(0, 1)`` (pre-activations)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(B, T, H, K) * K ** -0.25, rnd(B, T, H, K) * K ** -0.25, rnd(B, T, H, V)
    i, f = gate_scale * rnd(B, T, H), forget_bias + gate_scale * rnd(B, T, H)
    return [t.to(dtype) for t in (q, k, v, i, f)]


def _state(B=1, H=2, K=16, V=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(B, H, K, V, generator=gen, dtype=dtype), torch.randn(B, H, K, generator=gen, dtype=dtype),
            torch.randn(B, H, generator=gen, dtype=dtype))


def _close(got, want, tol):
    h, state = got
    want_h, want_state = want
    assert rel_err(h, want_h) <= tol
    for name, a, b in zip("Cnm", state, want_state):
        assert rel_err(a, b) <= tol, name


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 300), H=st.integers(1, 2), K=st.sampled_from([16, 32, 64, 128]), V=st.sampled_from([16, 64]),
       with_state=st.booleans(), seed=st.integers(0, 2 ** 16), gate_scale=st.sampled_from([0.1, 1.0, 10.0, 200.0]),
       forget_bias=st.sampled_from([-5.0, 0.0, 5.0]))
def test_matches_float64_token_loop(T, H, K, V, with_state, seed, gate_scale, forget_bias):
    """float64 against float64: gates from near-constant to N(0, 200²) (exp(i) overflows float64 past
    709: only the stabilised forms stay finite), forget gates from log σ ≈ -5 to ≈ 0 per step."""
    args = _inputs(1, T, H, K, V, seed, gate_scale, forget_bias)
    state = _state(1, H, K, V, seed) if with_state else None
    got = mlstm(*args, scale=0.3, initial_state=state, output_final_state=True)
    want = reference(*args, scale=0.3, initial_state=state, output_final_state=True)
    _close(got, want, 1e-10)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("gate_scale", [1.0, 30.0])
def test_float32_within_its_bound(T, gate_scale):
    """fp32 inputs (input gates to about ±90: exp(i) alone would overflow fp32) against the float64
    loop on the same values: within the fp32 bound, or within 4x of how far the float64 results move
    when every input moves by one fp32 rounding, where that is more (no fp32 computation can promise
    better: at T = 63 with large gates the loop's h moves 3e-5, and the fp32 error follows the CPU's
    BLAS summation order)."""
    args = _inputs(2, T, 2, 64, 64, seed=T, gate_scale=gate_scale, dtype=torch.float32)
    state = tuple(s.float() for s in _state(2, 2, 64, 64, seed=T))
    h, final = mlstm(*args, initial_state=state, output_final_state=True)
    want, moved = (_flat(reference(*inputs, initial_state=start, output_final_state=True))
                   for inputs, start in ((args, state), _one_rounding_apart(args, state)))
    for name, got, exact, nudged in zip(("h", "C", "n", "m"), (h, *final), want, moved):
        assert rel_err(got, exact) <= max(bound(torch.float32), 4 * rel_err(nudged, exact)), name


def _one_rounding_apart(args, state):
    """``args`` and ``state`` in float64, each element moved by about one fp32 rounding (2^-24)."""
    g = torch.Generator().manual_seed(1)

    def nudged(t):
        return t.double() * (1 + 2.0 ** -24 * torch.randn(t.shape, generator=g, dtype=torch.float64))
    return [nudged(t) for t in args], tuple(nudged(t) for t in state)


def _flat(result):
    h, state = result
    return (h, *state)


def test_no_initial_state_is_the_zero_state():
    args = _inputs(T=100, seed=4)
    zero = tuple(torch.zeros_like(s) for s in _state())
    h, state = mlstm(*args, output_final_state=True)
    h0, state0 = mlstm(*args, initial_state=zero, output_final_state=True)
    assert torch.equal(h, h0) and all(torch.equal(a, b) for a, b in zip(state, state0))


def test_two_halves_with_the_state_passed_make_the_whole():
    args = _inputs(2, 150, 2, 32, 16, seed=3, gate_scale=5.0)
    whole, whole_state = mlstm(*args, output_final_state=True)
    first, state = mlstm(*(a[:, :70] for a in args), output_final_state=True)
    second, end = mlstm(*(a[:, 70:] for a in args), initial_state=state, output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(end, whole_state):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_default_scale_is_k_to_the_minus_half():
    args = _inputs(T=10, K=16)
    assert torch.equal(mlstm(*args)[0], mlstm(*args, scale=0.25)[0])
    assert mlstm(*args)[1] is None


def _gradcheck(args, state=None, final=True):
    leaves = [a.clone().requires_grad_() for a in (*args, *(state or ()))]

    def fn(*xs):
        h, end = mlstm(*xs[:5], initial_state=tuple(xs[5:]) or None, output_final_state=final)
        return (h, *end) if final else h

    return torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("gate_scale", [1.0, 20.0])
def test_float64_gradients(gate_scale):
    """The derived backward of every input and the initial state, through h and the final (C, n, m);
    70 tokens cross a chunk boundary into a partial chunk."""
    assert _gradcheck(_inputs(T=70, seed=5, gate_scale=gate_scale), _state(seed=5))


def test_float64_gradients_at_ties_of_the_running_max():
    """f = 0 and i_t = t · log σ(0): every token's log weight in every later memory is the same, so
    the running max ties everywhere. h does not depend on the max, and its gradient (the max's
    subgradient split among the ties) is still the true one."""
    q, k, v, _, _ = _inputs(T=70, seed=6)
    f = torch.zeros(1, 70, 2, dtype=torch.float64)
    i = (-math.log(2.0) * torch.arange(70, dtype=torch.float64))[None, :, None].expand(1, 70, 2).contiguous()
    assert _gradcheck([q, k, v, i, f], final=False)


def test_argument_errors_name_the_argument():
    q, k, v, i, f = _inputs(T=10)
    state = _state()
    with pytest.raises(TypeError, match="^k:"):
        mlstm(q, k.numpy(), v, i, f)
    with pytest.raises(ValueError, match="^q:"):
        mlstm(q[0], k, v, i, f)
    with pytest.raises(ValueError, match="^i:"):
        mlstm(q, k, v, i[..., :1], f)
    with pytest.raises(ValueError, match="^f:"):
        mlstm(q, k, v, i, f[:, :5])
    with pytest.raises(TypeError, match="output_final_state"):
        mlstm(q, k, v, i, f, output_final_state="yes")
    with pytest.raises(TypeError, match="scale"):
        mlstm(q, k, v, i, f, scale="0.5")
    with pytest.raises(TypeError, match=r"^initial_state:"):
        mlstm(q, k, v, i, f, initial_state=state[0])
    with pytest.raises(ValueError, match=r"^initial_state\[1\]:"):
        mlstm(q, k, v, i, f, initial_state=(state[0], state[1][..., :8], state[2]))
    with pytest.raises(TypeError, match=r"^initial_state\[2\]:"):
        mlstm(q, k, v, i, f, initial_state=(state[0], state[1], 0.0))


def test_opcheck_with_gradients():
    """torch.library's checks (schema, fake tensors, AOT dispatch) with inputs that require grad."""
    args = [a.requires_grad_() for a in _inputs(T=70, seed=7, dtype=torch.float32)]
    C, n, m = (s.float().requires_grad_() for s in _state(seed=7))
    torch.library.opcheck(torch.ops.tilemix.mlstm.default, (*args, 0.25, C, n[..., None], m[..., None, None], True))


def test_layer_trains_and_continues_from_its_state():
    torch.manual_seed(0)
    layer = MLSTMLayer(dim=64, heads=2)
    x = torch.randn(1, 90, 64)
    y, _ = layer(x, output_final_state=True)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    with torch.no_grad():
        y1, state = layer(x[:, :40], output_final_state=True)
        y2 = layer(x[:, 40:], initial_state=state)
    assert rel_err(torch.cat([y1, y2], 1), y.detach().double().numpy()) <= bound(torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 100, 300])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_bf16_forward_and_backward_against_float64(T, D):
    """bf16 q, k, v (float32 gates and state; initial state and final-state gradients given) on the
    GPU: h, the final state and every gradient within the bf16 bound of the float64 program on the
    same rounded values (itself checked against the token loop above). At D > 64 the backward runs
    in column blocks of V that each recompute n and m."""
    inputs = [*_inputs(2, T, 3, D, D, seed=T + D, gate_scale=3.0), *_state(2, 3, D, D, seed=T)]
    low = [t.to("cuda", torch.bfloat16 if t.dim() == 4 and j < 3 else torch.float32).requires_grad_()
           for j, t in enumerate(inputs)]
    exact = [t.detach().cpu().double().requires_grad_() for t in low]
    results = []
    for args in (exact, low):
        h, state = mlstm(*args[:5], initial_state=tuple(args[5:]), output_final_state=True)
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device) for t in (h, *state)]
        sum((t.double() * w).sum() for t, w in zip((h, *state), weights)).backward()
        results.append({"h": h, **dict(zip("Cnm", state)), **{f"d{n}": t.grad for n, t in zip("qkvifCnm", args)}})
    for name, want in results[0].items():
        assert rel_err(results[1][name].double().cpu(), want.detach().numpy()) <= bound(torch.bfloat16), name


@pytest.mark.gpu
def test_gpu_bf16_matches_the_token_loop_with_large_gates():
    """The GPU kernels take bf16 q, k, v (float32 gates): the token loop runs on the same rounded values."""
    inputs = _inputs(2, 300, 4, 128, 128, seed=9, gate_scale=30.0, dtype=torch.float32)
    args = [t.to("cuda", torch.bfloat16 if j < 3 else torch.float32) for j, t in enumerate(inputs)]
    h, state = mlstm(*args, output_final_state=True)
    want_h, want_state = reference(*[t.cpu().double() for t in args], output_final_state=True)
    assert rel_err(h.float().cpu(), want_h) <= bound(torch.bfloat16)
    for name, a, b in zip("Cnm", state, want_state):
        assert np.isfinite(a.cpu().numpy()).all() and rel_err(a.cpu(), b) <= bound(torch.bfloat16), name


def test_column_blocks_of_the_derived_backward_count_each_state_gradient_once(monkeypatch):
    """On CUDA the derived backward runs in 64-wide blocks of V, summing the blocks' gradients; n and
    m have no V, so every block recomputes them and only one may take their final gradients. Here
    each block's kernels are the interpreter's, to check the split on the CPU."""
    from tilemix.ops import derived_cuda
    from tilemix.ops.derived import derived_gradients
    from tilemix.ops.mlstm import mlstm_fwd

    def interpreted_block(kernel, args, grads, wrt, arch, device, transpose=False, into=None):
        got = derived_gradients(kernel, args, grads, wrt)
        for name, columns in (into or {}).items():  # a Seq input's block, written in place
            columns.copy_(got.pop(name))
        return got

    monkeypatch.setattr(derived_cuda, "_block_gradients", interpreted_block)
    q, k, v, i, f = _inputs(T=70, V=128, seed=8, gate_scale=3.0)
    C, n, m = _state(V=128, seed=8)
    args = dict(q=q, k=k, v=v, i=i, f=f, scale=0.25, C=C, n=n[..., None], m=m[..., None, None])
    grads = {"h": torch.randn_like(v), "C": torch.randn_like(C), "n": torch.randn_like(n)[..., None],
             "m": torch.randn_like(m)[..., None, None]}
    wrt = ["q", "k", "v", "i", "f", "C", "n", "m"]
    split = derived_cuda.derived_gradients_cuda(mlstm_fwd, args, grads, wrt, arch="sm_90a")
    whole = derived_gradients(mlstm_fwd, args, grads, wrt)
    for name in wrt:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["mlstm", "mlstm-bwd", "mlstm-d256", "mlstm-bwd-d256"])
def test_bench_rows_run_and_count_their_bytes(name):
    """Each row's timed call runs on the interpreter at a small shape; its bytes are the op's inputs
    and outputs (bf16 sequences, float32 gates), backward rows say the derived backward, and the
    -d256 rows run at 8 heads of 256 by default."""
    from tilemix.bench import bench

    B, T, H, D = 1, 70, 2, 16
    ours, peer, peer_name, nbytes, flops, shape = bench.CASES[name](B, T, H, D, torch.bfloat16, device="cpu")
    out = ours()
    if bench.direction(name) == "bwd":
        assert len(out) == 5 and all(g.float().isfinite().all() for g in out)
        assert bench._backward_field(name) == {"backward": "derived"}
        assert nbytes == B * T * H * (7 * D * 2 + 4 * 4)
    else:
        assert out.shape == (B, T, H, D) and out.float().isfinite().all()
        assert nbytes == B * T * H * (4 * D * 2 + 2 * 4)
    assert peer is None and peer_name == "-" and flops > 0 and shape == dict(B=B, T=T, H=H, K=D, V=D)
    wide = (8, 4096, 8, 256) if name.endswith("d256") else bench.SHAPE
    assert bench.default_rows([name]) == [(name, *wide)]
