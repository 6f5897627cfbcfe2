"""lolcats_attention (ops/lolcats.py): against the float64 quadratic form (reference/lolcats.py), float64
gradients through the derived backward, bf16 on the interpreter, argument errors, the layer, the bench
rows (bench/lolcats.py), and on a GPU bf16 against float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix import ops
from tilemix import reference as ref
from tilemix.reference.tolerance import bound, rel_err


def _inputs(B=1, T=70, H=2, D=16, V=16, F=32, seed=0, dtype=torch.float32) -> dict:
    """q, k, v standard normal; the features softmaxes of normal projections, as Hedgehog's are."""
    gen = torch.Generator().manual_seed(seed)
    args = {n: torch.randn(B, T, H, d, generator=gen, dtype=dtype) for n, d in (("q", D), ("k", D), ("v", V))}
    for n in ("q_features", "k_features"):
        args[n] = torch.randn(B, T, H, F, generator=gen, dtype=dtype).softmax(-1)
    return args


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 300), H=st.integers(1, 2), window=st.sampled_from([1, 17, 63, 64]),
       V=st.sampled_from([16, 64, 100, 128]), F=st.sampled_from([16, 64]), scale=st.sampled_from([None, 0.1, 0.5]),
       seed=st.integers(0, 2 ** 16))
def test_matches_float64_quadratic_form(T, H, window, V, F, scale, seed):
    """T from 1 to 300: partial last chunks, one chunk, several; windows narrower than a chunk and whole;
    values in one piece and in several (V > 64)."""
    args = _inputs(T=T, H=H, V=V, F=F, seed=seed)
    o = ops.lolcats_attention(**args, window=window, scale=scale)
    assert o.shape == args["v"].shape and o.dtype == torch.float32
    assert rel_err(o, ref.lolcats_attention(**args, window=window, scale=scale)) <= bound(torch.float32)


def test_the_reference_window_is_the_last_w_keys():
    """q = 0 gives every windowed key the weight 1 and constant features every older key the weight
    c: token t averages v over its last W keys (weight 1) and the keys before them (weight c)."""
    W, T, c = 5, 12, 0.3
    args = _inputs(T=T, H=1, D=4, V=3, F=2, dtype=torch.float64)
    args["q"] = torch.zeros_like(args["q"])
    args["q_features"] = args["k_features"] = torch.full_like(args["q_features"], (c / 2) ** 0.5)
    v = args["v"][0, :, 0].double().numpy()
    expected = [(v[max(t - W + 1, 0):t + 1].sum(0) + c * v[:max(t - W + 1, 0)].sum(0))
                / (min(W, t + 1) + c * max(t - W + 1, 0)) for t in range(T)]
    np.testing.assert_allclose(ref.lolcats_attention(**args, window=W)[0, :, 0], expected, rtol=1e-12)


def test_without_key_features_it_is_sliding_window_attention():
    """k_features = 0 leaves the window's softmax alone: ``attention(causal=True, window=W)``."""
    args = _inputs(T=150, H=2)
    args["k_features"] = torch.zeros_like(args["k_features"])
    window = ops.attention(args["q"], args["k"], args["v"], causal=True, window=40)
    assert rel_err(ops.lolcats_attention(**args, window=40), window.double().numpy()) <= bound(torch.float32)


def test_values_run_in_pieces_of_64_columns(monkeypatch):
    """Each piece's program carries 64 value columns (the GPU budget at D = V = 128); the pieces join."""
    from tilemix.ops import lolcats

    widths, program = [], lolcats.lolcats_mixer

    def recording(**args):
        widths.append(args["v"].shape[-1])
        return program(**args)

    monkeypatch.setattr(lolcats, "lolcats_mixer", recording)
    args = _inputs(T=70, V=150)
    assert rel_err(ops.lolcats_attention(**args), ref.lolcats_attention(**args)) <= bound(torch.float32)
    assert widths == [64, 64, 22]


def test_empty_sequence_gives_an_empty_output():
    args = _inputs(T=0, V=100)
    assert ops.lolcats_attention(**args).shape == (1, 0, 2, 100)


def test_default_scale_is_head_dim_to_the_minus_half():
    args = _inputs(T=10)
    assert torch.equal(ops.lolcats_attention(**args), ops.lolcats_attention(**args, scale=0.25))


