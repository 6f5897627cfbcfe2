"""The eager fast path (``ops/eager.py``): a plain eager call runs an op's function and backward
without torch's dispatcher, bit for bit as the custom op does, and anything traced, transformed,
faked or under a mode still goes through the custom op."""

from __future__ import annotations

import pytest
import torch

from tilemix import ops
from tilemix.ops import eager
from tilemix.ops.gemm import gemm_nt_op, gemm_op, gemm_tn_op
from tilemix.tiles import Out, Seq, State, chunks, colsum, kernel


@pytest.fixture
def through_dispatcher(monkeypatch):
    """Every call of an ``EagerOp`` made inside goes through torch's dispatcher."""

    def dispatched():
        monkeypatch.setattr(eager, "_eager", lambda: False)

    return dispatched


def _inputs(*shapes, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad) for s in shapes]


def _run(fn, leaves, wanted=None):
    """``fn()``'s tensors and the gradients of a fixed random weighting of them w.r.t. the ``wanted``
    leaves (default: every leaf that requires grad), None where one gets none."""
    out = [t for t in _flat(fn()) if t is not None]
    wanted = [x for x in leaves if x.requires_grad] if wanted is None else wanted
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum()
               for t in out if t.requires_grad)
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ()
    return [t.detach() for t in out], list(grads)


def _flat(value):
    return [x for v in value for x in _flat(v)] if isinstance(value, (tuple, list)) else [value]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


@kernel
def _running_sum(x: Seq["D"], y: Out[Seq["D"]], s: State["D", 1] = None):
    for c in chunks(64):
        y[c] = x[c] * 2.0
        s = s + colsum(x[c]).T


_MIXER = ops.mixer(_running_sum, "tilemix_test::eager_running_sum", final_states=("s",))


def _cases():
    """(name, leaves, call) for ops of each kind of registration and argument."""
    q, k, v = _inputs((1, 70, 2, 16), (1, 70, 2, 16), (1, 70, 2, 16))
    state = _inputs((1, 2, 16, 16), seed=1)[0]
    a, b = _inputs((24, 16), (16, 40), seed=2)
    x, = _inputs((2, 70, 2, 16), seed=3)
    dt = torch.rand(2, 70, 2, dtype=torch.float64).add(0.1).requires_grad_()
    A = (-torch.rand(2, dtype=torch.float64) - 0.5).requires_grad_()
    B, C = _inputs((2, 70, 1, 16), (2, 70, 1, 16), seed=4)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    g_gate = (-torch.rand(1, 70, 2, 16, dtype=torch.float64)).requires_grad_()
    u, filt = _inputs((2, 64, 3), (3, 64), seed=5)
    return [
        ("gemm", [a, b], lambda: ops.gemm(a, b)),
        ("linear_attention states", [q, k, v, state],
         lambda: ops.linear_attention(q, k, v, 0.5, state, True)),
        ("linear_attention derived", [q, k, v], lambda: ops.linear_attention(q, k, v, backward="derived")),
        ("linear_attention cu_seqlens", [q, k, v],
         lambda: ops.linear_attention(q, k, v, output_final_state=True, cu_seqlens=cu)),
        ("ssd D=None", [x, dt, A, B, C], lambda: ops.ssd(x, dt, A, B, C, output_final_state=True)),
        ("attention causal", [q, k, v], lambda: ops.attention(q, k, v, causal=True)),
        ("gla", [q, k, v, g_gate], lambda: ops.gla(q, k, v, g_gate, exact=True)),
        ("mixer", [x], lambda: _MIXER(x=x)),
        ("long_conv", [u, filt], lambda: ops.long_conv(u, filt)),
    ]


