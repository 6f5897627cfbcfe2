"""The ops as PyTorch custom ops: torch.library's own checks, meta tensors, torch.compile without
graph breaks (CPU; the same ops dispatch to the generated kernels on an H100)."""

from __future__ import annotations

import pytest
import torch

from tilemix import ops
from tilemix.tiles import Const, Out, Scalar, Seq, State, chunks, colsum, kernel

B, T, H, D = 1, 70, 2, 32


def _inputs():
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        gemm=(t(40, 24), t(24, 16)),
        attention=(t(B, T, H, D), t(B, T, H, D), t(B, T, H, D), True, 0.2),
        linear_attention=(t(B, T, H, D), t(B, T, H, D), t(B, T, H, D), 0.2, t(B, H, D, D), True),
        ssd=(t(B, T, H, D), torch.rand(B, T, H, generator=g), -torch.rand(H, generator=g), t(B, T, 1, D),
             t(B, T, 1, D), t(H), None, False),
    )


@pytest.mark.parametrize("name", ["gemm", "attention", "linear_attention", "ssd"])
def test_opcheck(name):
    op = getattr(torch.ops.tilemix, name).default
    torch.library.opcheck(op, _inputs()[name])  # schema, fake tensors, AOT dispatch static and dynamic


def test_meta_tensors_get_shapes_without_running():
    q = torch.empty(2, 5000, 4, 64, device="meta")
    o, state = ops.linear_attention(q, q, q, output_final_state=True)
    assert o.device.type == "meta" and o.shape == q.shape and state.shape == (2, 4, 64, 64)
    with pytest.raises(ValueError, match="k: expected shape"):
        ops.linear_attention(q, q[:, :10], q)


class Mixer(torch.nn.Module):
    """A toy block calling all four ops."""

    def forward(self, x, dt, A, b, w):
        y = ops.attention(x, x, x, causal=True)
        z, _ = ops.linear_attention(y, x, x)
        s, state = ops.ssd(z, dt, A, b, b, output_final_state=True)
        return ops.gemm(s.reshape(-1, s.shape[-1]), w), state


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, H, D, generator=g)
    args = (x, torch.rand(B, T, H, generator=g), -torch.rand(H, generator=g), torch.randn(B, T, 1, D, generator=g),
            torch.randn(D, 16, generator=g))
    model = Mixer()
    eager = model(*args)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)(*args)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


# -- training: the backward programs are custom ops too ----------------------------------------------
def _grad_inputs():
    g = torch.Generator().manual_seed(2)
    t = lambda *s: torch.randn(*s, generator=g, requires_grad=True)  # noqa: E731
    return dict(gemm=[(t(40, 24), t(24, 16))],
                linear_attention=[(t(B, T, H, D), t(B, T, H, D), t(B, T, H, D), 0.2, t(B, H, D, D), True),
                                  (t(B, T, H, D), t(B, T, H, D), t(B, T, H, D), 0.2, None, False)])


@pytest.mark.parametrize("name", ["gemm", "linear_attention"])
def test_opcheck_with_gradients(name):
    """opcheck with inputs that require grad also checks the autograd registration and traces the
    backward through AOT dispatch (fake tensors), which needs the backward programs to be ops."""
    for args in _grad_inputs()[name]:
        torch.library.opcheck(getattr(torch.ops.tilemix, name).default, args)


def _backward_op_inputs():
    g = torch.Generator().manual_seed(3)
    t = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    seq = lambda: t(B, T, H, D)  # noqa: E731
    return dict(
        gemm_nt=[(t(40, 24), t(16, 24))],
        gemm_tn=[(t(24, 40), t(24, 16))],
        linear_attention_bwd_dq=[(seq(), seq(), seq(), 0.2, t(B, H, D, D)), (seq(), seq(), seq(), 0.2, None)],
        linear_attention_bwd_dkdv=[(seq(), seq(), seq(), seq(), 0.2, t(B, H, D, D), True),
                                   (seq(), seq(), seq(), seq(), 0.2, None, False)])


@pytest.mark.parametrize("name", ["gemm_nt", "gemm_tn", "linear_attention_bwd_dq", "linear_attention_bwd_dkdv"])
def test_backward_ops_opcheck(name):
    for args in _backward_op_inputs()[name]:
        torch.library.opcheck(getattr(torch.ops.tilemix, name).default, args)