@pytest.mark.parametrize("window", [64, 20])
def test_float64_gradients(window):
    """The derived backward by gradcheck (fast mode: random projections) over three chunks (T = 140):
    the carried previous chunk and the state both take part."""
    leaves = [t.requires_grad_() for t in _inputs(T=140, dtype=torch.float64, seed=5).values()]
    fn = lambda q, k, v, fq, fk: ops.lolcats_attention(q, k, v, fq, fk, window=window)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_opcheck_with_gradients():
    """torch.library's checks (schema, fake tensors, AOT dispatch) with inputs that require grad."""
    inputs = [t.requires_grad_() for t in _inputs(T=70, seed=3).values()]
    torch.library.opcheck(torch.ops.tilemix.lolcats_attention.default, (*inputs, 0.25, 32))


def test_compiled_training_step_matches_eager():
    """torch.compile(fullgraph=True) traces the value pieces and the op, forward and derived backward."""
    args = [t.requires_grad_() for t in _inputs(T=70, V=80).values()]
    fn = lambda *a: ops.lolcats_attention(*a, window=32).square().sum()  # noqa: E731
    eager = torch.autograd.grad(fn(*args), args)
    compiled = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(*args), args)
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c)


@pytest.mark.parametrize("change, error, name", [
    (dict(k=lambda a: a["k"].numpy()), TypeError, "k"),
    (dict(q=lambda a: a["q"][0]), ValueError, "q"),
    (dict(k=lambda a: a["k"][:, :5]), ValueError, "k"),
    (dict(v=lambda a: a["v"][:, :5]), ValueError, "v"),
    (dict(q_features=lambda a: a["q_features"][:, :, :1]), ValueError, "q_features"),
    (dict(k_features=lambda a: a["k_features"][..., :8]), ValueError, "k_features"),
    (dict(window=lambda a: 0), ValueError, "window"),
    (dict(window=lambda a: 65), ValueError, "window"),
    (dict(window=lambda a: True), ValueError, "window"),
    (dict(window=lambda a: 32.0), ValueError, "window"),
    (dict(scale=lambda a: "0.5"), TypeError, "scale"),
])
def test_argument_errors_name_the_argument(change, error, name):
    args = {**_inputs(T=10), "window": 64}
    with pytest.raises(error, match=f"^{name}:"):
        ops.lolcats_attention(**{**args, **{n: f(args) for n, f in change.items()}})


def test_the_program_refuses_a_window_past_the_previous_chunk():
    """Called directly, the program names its window limit rather than read keys it does not carry."""
    from tilemix.ops.lolcats import lolcats_fwd
    from tilemix.tiles import TileError

    with pytest.raises(TileError, match=r"window=65\): the window takes 1 to 64 keys"):
        ops.run(lolcats_fwd, **_inputs(T=10), scale=0.5, window=65)


def test_layer_trains_every_parameter():
    torch.manual_seed(0)
    layer, x = ops.LoLCATsAttention(dim=64, heads=2, window=16), torch.randn(1, 100, 64)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_layer_weights_the_window_as_lolcats_does():
    """The layer folds LoLCATs' window factor w = sigmoid(window_factors) into q's features; the output
    is LoLCATs' ``(w · Σ_window exp(s - m) v + Σ_older φq·φk v) / (w · Σ exp(s - m) + Σ φq·φk)``."""
    torch.manual_seed(0)
    layer, x = ops.LoLCATsAttention(dim=32, heads=2, window=8).double(), torch.randn(1, 80, 32, dtype=torch.float64)
    with torch.no_grad():
        layer.window_factors.copy_(torch.tensor([-1.0, 2.0]))
        q, k, v = (t.unflatten(-1, (2, -1)) for t in layer.in_proj(x).chunk(3, dim=-1))
        t = torch.arange(80)
        gap = t[:, None] - t[None, :]
        scores = torch.einsum("bthd,bshd->bhts", q, k) / 4
        scores = scores.masked_fill(~((gap >= 0) & (gap < 8)), float("-inf"))
        w = torch.sigmoid(layer.window_factors)[:, None, None]
        weights = w * torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights + torch.einsum("bthf,bshf->bhts", layer.q_map(q), layer.k_map(k)) * (gap >= 8)
        o = torch.einsum("bhts,bshv->bthv", weights / weights.sum(-1, keepdim=True), v)
        assert rel_err(layer(x), layer.out(o.flatten(-2)).numpy()) <= 1e-10


def test_layer_is_causal():
    torch.manual_seed(0)
    layer, x = ops.LoLCATsAttention(dim=64, heads=2), torch.randn(1, 150, 64)
    with torch.no_grad():
        whole, prefix = layer(x), layer(x[:, :90])
    assert rel_err(whole[:, :90], prefix.double().numpy()) <= bound(torch.float32)


