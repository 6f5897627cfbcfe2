"""retention, gla and rwkv6 (ops/gated.py): against the float64 token loops (reference/mixers.py), state
round trips, float64 gradients through the derived backward, argument errors, and the programs the
GPU runs compiled for sm_90a and sm_80."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix import ops
from tilemix import reference as ref
from tilemix.reference.tolerance import bound, rel_err

OPS = {"retention": ops.retention, "gla": ops.gla, "rwkv6": ops.rwkv6}
DECAYED = ("gla", "rwkv6")  # a log decay per token and key dim


def _inputs(op: str, B=1, T=70, H=2, K=16, V=16, seed=0, max_decay=1.0, dtype=torch.float32) -> dict:
    """q, k, v with rows of about unit norm over K (rwkv6: r for q, and a bonus u), and for the decayed
    ops their log gates (g, w) uniform in [-max_decay, 0] per step."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    args = dict(q=rnd(B, T, H, K) * K ** -0.5, k=rnd(B, T, H, K) * K ** -0.5, v=rnd(B, T, H, V))
    if op in DECAYED:
        args["g" if op == "gla" else "w"] = -max_decay * torch.rand(B, T, H, K, generator=gen, dtype=dtype)
    if op == "rwkv6":
        args = dict(r=args.pop("q"), **args, u=rnd(H, K))
    return args


def _check_against_reference(op: str, args: dict, state: torch.Tensor | None):
    o, final = OPS[op](**args, initial_state=state, output_final_state=True)
    o_ref, final_ref = getattr(ref, op)(**args, initial_state=state, output_final_state=True)
    assert rel_err(o, o_ref) <= bound(torch.float32)
    assert rel_err(final, final_ref) <= bound(torch.float32)


@settings(max_examples=8, deadline=None)
@given(op=st.sampled_from(list(OPS)), T=st.integers(1, 300), K=st.sampled_from([16, 32, 64, 128]),
       V=st.sampled_from([16, 64, 128]), with_state=st.booleans(), seed=st.integers(0, 2 ** 16),
       max_decay=st.sampled_from([1e-3, 0.1, 1.0]))
def test_matches_float64_token_loop(op, T, K, V, with_state, seed, max_decay):
    """Gates (gla, rwkv6) per step down to -1: a 64-token chunk's cumulative log decay stays above -64."""
    args = _inputs(op, T=T, K=K, V=V, seed=seed, max_decay=max_decay)
    state = torch.randn(1, 2, K, V, generator=torch.Generator().manual_seed(seed)) if with_state else None
    _check_against_reference(op, args, state)


@pytest.mark.parametrize("op", DECAYED)
@pytest.mark.parametrize("max_decay", [2.0, 1.3])
def test_within_fp32_exponent_range(op, max_decay):
    """Gates uniform in [-2, 0] per step: a chunk's cumulative log decay reaches about -64, exp(-b)
    about 6e27, still exact."""
    _check_against_reference(op, _inputs(op, T=200, K=64, V=64, max_decay=max_decay), None)


@pytest.mark.parametrize("op", DECAYED)
@pytest.mark.parametrize("max_decay", [5.0, 20.0])
def test_strong_decay(op, max_decay):
    """Gates uniform in [-20, 0] per step: a chunk's cumulative log decay reaches about -640, past
    the fast form's range, so the op takes the exact form (measured before it: [-2.5, 0] gave 896
    of 16384 outputs non-finite, [-20, 0] 15040)."""
    _check_against_reference(op, _inputs(op, T=128, K=64, V=64, max_decay=max_decay), None)