class TrainBlock(torch.nn.Module):
    """All four ops with gradients: gemm, causal attention, linear attention (with a carried state)
    and ssd (its A a parameter)."""

    def __init__(self, D, H):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.w_in = torch.nn.Parameter(torch.randn(D, D, generator=g) * D ** -0.5)
        self.w_out = torch.nn.Parameter(torch.randn(D, D, generator=g) * D ** -0.5)
        self.A = torch.nn.Parameter(-torch.rand(H, generator=g) - 0.1)

    def forward(self, x, s0, dt, A, b):
        h = ops.gemm(x.reshape(-1, x.shape[-1]), self.w_in).reshape(x.shape)
        y = ops.attention(h, x, x, causal=True)
        z, state = ops.linear_attention(y, h, x, initial_state=s0, output_final_state=True)
        s, _ = ops.ssd(z, dt, self.A + A, b, b)
        return ops.gemm((z + s).reshape(-1, z.shape[-1]), self.w_out), state


def _training_step(model, fn, x, s0, dt, A, b, do, ds):
    xs = [x.clone().requires_grad_(), s0.clone().requires_grad_()]
    out, state = fn(xs[0], xs[1], dt, A, b)
    grads = torch.autograd.grad((out * do).sum() + (state * ds).sum(), [*xs, *model.parameters()])
    return [out, state, *grads]


def _training_inputs(Bn, Tn, Hn, Dn, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, s0 = r(Bn, Tn, Hn, Dn).to(device, dtype), r(Bn, Hn, Dn, Dn).to(device)
    dt, A = torch.rand(Bn, Tn, Hn, generator=g).to(device), -torch.rand(Hn, generator=g).to(device)
    b = r(Bn, Tn, 1, Dn).to(device, dtype)
    return x, s0, dt, A, b, r(Bn * Tn * Hn, Dn).to(device, dtype), r(Bn, Hn, Dn, Dn).to(device)


@pytest.mark.parametrize("dynamic", [False, True])
def test_training_step_compiles_fullgraph(dynamic):
    """A compiled training step (AOT autograd traces the backward with fake tensors) has no graph
    break and gives eager's outputs and gradients exactly. (backend="inductor" on CPU matches too, but
    compiling its C++ takes ~20 s: the GPU test runs it.)"""
    inputs = _training_inputs(B, T, H, D)
    model = TrainBlock(D, H)
    eager = _training_step(model, model, *inputs)
    torch._dynamo.reset()
    compiled = _training_step(model, torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic),
                              *inputs)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_gpu_training_step_compiles_fullgraph(backend):
    """The same on an H100 (sm_90a kernels, bf16): compiled matches eager (inductor may fuse the
    elementwise adds of the gradients differently: within the bf16 bound)."""
    from tilemix.reference.tolerance import bound, rel_err

    inputs = _training_inputs(2, 200, 2, 64, "cuda", torch.bfloat16)
    model = TrainBlock(64, 2).cuda().bfloat16()
    model.A.data = model.A.data.float()  # ssd's A is float32
    eager = _training_step(model, model, *inputs)
    torch._dynamo.reset()
    compiled = _training_step(model, torch.compile(model, fullgraph=True, backend=backend), *inputs)
    for e, c in zip(eager, compiled):
        e, c = e.detach(), c.detach()  # the step's outputs require grad
        assert not c.isnan().any()
        assert rel_err(c.float().cpu(), e.double().cpu().numpy()) <= bound(torch.bfloat16)