@pytest.mark.parametrize("case", range(len(_cases())), ids=[c[0] for c in _cases()])
def test_eager_path_matches_the_custom_op_bitwise(case, through_dispatcher):
    """Outputs and gradients (every input, then each input alone) are the same tensors bit for bit
    on the fast path as through the dispatcher: the same function and backward, given the same
    arguments (defaults, ``ctx.needs_input_grad``)."""
    name, leaves, call = _cases()[case]
    patterns = [None] + [[leaf] for leaf in leaves]
    fast = [_run(call, leaves, wanted) for wanted in patterns]
    fn = call()
    assert any(type(t.grad_fn).__name__ == "_DifferentiableBackward" for t in _flat(fn) if t is not None)
    through_dispatcher()
    slow = [_run(call, leaves, wanted) for wanted in patterns]
    assert not any(type(t.grad_fn).__name__ == "_DifferentiableBackward" for t in _flat(call()) if t is not None)
    for (out_f, grad_f), (out_s, grad_s) in zip(fast, slow):
        _same(out_f, out_s)
        _same(grad_f, grad_s)


@pytest.mark.gpu
def test_gpu_eager_path_matches_the_custom_op_bitwise(through_dispatcher):
    """On CUDA (bf16, the generated kernels, the GPU machine's torch) too: outputs and gradients of
    a plain call equal the dispatcher's bit for bit (the kernels use no atomics: runs repeat)."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()

    q, k, v, x = (rnd(2, 100, 2, 64) for _ in range(4))
    a, b, B, C = rnd(200, 64), rnd(64, 128), rnd(2, 100, 1, 64), rnd(2, 100, 1, 64)
    dt = (torch.rand(2, 100, 2, device="cuda", generator=g) * 0.5 + 0.01).requires_grad_()
    A = (-torch.rand(2, device="cuda", generator=g) - 0.5).requires_grad_()
    state = torch.zeros(2, 2, 64, 64, device="cuda")
    cases = [([a, b], lambda: ops.gemm(a, b)),
             ([q, k, v], lambda: ops.linear_attention(q, k, v, output_final_state=True)),
             ([q, k, v], lambda: ops.attention(q, k, v, causal=True)),
             ([x, dt, A, B, C], lambda: ops.ssd(x, dt, A, B, C)),
             ([], lambda: ops.linear_attention_step(q[:, :1].detach(), k[:, :1].detach(), v[:, :1].detach(),
                                                    state.clone()))]
    fast = [_run(call, leaves) for leaves, call in cases]
    through_dispatcher()
    slow = [_run(call, leaves) for leaves, call in cases]
    for (out_f, grad_f), (out_s, grad_s) in zip(fast, slow):
        _same(out_f, out_s)
        _same(grad_f, grad_s)


def test_eager_path_needs_input_grad_per_input():
    """Only b requires grad: the backward is asked for db alone (``ctx.needs_input_grad``), a None
    gradient for a, as through the dispatcher."""
    a, = _inputs((24, 16), grad=False)
    b, = _inputs((16, 40), seed=1)
    calls = []
    real = gemm_op._backward_fn

    def spy(ctx, dc):
        calls.append(tuple(ctx.needs_input_grad))
        return real(ctx, dc)

    gemm_op._backward_fn = spy
    try:
        ops.gemm(a, b).sum().backward()
    finally:
        gemm_op._backward_fn = real
    assert calls == [(False, True)]
    assert a.grad is None and b.grad is not None


def test_eager_path_skips_the_dispatcher(monkeypatch):
    """A plain call, with and without gradients, never reaches the custom op's dispatcher entry."""

    def refused(*args, **kwargs):
        raise AssertionError("the dispatcher ran")

    for op in (gemm_op, gemm_nt_op, gemm_tn_op):
        monkeypatch.setattr(op, "_opoverload", refused)
    a, b = _inputs((24, 16), (16, 40))
    ops.gemm(a, b).sum().backward()
    with torch.no_grad():
        ops.gemm(a, b)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "function_mode", "dispatch_mode", "meta"])