def test_feature_map_is_two_softmaxes_of_the_projection():
    fmap = ops.HedgehogFeatureMap(heads=2, head_dim=8, features=4)
    x = torch.randn(1, 3, 2, 8)
    y = torch.einsum("bthd,hdf->bthf", x, fmap.weight)
    assert torch.allclose(fmap(x), torch.cat([y.softmax(-1), (-y).softmax(-1)], -1))
    assert torch.allclose(fmap(x)[..., :4].sum(-1), torch.ones(1, 3, 2))


def _bf16_against_float64(T, window, D, device) -> dict[str, float]:
    """The relative errors of o and of the five gradients, bf16 on ``device`` against float64 on the same
    rounded values (input rounding alone moves dq and dk past the bf16 bound at T = 4096: with thousands
    of older tokens the softmax's share of the normaliser is small), D = V, 128 features."""
    args = _inputs(B=2, T=T, H=3, D=D, V=D, F=128, seed=T, dtype=torch.float64)
    exact = {n: t.to(torch.bfloat16).double().requires_grad_() for n, t in args.items()}
    low = {n: t.detach().to(device, torch.bfloat16).requires_grad_() for n, t in exact.items()}
    o, o_ref = ops.lolcats_attention(**low, window=window), ops.lolcats_attention(**exact, window=window)
    do = torch.randn_like(o_ref).to(torch.bfloat16).double()
    (o.float() * do.to(device)).sum().backward()
    (o_ref * do).sum().backward()
    errors = {n: rel_err(low[n].grad.float().cpu(), exact[n].grad.numpy()) for n in exact}
    return {"o": rel_err(o.float().cpu(), o_ref.detach().numpy()), **errors}


def test_bf16_on_the_interpreter_within_the_bound():
    """The GPU's numerics, predicted on the CPU (matmul operands rounded to bf16), two value pieces."""
    errors = _bf16_against_float64(T=150, window=64, D=128, device="cpu")
    assert max(errors.values()) <= bound(torch.bfloat16), errors


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 100, 300, 4096])
@pytest.mark.parametrize("window", [64, 32])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_forward_and_backward_against_float64(T, window, D):
    """D = 128: LoLCATs' Llama heads, in two value pieces; on the device's target."""
    errors = _bf16_against_float64(T, window, D, device="cuda")
    assert max(errors.values()) <= bound(torch.bfloat16), errors


@pytest.mark.gpu
def test_gpu_layer_trains_in_bf16():
    torch.manual_seed(0)
    layer = ops.LoLCATsAttention(dim=256, heads=4).to("cuda", torch.bfloat16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    layer(x).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0 for p in layer.parameters())


# -- bench rows (bench/lolcats.py) ----------------------------------------------------------------------------
@pytest.mark.parametrize("T, window", [(1, 64), (150, 64), (200, 20), (129, 1)])
def test_bench_peer_is_the_same_math(T, window):
    """The plain-torch peer (chunked, with cumulative states) against the float64 quadratic form."""
    from tilemix.bench.lolcats import lolcats_torch

    args = _inputs(B=2, T=T, seed=T, dtype=torch.float64)
    expected = ref.lolcats_attention(**args, window=window)
    assert rel_err(lolcats_torch(**args, window=window), expected) <= bound(torch.float32)


@pytest.mark.parametrize("name", ["lolcats_attention", "lolcats_attention-bwd"])
def test_bench_rows_run_and_agree_with_their_peer(name):
    """Each row's timed calls run on the CPU at a small shape (ours on the interpreter) and agree;
    the backward row returns a gradient of each of the five inputs and says it is derived."""
    from tilemix.bench import bench

    ours, peer, peer_name, nbytes, flops, shape = bench.CASES[name](1, 70, 2, 16, torch.float32, device="cpu")
    mine, theirs = ours(), peer()
    if bench.direction(name) == "bwd":
        assert len(mine) == 5 and bench._backward_field(name) == {"backward": "derived"}
    else:
        mine, theirs = [mine], [theirs]
    for a, b in zip(mine, theirs):
        assert rel_err(a, b.double().numpy()) <= bound(torch.float32)
    assert peer_name == "torch-compiled" and nbytes > 0 and flops > 0 and shape["window"] == 64


def test_bench_rows_run_at_the_issue_shape():
    from tilemix.bench import bench

    rows = bench.default_rows(["lolcats_attention", "lolcats_attention-bwd"])
    assert rows == [("lolcats_attention", 8, 4096, 16, 64), ("lolcats_attention-bwd", 8, 4096, 16, 64)]