# -- a user's own program as a custom op -------------------------------------------------
def test_custom_op_of_a_user_program():
    """ops.custom_op turns any @kernel into a torch op: the schema from its parameters (an
    optional initial state, a Scalar), outputs then final states returned, opcheck's checks pass,
    and torch.compile traces it whole."""
    import doctest

    from test_user_mixers import anticausal_la_fwd

    from tilemix.ops.runtime import run_kernel

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(ops.custom_op, globs={"torch": torch, "custom_op": ops.custom_op}):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    op = ops.custom_op(anticausal_la_fwd, "tilemix_test::anticausal_la")
    assert str(op._opoverload._schema) == ("tilemix_test::anticausal_la(Tensor q, Tensor k, Tensor v, Tensor? s=None, "
                                           "Tensor? cu_seqlens=None) -> (Tensor, Tensor)")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 100, 2, 16, generator=g) for _ in range(3))
    s0 = torch.randn(1, 2, 16, 16, generator=g)
    o, s = op(q, k, v, s0)
    want = run_kernel(anticausal_la_fwd, dict(q=q, k=k, v=v, s=s0))
    assert torch.equal(o, want["o"]) and torch.equal(s, want["s"])
    torch.library.opcheck(op._opoverload, (q, k, v, None))
    compiled = torch.compile(lambda *a: op(*a)[0] * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v, s0), 2 * o)


def test_custom_op_takes_a_backward():
    """register_autograd on the op custom_op returns: the backward calls the same program (y = x·a,
    so dx = dy·a); gradcheck in float64."""
    @kernel
    def scaled(x: Seq["D"], a: Scalar, y: Out[Seq["D"]]):
        for c in chunks(64):
            y[c] = x[c] * a

    op = ops.custom_op(scaled, "tilemix_test::scaled")

    def setup(ctx, inputs, output):
        ctx.a = inputs[1]

    op.register_autograd(lambda ctx, dy: (op(dy, ctx.a), None), setup_context=setup)
    x = torch.randn(1, 70, 2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: op(x, 0.7), (x,))


def test_custom_op_needs_typed_consts():
    @kernel
    def untyped(x: Seq["D"], mode: Const, y: Out[Seq["D"]]):
        for c in chunks(64):
            y[c] = x[c]

    with pytest.raises(TypeError, match="Const parameter 'mode' needs a default"):
        ops.custom_op(untyped)


def test_custom_op_takes_consts_and_optionals_at_their_defaults():
    """Trailing inputs with a default (an optional state, a Const) may be left out of the call."""
    @kernel
    def scaled_sum(x: Seq["D"], y: Out[Seq["D"]], s: State["D", 1] = None, factor: Const = 2.0,
                   negate: Const = False):
        for c in chunks(64):
            y[c] = x[c] * (-factor if negate else factor)
            s = s + colsum(x[c]).T

    op = ops.custom_op(scaled_sum, "tilemix_test::scaled_sum")
    assert str(op._opoverload._schema).endswith("(Tensor x, Tensor? s=None, float factor=2., bool negate=False, "
                                                "Tensor? cu_seqlens=None) -> (Tensor, Tensor)")
    x = torch.ones(1, 70, 2, 16)
    y, s = op(x)
    assert torch.equal(y, 2 * x) and torch.equal(s, torch.full((1, 2, 16, 1), 70.0))
    assert torch.equal(op(x, None, 3.0, True)[0], -3 * x)


def test_custom_op_returns_the_final_states_asked_for():
    @kernel
    def two_states(x: Seq["D"], y: Out[Seq["D"]], s: State["D", 1] = None, z: State["D", 1] = None):
        for c in chunks(64):
            y[c] = x[c]
            s = s + colsum(x[c]).T
            z = z + colsum(x[c] * x[c]).T

    x = torch.full((1, 64, 1, 16), 2.0)
    y = ops.custom_op(two_states, "tilemix_test::two_states_none", final_states=())(x)
    assert isinstance(y, torch.Tensor) and torch.equal(y, x)
    y, z = ops.custom_op(two_states, "tilemix_test::two_states_z", final_states=("z",))(x)
    assert torch.equal(z, torch.full((1, 1, 16, 1), 256.0))
    with pytest.raises(ValueError, match=r"final_states: \['w'\] are not states of two_states"):
        ops.custom_op(two_states, "tilemix_test::two_states_w", final_states=("w",))


def test_a_custom_op_name_is_registered_once():
    """torch accepts a second op of one name, and the first op object then corrupts memory: refused."""
    @kernel
    def copy(x: Seq["D"], y: Out[Seq["D"]]):
        for c in chunks(64):
            y[c] = x[c]

    ops.custom_op(copy, "tilemix_test::copy")
    with pytest.raises(ValueError, match="name: a torch op 'tilemix_test::copy' is already registered"):
        ops.custom_op(copy, "tilemix_test::copy")
