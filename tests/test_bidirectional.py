"""Bidirectional linear attention (``linear_attention(..., causal=False)``, normalised or not) and prefix linear
attention (ops/bidirectional.py): against the float64 masked products (reference/bidirectional.py) on the
interpreter, float64 gradients, argument errors, the layer, bf16 on a GPU, and the programs compiled for
sm_90a and sm_80."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix import ops
from tilemix import reference as ref
from tilemix.ops import bidirectional
from tilemix.reference.tolerance import bound, rel_err

PROGRAMS = (bidirectional.bidirectional_linear_attention_fwd,
            bidirectional.bidirectional_linear_attention_normalized_fwd,
            bidirectional.prefix_linear_attention_fwd, bidirectional.linear_attention_read)


def _qkv(B=1, T=70, H=2, K=16, V=16, seed=0, dtype=torch.float64, positive=False):
    """q and k with rows of about unit norm (``positive``: exp of a standard normal, as an exp feature map
    gives: a normaliser away from 0, and keys diverse enough that the normalised form's q and k gradients
    do not cancel), v standard normal."""
    gen = torch.Generator().manual_seed(seed)
    if positive:
        q, k = (torch.randn(B, T, H, K, generator=gen, dtype=dtype).exp() for _ in range(2))
    else:
        q, k = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) * K ** -0.5 for _ in range(2))
    return q, k, torch.randn(B, T, H, V, generator=gen, dtype=dtype)


def _bidirectional(normalize):
    return lambda q, k, v: ops.linear_attention(q, k, v, causal=False, normalize=normalize)[0]


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 300), K=st.sampled_from([16, 32]), V=st.sampled_from([16, 48]), normalize=st.booleans(),
       seed=st.integers(0, 2**16))
def test_bidirectional_matches_float64(T, K, V, normalize, seed):
    q, k, v = _qkv(B=2, T=T, K=K, V=V, seed=seed, positive=normalize)
    o, state = ops.linear_attention(q, k, v, scale=0.3, causal=False, normalize=normalize)
    assert state is None
    assert rel_err(o, ref.bidirectional_linear_attention(q, k, v, 0.3, normalize)) <= 1e-12


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 300), where=st.floats(0, 1), K=st.sampled_from([16, 32]), seed=st.integers(0, 2**16))
def test_prefix_matches_float64(T, where, K, seed):
    prefix_len = round(where * T)
    q, k, v = _qkv(B=2, T=T, K=K, seed=seed)
    assert rel_err(ops.prefix_linear_attention(q, k, v, prefix_len),
                   ref.prefix_linear_attention(q, k, v, prefix_len)) <= 1e-12


def test_prefix_ends_are_causal_and_bidirectional():
    q, k, v = _qkv(T=100)
    assert rel_err(ops.prefix_linear_attention(q, k, v, 0), ops.linear_attention(q, k, v)[0].numpy()) <= 1e-12
    full = ops.linear_attention(q, k, v, causal=False)[0].numpy()
    assert rel_err(ops.prefix_linear_attention(q, k, v, 100), full) <= 1e-12


@pytest.mark.parametrize("shape", [(2, 0, 3, 16), (0, 5, 3, 16)])
def test_empty_inputs(shape):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    outputs = [ops.linear_attention(q, k, v, causal=False)[0],
               ops.linear_attention(q, k, v, causal=False, normalize=True)[0],
               ops.prefix_linear_attention(q, k, v, min(3, shape[1]))]
    assert all(o.shape == shape for o in outputs)
    sum(o.sum() for o in outputs).backward()
    assert q.grad.shape == k.grad.shape == v.grad.shape == shape


def test_default_scale_is_k_to_the_minus_half():
    q, k, v = _qkv(K=32)
    assert rel_err(ops.linear_attention(q, k, v, causal=False)[0],
                   ref.bidirectional_linear_attention(q, k, v, 32 ** -0.5)) <= 1e-12
    assert rel_err(ops.prefix_linear_attention(q, k, v, 10),
                   ref.prefix_linear_attention(q, k, v, 10, 32 ** -0.5)) <= 1e-12


@pytest.mark.parametrize("normalize", [False, True])
def test_bidirectional_gradients(normalize):
    inputs = tuple(t.requires_grad_() for t in _qkv(T=70, positive=normalize))
    assert torch.autograd.gradcheck(_bidirectional(normalize), inputs, fast_mode=True)


@pytest.mark.parametrize("prefix_len", [0, 5, 64, 70])
def test_prefix_gradients(prefix_len):
    inputs = tuple(t.requires_grad_() for t in _qkv(T=70))
    assert torch.autograd.gradcheck(lambda q, k, v: ops.prefix_linear_attention(q, k, v, prefix_len), inputs,
                                    fast_mode=True)


@pytest.mark.parametrize("op, args, positive", [
    ("bidirectional_linear_attention", (0.3,), False),
    ("bidirectional_linear_attention_normalized", (0.3,), True),
    *(("prefix_linear_attention", (P, 0.3), False) for P in (0, 5, 70)),
])
def test_state_results_carry_gradients(op, args, positive):
    """The ops return the states their backward reads (S, z, the prefix's S); a gradient for them as
    results reaches k and v too."""
    inputs = tuple(t.requires_grad_() for t in _qkv(T=70, positive=positive))
    assert torch.autograd.gradcheck(lambda q, k, v: getattr(torch.ops.tilemix, op)(q, k, v, *args), inputs,
                                    fast_mode=True)


@pytest.mark.parametrize("call, error, message", [
    (lambda q, k, v: ops.prefix_linear_attention(q, k, v, -1), ValueError, r"prefix_len: expected 0 <= prefix_len"),
    (lambda q, k, v: ops.prefix_linear_attention(q, k, v, 71), ValueError, r"<= T = 70, got 71"),
    (lambda q, k, v: ops.prefix_linear_attention(q, k, v, 3.0), TypeError, "prefix_len: expected an int"),
    (lambda q, k, v: ops.prefix_linear_attention(q, k, v, True), TypeError, "prefix_len: expected an int"),
    (lambda q, k, v: ops.prefix_linear_attention(q[0], k, v, 3), ValueError, r"q: expected 4 dims \[B, T, H, K\]"),
    (lambda q, k, v: ops.prefix_linear_attention(q, k[0], v, 3), ValueError, r"k: expected shape \[1, 70, 2, 16\]"),
    (lambda q, k, v: ops.prefix_linear_attention(q, k, v[:, :5], 30), ValueError,
     r"v: expected shape \[1, 70, 2, 'V'\] \(from q\), got \[1, 5"),
    (lambda q, k, v: ops.prefix_linear_attention(q, k.double(), v, 3), TypeError,
     "k: dtype torch.float64 differs from q's"),
    (lambda q, k, v: ops.linear_attention(q, k, v, normalize=True), ValueError, "normalize: True is supported"),
    (lambda q, k, v: ops.linear_attention(q, k, v, causal="no"), TypeError, "causal: expected True or False"),
    (lambda q, k, v: ops.linear_attention(q, k, v, causal=False, initial_state=torch.zeros(1, 2, 16, 16)),
     ValueError, "initial_state: the bidirectional form"),
    (lambda q, k, v: ops.linear_attention(q, k, v, causal=False, output_final_state=True), ValueError,
     "output_final_state: the bidirectional form"),
    (lambda q, k, v: ops.linear_attention(q, k, v, causal=False, backward="derived"), ValueError, "backward:"),
    (lambda q, k, v: ops.linear_attention(q, k, v[:, :5], causal=False), ValueError, r"v: expected shape .* \[1, 5"),
])
def test_argument_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(*_qkv(T=70, dtype=torch.float32))


@pytest.mark.parametrize("layer_args, call_args, expected", [
    (dict(causal=False), {}, lambda q, k, v: ref.bidirectional_linear_attention(q, k, v)),
    (dict(causal=False, normalize=True), {}, lambda q, k, v: ref.bidirectional_linear_attention(q, k, v, None, True)),
    ({}, dict(prefix_len=30), lambda q, k, v: ref.prefix_linear_attention(q, k, v, 30)),
])
def test_layer_forms(layer_args, call_args, expected):
    torch.manual_seed(0)
    layer = ops.LinearAttention(dim=64, heads=2, feature_map="elu+1", **layer_args).double()
    x = torch.randn(2, 50, 64, dtype=torch.float64)
    y = layer(x, **call_args)
    q, k, v = (t.unflatten(-1, (2, -1)) for t in layer.in_proj(x).chunk(3, dim=-1))
    q, k = layer.feature_map(q), layer.feature_map(k)
    want = layer.out(torch.from_numpy(expected(q, k, v)).flatten(-2))
    assert rel_err(y, want.detach().numpy()) <= 1e-12
    y.square().mean().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_layer_refuses_what_the_forms_lack():
    with pytest.raises(ValueError, match="normalize: True is supported with causal=False only"):
        ops.LinearAttention(dim=64, heads=2, normalize=True)
    with pytest.raises(ValueError, match="prefix_len: the prefix form runs on a causal layer"):
        ops.LinearAttention(dim=64, heads=2, causal=False)(torch.randn(1, 10, 64), prefix_len=3)


@pytest.mark.parametrize("op, args, differentiable", [
    ("bidirectional_linear_attention", lambda q, k, v: (q, k, v, 0.25), True),
    ("bidirectional_linear_attention_normalized", lambda q, k, v: (q.abs(), k.abs(), v, 0.25), True),
    ("prefix_linear_attention", lambda q, k, v: (q, k, v, 30, 0.25), True),
    ("prefix_linear_attention", lambda q, k, v: (q, k, v, 0, 0.25), True),
    ("prefix_linear_attention_pass", lambda q, k, v: (q, k, v, 30.0, 0.25, torch.randn(1, 2, 16, 16)), False),
    ("linear_attention_sum", lambda q, k, v: (k, v), False),
    ("linear_attention_read", lambda q, k, v: (q, 0.5, torch.randn(1, 2, 16, 16)), False),
])
def test_ops_pass_opcheck(op, args, differentiable):
    """Schema, fake (meta) kernel and autograd registration agree with the real kernel (the backward's
    programs are ops without a backward of their own)."""
    values = args(*_qkv(T=70, dtype=torch.float32))
    if differentiable:
        values = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in values)
    torch.library.opcheck(getattr(torch.ops.tilemix, op), values)


def test_compile_fullgraph_trains_as_eager():
    """torch.compile traces both forms whole, their backward ops included, and computes what eager does."""
    def forward(q, k, v):
        return ops.prefix_linear_attention(q, k, v, 30) + ops.linear_attention(q, k, v, causal=False,
                                                                               normalize=True)[0]

    def step(fn):
        q, k, v = (t.float().requires_grad_() for t in _qkv(T=70, positive=True))
        o = fn(q, k, v)
        o.square().sum().backward()
        return o, q.grad, k.grad, v.grad

    for e, c in zip(step(forward), step(torch.compile(forward, fullgraph=True, backend="aot_eager"))):
        assert torch.equal(e, c)


@pytest.mark.gpu
# at T = 1 the normalised output is v whatever q and k are: their exact gradients are 0, bf16's its rounding
@pytest.mark.parametrize("form, T", [(form, T) for form in ("bidirectional", "normalized", "prefix")
                                     for T in (1, 100, 300, 4096) if (form, T) != ("normalized", 1)])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_forward_and_backward_against_float64(form, T, D):
    """bf16 inputs on the GPU: the output and every gradient within the bf16 bound of float64 on the same
    rounded values (the prefix ending inside a chunk)."""
    low = tuple(t.to("cuda", torch.bfloat16).requires_grad_() for t in _qkv(B=2, T=T, H=3, K=D, V=D, seed=T + D,
                                                                             positive=form == "normalized"))
    exact = tuple(t.detach().cpu().double().requires_grad_() for t in low)
    call = {"bidirectional": _bidirectional(False), "normalized": _bidirectional(True),
            "prefix": lambda q, k, v: ops.prefix_linear_attention(q, k, v, (3 * T) // 5)}[form]
    results = []
    for args in (exact, low):
        o = call(*args)
        weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (o.double() * weights.to(o.device)).sum().backward()
        results.append({"o": o, **{n: t.grad for n, t in zip("qkv", args)}})
    for n, want in results[0].items():
        assert rel_err(results[1][n].double().cpu(), want.detach().numpy()) <= bound(torch.bfloat16), n


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.name)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("arch, mma", [("sm_90a", "HGMMA"), ("sm_80", "HMMA")])
def test_compiles_with_tensor_cores_without_local_memory(program, D, arch, mma):
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    from tilemix.codegen.compile import compile_cuda, resources, sass
    from tilemix.codegen.schedule import default_source
    from tilemix.ops.examples import kernel_specs

    binding = program.bind(kernel_specs(program, size=D, T=4096))
    source = default_source(program, binding, arch)
    compiled = compile_cuda(source.source, arch, source.name)
    text, usage = sass(compiled), resources(compiled)
    assert mma in text, f"{source.name}: no {mma} in the SASS"
    assert not ("LDL" in text or "STL" in text or usage["local_memory"]), f"{source.name}: local memory {usage}"


@pytest.mark.parametrize("name", ["linear_attention-bidir", "linear_attention-bidir-bwd", "prefix_linear_attention",
                                  "prefix_linear_attention-bwd"])
def test_bench_rows_run_without_peer(name):
    """Each row's timed call runs on the interpreter at a small shape (backward: a gradient of q, k and v); its
    bytes are q, k, v and o (backward: q, k, v, do and their gradients), and the record's op is the function."""
    from tilemix.bench import bench

    ours, peer, peer_name, nbytes, flops, shape = bench.CASES[name](1, 70, 2, 16, torch.float32, device="cpu")
    out = ours()
    if bench.direction(name) == "bwd":
        assert len(out) == 3 and all(g.shape == (1, 70, 2, 16) and g.isfinite().all() for g in out)
    else:
        assert out.shape == (1, 70, 2, 16) and out.isfinite().all()
    assert nbytes == (7 if bench.direction(name) == "bwd" else 4) * 70 * 2 * 16 * 4
    assert peer is None and peer_name == "-" and flops > 0 and shape["T"] == 70
    assert name.split("-")[0] in ("linear_attention", "prefix_linear_attention")