@pytest.mark.parametrize("seed", [0, 1])
def test_rwkv6_stress_decays(seed):
    """Issue 27's bar: RWKV-6 with log decays -exp(U(-1, 2)) per step and key dim, a state given."""
    args = _inputs("rwkv6", T=300, K=64, V=64, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    args["w"] = -torch.exp(torch.empty_like(args["w"]).uniform_(-1.0, 2.0, generator=gen))
    _check_against_reference("rwkv6", args, torch.randn(1, 2, 64, 64, generator=gen))


@pytest.mark.parametrize("op", DECAYED)
@pytest.mark.parametrize("max_decay", [1e-3, 1.0, 20.0])
def test_exact_form_matches_float64_token_loop(op, max_decay):
    """The exact programs alone, from weak to strong decays, over a partial last chunk."""
    args = _inputs(op, T=150, K=32, V=16, seed=7, max_decay=max_decay)
    state = torch.randn(1, 2, 32, 16, generator=torch.Generator().manual_seed(7))
    exact = ops.gated.gla_exact_mixer if op == "gla" else ops.gated.rwkv6_exact_mixer
    o, final = exact(**args, scale=32 ** -0.5, s=state)
    o_ref, final_ref = getattr(ref, op)(**args, initial_state=state, output_final_state=True)
    assert rel_err(o, o_ref) <= bound(torch.float32)
    assert rel_err(final, final_ref) <= bound(torch.float32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("op, name", [("gla", "g"), ("rwkv6", "w")])
def test_form_follows_the_chunk_decay(op, name, device, monkeypatch):
    """The fast form while two adjacent chunks' log decay stays within half the compute dtype's
    exponent range (fp32, bf16: about -44), the exact form past it, wherever in the sequence; on
    the GPU the check's flag reaches the host through pinned memory after the fast launch."""
    taken = []
    for form in ("", "_exact"):
        mixer = getattr(ops.gated, f"{op}{form}_mixer")
        monkeypatch.setattr(ops.gated, f"{op}{form}_mixer",
                            lambda *a, _m=mixer, _f=form, **kw: taken.append(_f) or _m(*a, **kw))
    width, dtype = (16, torch.float32) if device == "cpu" else (64, torch.bfloat16)
    args = _inputs(op, T=200, K=width, V=width, max_decay=0.3)  # about -10 per chunk
    args = {n: t.to(device, dtype if n != "u" else torch.float32) for n, t in args.items()}
    assert torch.isfinite(OPS[op](**args)[0]).all()
    args[name][:, 150] = -30.0  # one token: two chunks' total passes -44
    assert torch.isfinite(OPS[op](**args)[0]).all()
    assert taken == ["", "", "_exact"]  # the fast form launched behind the check, then the exact one
    OPS[op](**args, exact=False)  # the caller's choice, the decays not read
    OPS[op](**_inputs(op, T=200, K=16, V=16, max_decay=0.3), exact=True)
    assert taken == ["", "", "_exact", "", "_exact"]
    with pytest.raises(TypeError, match="^exact: "):
        OPS[op](**args, exact="yes")


@pytest.mark.parametrize("op", DECAYED)
def test_strong_decay_within_a_short_sequence(op):
    """-20 per step holds while a chunk's cumulative decay stays in range (T = 4: above -80)."""
    _check_against_reference(op, _inputs(op, T=4, K=64, V=64, max_decay=20.0), None)


@pytest.mark.parametrize("op", list(OPS))
def test_two_halves_with_the_state_passed_make_the_whole(op):
    args = _inputs(op, T=150, K=32, V=32, seed=3)
    whole, whole_state = OPS[op](**args, output_final_state=True)
    first = {n: t if n == "u" else t[:, :70] for n, t in args.items()}
    second = {n: t if n == "u" else t[:, 70:] for n, t in args.items()}
    o1, s1 = OPS[op](**first, output_final_state=True)
    o2, s2 = OPS[op](**second, initial_state=s1, output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), whole.double().numpy()) <= bound(torch.float32)
    assert rel_err(s2, whole_state.double().numpy()) <= bound(torch.float32)


@pytest.mark.parametrize("op", list(OPS))
def test_float64_gradients(op):
    """The derived backward (inputs, initial state, output and final-state gradients) by gradcheck."""
    args = _inputs(op, T=70, K=16, V=16, seed=5, dtype=torch.float64)
    args["initial_state"] = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    names = list(args)
    leaves = [args[n].requires_grad_() for n in names]
    fn = lambda *xs: OPS[op](**dict(zip(names, xs)), output_final_state=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("op", DECAYED)
def test_exact_form_float64_gradients(op):
    """The backward derived from the exact programs, by gradcheck, gates to -2 per step (every decay
    factor within the chunk still weighs); fast mode: random projections of the Jacobian (the exact
    programs are six times the fast ones' length). tests/test_decayed_scores.py checks -20."""
    args = _inputs(op, T=70, K=16, V=16, seed=6, dtype=torch.float64, max_decay=2.0)
    args["s"] = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    exact = ops.gated.gla_exact_mixer if op == "gla" else ops.gated.rwkv6_exact_mixer
    names = list(args)
    leaves = [args[n].requires_grad_() for n in names]
    fn = lambda *xs: exact(**dict(zip(names, xs)), scale=0.25)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_retention_decays_each_head_by_its_gamma():
    gammas = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(4)])
    assert torch.allclose(ops.gated.retention_log_decay(4).exp(), gammas)


@pytest.mark.parametrize("op", list(OPS))
def test_default_scale_is_k_to_the_minus_half(op):
    args = _inputs(op, T=10, K=16, V=16)
    assert torch.equal(OPS[op](**args)[0], OPS[op](**args, scale=0.25)[0])
    assert OPS[op](**args)[1] is None


