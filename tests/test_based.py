"""based (ops/based.py): against the float64 quadratic form (reference/based.py), float64 gradients
through the derived backward, argument errors, the layer, and on a GPU bf16 against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix import ops
from tilemix import reference as ref
from tilemix.ops.based import GPU_FEATURES, based_mixer
from tilemix.reference.tolerance import MAX_CONDITION, bound, rel_err


def _inputs(B=1, T=70, H=2, V=16, seed=0, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, T, H, d, generator=gen, dtype=dtype) for n, d in (("q", 16), ("k", 16), ("v", V))}


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 300), H=st.integers(1, 2), V=st.sampled_from([16, 64]), normalize=st.booleans(),
       scale=st.sampled_from([None, 0.1, 0.5]), seed=st.integers(0, 2 ** 16))
def test_matches_float64_quadratic_form(T, H, V, normalize, scale, seed):
    """T from 1 to 300: partial last chunks, one chunk, several."""
    args = _inputs(T=T, H=H, V=V, seed=seed)
    o = ops.based(**args, scale=scale, normalize=normalize)
    assert o.shape == args["v"].shape and o.dtype == torch.float32
    assert rel_err(o, ref.based(**args, scale=scale, normalize=normalize)) <= bound(torch.float32)


def _padded(args: dict) -> dict:
    """The GPU's layout: q and k with zero columns up to GPU_FEATURES."""
    return {n: t if n == "v" else F.pad(t, (0, GPU_FEATURES - t.shape[-1])) for n, t in args.items()}


@settings(max_examples=5, deadline=None)
@given(T=st.integers(1, 300), normalize=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_padded_features_match_float64(T, normalize, seed):
    """The program the GPU runs, on the interpreter: the zero columns add nothing."""
    args = _inputs(T=T, V=64, seed=seed)
    o = based_mixer(**_padded(args), scale=0.3, normalize=normalize)
    assert rel_err(o, ref.based(**args, scale=0.3, normalize=normalize)) <= bound(torch.float32)


def test_padded_features_float64_gradients():
    leaves = [t.requires_grad_() for t in _inputs(T=70, dtype=torch.float64, seed=6).values()]
    fn = lambda q, k, v: based_mixer(**_padded(dict(q=q, k=k, v=v)), scale=0.25)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_default_scale_is_features_to_the_minus_half():
    args = _inputs(T=10)
    assert torch.equal(ops.based(**args), ops.based(**args, scale=0.25))


def test_unnormalised_sums_the_taylor_weights():
    """One token: its own weight 1 + x + x²/2 on its value, x = scale · q·k."""
    args = _inputs(T=1, H=1)
    x = 0.25 * (args["q"] * args["k"]).sum(-1, keepdim=True)
    assert torch.allclose(ops.based(**args, normalize=False), (1 + x + x * x / 2) * args["v"])


@pytest.mark.parametrize("normalize", [True, False])
def test_float64_gradients(normalize):
    """The derived backward by gradcheck (fast mode: random projections), across a chunk boundary (T = 70)."""
    leaves = [t.requires_grad_() for t in _inputs(T=70, dtype=torch.float64, seed=5).values()]
    assert torch.autograd.gradcheck(lambda q, k, v: ops.based(q, k, v, normalize=normalize), leaves, fast_mode=True)


@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck_with_gradients(normalize):
    """torch.library's checks (schema, fake tensors, AOT dispatch) with inputs that require grad:
    the derived backward traces as an op, so a compiled training step sees no Python."""
    inputs = [t.requires_grad_() for t in _inputs(T=70, seed=3).values()]
    torch.library.opcheck(torch.ops.tilemix.based.default, (*inputs, 0.25, normalize))


@pytest.mark.parametrize("change, error, name", [
    (dict(k=lambda a: a["k"].numpy()), TypeError, "k"),
    (dict(q=lambda a: a["q"][..., :8], k=lambda a: a["k"][..., :8]), ValueError, "q"),
    (dict(q=lambda a: a["q"][0]), ValueError, "q"),
    (dict(k=lambda a: a["k"][:, :5]), ValueError, "k"),
    (dict(v=lambda a: a["v"][:, :, :1]), ValueError, "v"),
])
def test_argument_errors_name_the_argument(change, error, name):
    args = _inputs(T=10)
    with pytest.raises(error, match=f"^{name}:"):
        ops.based(**{**args, **{n: f(args) for n, f in change.items()}})


def test_feature_dim_error_says_what_is_supported():
    args = _inputs(T=10)
    with pytest.raises(ValueError, match=r"q: expected \[B, T, H, 16\]"):
        ops.based(**{**args, "q": args["q"].repeat(1, 1, 1, 2), "k": args["k"].repeat(1, 1, 1, 2)})


def test_gpu_value_dim_error_names_v():
    """Checked before anything runs: meta tensors stand in for CUDA ones (any device but the CPU)."""
    args = {n: t.to("meta") for n, t in _inputs(T=10, V=128).items()}
    with pytest.raises(ValueError, match="^v: the GPU kernels take V = 64"):
        ops.based(**args)


@pytest.mark.parametrize("flag, value", [("normalize", "yes"), ("scale", "0.5")])
def test_flag_errors_name_the_flag(flag, value):
    with pytest.raises(TypeError, match=flag):
        ops.based(**_inputs(T=10), **{flag: value})


def test_layer_trains():
    torch.manual_seed(0)
    layer = ops.Based(dim=64, heads=2)
    x = torch.randn(1, 40, 64)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_layer_is_causal():
    torch.manual_seed(0)
    layer, x = ops.Based(dim=64, heads=2), torch.randn(1, 90, 64)
    with torch.no_grad():
        whole, prefix = layer(x), layer(x[:, :70])
    assert rel_err(whole[:, :70], prefix.double().numpy()) <= bound(torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 100, 300, 4096])
@pytest.mark.parametrize("normalize", [True, False])
def test_gpu_bf16_forward_and_backward_against_float64(T, normalize):
    exact = {n: t.requires_grad_() for n, t in _inputs(B=2, T=T, H=3, V=64, seed=T, dtype=torch.float64).items()}
    low = {n: t.detach().to("cuda", torch.bfloat16).requires_grad_() for n, t in exact.items()}
    o = ops.based(**low, normalize=normalize)
    o_ref = ops.based(**exact, normalize=normalize)
    assert rel_err(o.float().cpu(), o_ref.detach().numpy()) <= bound(torch.bfloat16)
    do = torch.randn_like(o_ref)
    (o.float() * do.to("cuda")).sum().backward()
    (o_ref * do).sum().backward()
    terms = _numerator_gradients(exact, do) if normalize else {}
    for n in exact:
        error = rel_err(low[n].grad.float().cpu(), exact[n].grad.numpy(), magnitude=terms.get(n),
                        max_condition=MAX_CONDITION["bfloat16"])
        assert error <= bound(torch.bfloat16), n


def _numerator_gradients(exact, do):
    """Normalised, dq and dk are the numerator's gradient over the denominator minus the output times
    the denominator's gradient over it: two terms that cancel (exactly at T = 1, where o = v up to the
    1e-6). The first term's size is what the bf16 error of such a difference is judged against."""
    inputs = {n: t.detach().requires_grad_() for n, t in exact.items()}
    numerator = ops.based(**inputs, normalize=False)
    denominator = (numerator / ops.based(**inputs)).detach()
    (numerator / denominator * do).sum().backward()
    return {n: t.grad.numpy() for n, t in inputs.items()}