def test_eager_path_outside_plain_calls(context):
    """Under a function or dispatch mode, or on meta tensors, the custom op runs (its fake kernel for
    meta tensors); under no_grad and inference_mode the fast path gives the forward alone."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Dispatched(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Called(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    a, b = _inputs((24, 16), (16, 40))
    expected = ops.gemm(a, b).detach()
    if context == "meta":
        out = ops.gemm(a.to("meta"), b.to("meta"))
        assert out.device.type == "meta" and out.shape == (24, 40)
        return
    managers = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "function_mode": Called,
                "dispatch_mode": Dispatched}
    with managers[context]():
        out = ops.gemm(a, b)
    assert torch.equal(out.detach(), expected)
    assert out.requires_grad == (context in ("function_mode", "dispatch_mode"))
    assert ("tilemix.gemm.default" in seen) == (context in ("function_mode", "dispatch_mode"))


def test_eager_path_decode_step_bumps_the_state_version(through_dispatcher):
    """A step updates its state in place and bumps its version counter as the custom op's
    ADInplaceOrView kernel does (so autograd sees the mutation), with the same output and state."""
    q, k, v = (t.detach() for t in _inputs((2, 1, 2, 16), (2, 1, 2, 16), (2, 1, 2, 16)))
    results = []
    for dispatched in (False, True):
        if dispatched:
            through_dispatcher()
        state = torch.ones(2, 2, 16, 16, dtype=torch.float64)
        before = state._version
        o = ops.linear_attention_step(q, k, v, state)
        results.append((o, state, state._version - before))
    (o_fast, s_fast, bump_fast), (o_slow, s_slow, bump_slow) = results
    assert torch.equal(o_fast, o_slow) and torch.equal(s_fast, s_slow)
    assert bump_fast == bump_slow >= 1


def test_eager_path_double_backward_refused_as_through_the_dispatcher(through_dispatcher):
    """gemm's backward ops have no backward of their own: a second derivative fails alike."""
    errors = []
    for dispatched in (False, True):
        if dispatched:
            through_dispatcher()
        a, b = _inputs((24, 16), (16, 40))
        da, = torch.autograd.grad(ops.gemm(a, b).sum(), a, create_graph=True)
        with pytest.raises(RuntimeError) as error:
            da.sum().backward()
        errors.append(str(error.value))
    assert errors[0] == errors[1] and "no autograd formula" in errors[0]


def test_eager_path_wrong_arguments_reach_the_dispatcher():
    """An argument of a type the schema does not take (a string for a tensor, a missing one) is
    the dispatcher's error, as before."""
    a, b = _inputs((24, 16), (16, 40), grad=False)
    with pytest.raises((TypeError, RuntimeError)):
        gemm_op(a, "b")
    with pytest.raises((TypeError, RuntimeError)):
        gemm_op(a)


def test_eager_path_leaves_autocast_ops_to_the_dispatcher():
    """An op given an autocast rule casts its inputs in the dispatcher: its calls keep going there."""
    op = eager.torch_custom_op("tilemix_test::scaled_for_autocast", lambda x: x * 2.0, schema="(Tensor x) -> Tensor")
    x, = _inputs((4, 4), grad=False)
    assert isinstance(op, eager.EagerOp) and not op._autocast
    op.register_autocast("cpu", torch.float32)

    def fast_path(args):
        raise AssertionError("the fast path ran")

    op._eager.arguments = fast_path  # what the fast path reads first
    assert torch.equal(op(x), x * 2.0)


def test_eager_path_needs_the_fields_it_reads(monkeypatch):
    """Where torch's CustomOpDef lacks a field the fast path reads (another torch release), the op
    is a plain custom op: every call through the dispatcher, never an AttributeError per call."""
    monkeypatch.setattr(eager, "_FIELDS", (*eager._FIELDS, "_a_field_no_torch_has"))
    op = eager.torch_custom_op("tilemix_test::doubled_plain", lambda x: x * 2.0, schema="(Tensor x) -> Tensor")
    x, = _inputs((4, 4), grad=False)
    assert type(op) is not eager.EagerOp and torch.equal(op(x), x * 2.0)