@pytest.mark.parametrize("op", list(OPS))
def test_argument_errors_name_the_argument(op):
    args = _inputs(op, T=10)
    with pytest.raises(TypeError, match="^k:"):
        OPS[op](**{**args, "k": args["k"].numpy()})
    with pytest.raises(TypeError, match="output_final_state"):
        OPS[op](**args, output_final_state="yes")
    with pytest.raises(TypeError, match="scale"):
        OPS[op](**args, scale="0.5")
    query = "r" if op == "rwkv6" else "q"
    with pytest.raises(ValueError, match=f"{query}:"):
        OPS[op](**{**args, query: args[query][0]})
    with pytest.raises((ValueError, TypeError), match="initial_state"):
        OPS[op](**args, initial_state=torch.zeros(1, 2, 8, 16))


@pytest.mark.parametrize("op, name", [("gla", "g"), ("rwkv6", "w"), ("rwkv6", "u")])
def test_gate_shape_error_names_the_argument(op, name):
    args = _inputs(op, T=10)
    with pytest.raises(ValueError, match=f"^{name}:"):
        OPS[op](**{**args, name: args[name][..., :8]})


@pytest.mark.parametrize("layer", [ops.Retention, ops.GatedLinearAttention, ops.RWKV6TimeMix])
def test_layer_trains_and_continues_from_its_state(layer):
    torch.manual_seed(0)
    m = layer(dim=64, heads=2)
    x = torch.randn(1, 40, 64)
    y, state = m(x, output_final_state=True)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    with torch.no_grad():
        y1, s1 = m(x[:, :25], output_final_state=True)
        y2 = m(x[:, 25:], initial_state=s1)
    assert rel_err(torch.cat([y1, y2], 1), y.detach().double().numpy()) <= bound(torch.float32)


def _gpu_bf16_against_float64(op: str, inputs: dict, B: int, H: int, D: int, T: int):
    """bf16 inputs on the GPU (fp32 bonus and state; initial state and final-state gradient given):
    the output, final state and every gradient within the bf16 bound of float64 on the same rounded
    values (the gate gradients cancel: input rounding alone moves them past the bound)."""
    inputs["initial_state"] = torch.randn(B, H, D, D, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    low = {n: t.to("cuda", torch.float32 if n in ("u", "initial_state") else torch.bfloat16).requires_grad_()
           for n, t in inputs.items()}
    exact = {n: t.detach().cpu().double().requires_grad_() for n, t in low.items()}
    results = []
    for args in (exact, low):
        o, s = OPS[op](**args, output_final_state=True)
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device) for t in (o, s)]
        (o.double() * weights[0]).sum().add((s.double() * weights[1]).sum()).backward()
        results.append({"o": o, "final_state": s, **{n: t.grad for n, t in args.items()}})
    for n, want in results[0].items():
        got = results[1][n].double().cpu()
        assert got.isfinite().all(), n
        assert rel_err(got, want.detach().numpy()) <= bound(torch.bfloat16), n


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("T", [1, 100, 300])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_forward_and_backward_against_float64(op, T, D):
    """Gates uniform in [-1, 0] per step; at this T the sum of two chunks passes the fast form's
    range from T = 100 on, so gla and rwkv6 run the fast form at T = 1 and the exact one after."""
    _gpu_bf16_against_float64(op, _inputs(op, B=2, T=T, H=3, K=D, V=D, seed=T + D, dtype=torch.float64), 2, 3, D, T)


@pytest.mark.gpu
@pytest.mark.parametrize("op", DECAYED)
@pytest.mark.parametrize("T", [100, 300])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_fast_form_against_float64(op, T, D):
    """Gates uniform in [-0.1, 0] per step: within the fast form's range, so the ops take it."""
    args = _inputs(op, B=2, T=T, H=3, K=D, V=D, seed=T + D, dtype=torch.float64, max_decay=0.1)
    _gpu_bf16_against_float64(op, args, 2, 3, D, T)


@pytest.mark.gpu
@pytest.mark.parametrize("op", DECAYED)
@pytest.mark.parametrize("T", [100, 300])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_stress_decays_against_float64(op, T, D):
    """Issue 27's stress decays on the GPU: RWKV-6 -exp(U(-1, 2)), GLA uniform in [-20, 0] per step."""
    args = _inputs(op, B=2, T=T, H=3, K=D, V=D, seed=T + D, dtype=torch.float64, max_decay=20.0)
    if op == "rwkv6":
        gen = torch.Generator().manual_seed(T)
        args["w"] = -torch.exp(torch.empty_like(args["w"]).uniform_(-1.0, 2.0, generator=gen))
    _gpu_bf16_against_float64(op, args, 2, 3, D, T)
