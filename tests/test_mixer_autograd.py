"""A user's forward program trains in PyTorch with no hand-written backward: ``mixer(kernel)`` is
differentiable through the backward derived from the program (``tilemix.tiles.autodiff``), and the
shipped linear attention and SSD offer it beside their hand-written ones (``backward="derived"``).
CPU tensors: the interpreter."""

from __future__ import annotations

import pytest
import torch
from test_readme import _section_code
from test_user_mixers import anticausal_la_fwd, gla_fwd, normalized_la_fwd

from tilemix import ops
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import Out, Seq, TileError, blocks, chunks, colsum, kernel


def _gated_retention():
    """The README's "Your own mixer" program, as written there."""
    scope: dict = {}
    exec(compile(_section_code("Your own mixer")[0], "README.md", "exec"), scope)
    return scope["gated_retention_fwd"]


PROGRAMS = {"gla": gla_fwd, "normalized_la": normalized_la_fwd, "anticausal_la": anticausal_la_fwd,
            "gated_retention": _gated_retention()}
MIXERS = {name: ops.mixer(program, f"tilemix_test::{name}_autograd",
                          final_states=tuple(n for n, s in program.specs.items() if s.kind == "state"))
          for name, program in PROGRAMS.items()}


def _inputs(name: str, B=2, T=100, H=2, K=16, V=32, seed=0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Arguments of one mixer, initial states included (T = 100: a partial last chunk)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v, s = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V), randn(B, H, K, V)
    args = dict(q=q, k=k, v=v, s=s)
    if name == "gla":
        args["g"] = -0.1 * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
    if name == "gated_retention":
        args["g"] = -0.1 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    if name == "normalized_la":  # positive features and normaliser: no zero denominators
        args.update(q=0.3 * q, k=0.3 * k, z=1 + torch.rand(B, H, K, 1, generator=gen, dtype=torch.float64))
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # states are fp32 in low precision
    return {n: t.to(state_dtype if PROGRAMS[name].specs[n].kind == "state" else dtype) for n, t in args.items()}


@pytest.mark.parametrize("name", PROGRAMS)
def test_mixer_gradcheck(name):
    """Every input's gradient, the gradients of the output and of the final states returned, and the
    initial states' gradients, through the custom op."""
    args = {n: t.requires_grad_() for n, t in _inputs(name).items()}
    m = MIXERS[name]
    assert torch.autograd.gradcheck(lambda *xs: m(**dict(zip(args, xs))), tuple(args.values()), fast_mode=True)


def test_mixer_gradcheck_without_final_states():
    """Only the output returned: the initial state's gradient still flows back from it."""
    m = ops.mixer(anticausal_la_fwd, "tilemix_test::anticausal_la_output_only")
    args = {n: t.requires_grad_() for n, t in _inputs("anticausal_la", seed=4).items()}
    assert torch.autograd.gradcheck(lambda *xs: m(**dict(zip(args, xs))), tuple(args.values()), fast_mode=True)


def test_mixer_gradcheck_head_groupseq_and_scalar():
    """The shipped SSD program as a user's mixer: ``Head`` gradients (A, D) summed over the batch,
    ``GroupSeq`` ones (B, C, G < H) over each group's heads; and linear attention's ``Scalar``
    scale, a number, which gets no gradient."""
    gen = torch.Generator().manual_seed(1)
    Bn, T, H, G, N, P = 2, 100, 4, 2, 16, 32

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    ssd = ops.mixer(ops.ssd_fwd, "tilemix_test::ssd_autograd", final_states=("h",))
    args = dict(x=randn(Bn, T, H, P), dt=0.1 + 0.4 * torch.rand(Bn, T, H, generator=gen, dtype=torch.float64),
                A=-0.5 - torch.rand(H, generator=gen, dtype=torch.float64), B=randn(Bn, T, G, N),
                C=randn(Bn, T, G, N), D=randn(H), h=randn(Bn, H, N, P))
    args = {n: t.requires_grad_() for n, t in args.items()}
    assert torch.autograd.gradcheck(lambda *xs: ssd(**dict(zip(args, xs))), tuple(args.values()), fast_mode=True)

    la = ops.mixer(ops.linear_attention_fwd, "tilemix_test::la_autograd", final_states=("s",))
    qkv = tuple(randn(Bn, T, H, N).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: la(q=q, k=k, v=v, scale=0.3), qkv, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixer_gradients_in_low_precision(dtype):
    """As the forward does: float32 and 16-bit inputs run the interpreter (16-bit matmul operands
    rounded, as the GPU does); gradients come in the inputs' dtypes, within the dtype's bound of the
    float64 gradients."""
    m = MIXERS["gla"]
    exact = _inputs("gla", K=64, V=64, seed=2)
    low = _inputs("gla", K=64, V=64, seed=2, dtype=dtype)
    cotangents = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                  for i, t in enumerate(m(**exact))]

    def grads(args):
        xs = {n: t.clone().requires_grad_() for n, t in args.items()}
        loss = sum((o.double() * c).sum() for o, c in zip(m(**xs), cotangents))
        return dict(zip(xs, torch.autograd.grad(loss, list(xs.values()))))

    want, got = grads(exact), grads(low)
    for n, g in got.items():
        assert g.dtype == low[n].dtype, n
        assert rel_err(g, want[n].numpy()) <= bound(dtype), n


def test_only_inputs_that_require_grad_get_one():
    m = MIXERS["gated_retention"]
    args = _inputs("gated_retention")
    args["g"].requires_grad_()
    o, s = m(**args)
    o.sum().backward()
    assert args["g"].grad is not None and all(args[n].grad is None for n in ("q", "k", "v", "s"))


def test_empty_sequence_passes_the_final_state_gradient_to_the_initial_state():
    args = {n: t.requires_grad_() for n, t in _inputs("gla", T=0).items()}
    o, s = MIXERS["gla"](**args)
    ds = torch.randn_like(s)
    grads = dict(zip(args, torch.autograd.grad((s * ds).sum() + o.sum(), list(args.values()))))
    assert torch.equal(grads["s"], ds) and all(g.shape == args[n].shape for n, g in grads.items())


def test_autograd_registration():
    """opcheck with inputs that require grad: the autograd registration, and the backward traced
    through AOT dispatch with fake tensors (static and dynamic shapes); the backward op on its own."""
    m = MIXERS["gla"]
    args = _inputs("gla", B=1, T=70, seed=3)
    inputs = [args[n] for n in ("q", "k", "v", "g", "s")]  # the op's order: the program's (then scale)
    torch.library.opcheck(m.op, tuple(t.clone().requires_grad_() for t in inputs))
    torch.library.opcheck(m.op, (*(t.clone().requires_grad_() for t in inputs[:4]), None, 0.5))
    grads = [torch.randn_like(t) for t in m(**args)]
    backward = torch.ops.tilemix_test.gla_autograd_backward.default
    torch.library.opcheck(backward, (*inputs, 0.5, grads, [True, False, True, True, True]))
    torch.library.opcheck(backward, (*inputs, 1.0, [grads[0], None], [True] * 5))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_training_step_has_no_graph_break(dynamic):
    """torch.compile(fullgraph=True) of forward and backward (AOT autograd traces the derived
    backward's op): eager's outputs and gradients exactly, one graph for every length."""
    m = MIXERS["gated_retention"]

    def step(q, k, v, g, s):
        o, state = m(q=q, k=k, v=v, g=g, s=s)
        return (o * o).sum() + state.sum()

    graphs = []

    def backend(gm, example_inputs):  # aot_eager that counts graphs: a graph break makes another
        from torch._dynamo.backends.debugging import aot_eager

        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend=backend)
    for T in (70, 130):
        args = _inputs("gated_retention", B=1, T=T, seed=T, dtype=torch.float32)
        eager = {n: t.clone().requires_grad_() for n, t in args.items()}
        traced = {n: t.clone().requires_grad_() for n, t in args.items()}
        step(**eager).backward()
        loss = compiled(**traced)
        loss.backward()
        assert torch.equal(loss, step(**args))
        for n in args:
            assert torch.equal(traced[n].grad, eager[n].grad), n
    assert len(graphs) == (1 if dynamic else 2)


def _shipped_grads(op, tensors: dict[str, torch.Tensor], cotangents, **kwargs) -> list[torch.Tensor]:
    xs = {n: t.clone().requires_grad_() for n, t in tensors.items()}
    outs = [o for o in op(**xs, **kwargs) if o is not None]
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
    return outs + list(torch.autograd.grad(loss, list(xs.values())))


def _double(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("T", [1, 100, 200])
@pytest.mark.parametrize("final_state", [True, False])
def test_linear_attention_derived_backward_matches_hand_written(T, final_state):
    Bn, H, K, V = 2, 3, 32, 16
    tensors = dict(q=_double(Bn, T, H, K, seed=1), k=_double(Bn, T, H, K, seed=2), v=_double(Bn, T, H, V, seed=3),
                   initial_state=_double(Bn, H, K, V, seed=4))
    cotangents = [_double(Bn, T, H, V, seed=5), _double(Bn, H, K, V, seed=6)]
    kwargs = dict(scale=0.3, output_final_state=final_state)
    hand = _shipped_grads(ops.linear_attention, tensors, cotangents, **kwargs)
    derived = _shipped_grads(ops.linear_attention, tensors, cotangents, backward="derived", **kwargs)
    for name, h, d in zip(["o", "s"][:len(hand) - 4] + list(tensors), hand, derived):
        assert torch.allclose(d, h, rtol=1e-10, atol=1e-11), name


@pytest.mark.parametrize("T", [1, 100, 200])
def test_ssd_derived_backward_matches_hand_written(T):
    """G < H, D, an initial state and the final state's gradient."""
    Bn, H, G, N, P = 2, 4, 2, 16, 32
    tensors = dict(x=_double(Bn, T, H, P, seed=1), dt=0.1 + 0.4 * _double(Bn, T, H, seed=2).sigmoid(),
                   A=-0.5 - _double(H, seed=3).sigmoid(), B=_double(Bn, T, G, N, seed=4),
                   C=_double(Bn, T, G, N, seed=5), D=_double(H, seed=6), initial_state=_double(Bn, H, N, P, seed=7))
    cotangents = [_double(Bn, T, H, P, seed=8), _double(Bn, H, N, P, seed=9)]
    hand = _shipped_grads(ops.ssd, tensors, cotangents, output_final_state=True)
    derived = _shipped_grads(ops.ssd, tensors, cotangents, output_final_state=True, backward="derived")
    for name, h, d in zip(["y", "h", *tensors], hand, derived):
        assert torch.allclose(d, h, rtol=1e-9, atol=1e-10), name


def test_derived_ops_opcheck():
    """The shipped forwards with the derived backward are clean custom ops: autograd registration and
    the backward traced with fake tensors (what a compiled training step needs)."""
    Bn, T, H, D = 1, 70, 2, 16
    seq = lambda: _double(Bn, T, H, D, seed=T).float().requires_grad_()  # noqa: E731
    state = _double(Bn, H, D, D, seed=1).float().requires_grad_()
    torch.library.opcheck(torch.ops.tilemix.linear_attention_derived.default, (seq(), seq(), seq(), 0.2, state, True))
    dt, A = torch.rand(Bn, T, H).requires_grad_(), -torch.rand(H).requires_grad_()
    torch.library.opcheck(torch.ops.tilemix.ssd_derived.default,
                          (seq(), dt, A, seq()[:, :, :1], seq()[:, :, :1], torch.ones(H), state, False))


@pytest.mark.parametrize("op", [ops.linear_attention, ops.ssd])
@pytest.mark.parametrize("backward", ["derive", None, "Derived"])
def test_backward_argument_is_checked(op, backward):
    seq = torch.zeros(1, 8, 1, 16)
    args = (seq, seq, seq) if op is ops.linear_attention else (seq, torch.ones(1, 8, 1), -torch.ones(1), seq, seq)
    with pytest.raises(ValueError, match=r"backward: .* is not one of \('hand-written', 'derived'\)"):
        op(*args, backward=backward)


def test_program_it_cannot_differentiate_is_a_clear_error_at_backward():
    """The forward runs; the backward names the loop it cannot differentiate, never a wrong gradient:
    a grid of independent blocks differentiates, a grid with a loop inside does not."""
    @kernel
    def doubled(x: Seq["D"], y: Out[Seq["D"]]):
        for i in blocks(64):
            y[i] = x[i] * 2.0

    @kernel
    def prefix(x: Seq["D"], y: Out[Seq["D"]]):
        for i in blocks(64):
            total = colsum(x[i]) * 0.0
            for j in chunks(64, through=i):  # the blocks up to this one
                total = total + colsum(x[j])
            y[i] = x[i] * 0.0 + total

    x = torch.ones(1, 130, 1, 16, requires_grad=True)
    ops.mixer(doubled, "tilemix_test::doubled_blocks")(x=x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    x.grad = None
    y = ops.mixer(prefix, "tilemix_test::prefix_blocks")(x=x)
    assert torch.equal(y[0, 64:128], torch.full((64, 1, 16), 128.0))
    with pytest.raises(TileError, match="cannot differentiate prefix: a blocks"):
        y.sum().backward()
    assert x.grad is None


class GatedRetentionLayer(torch.nn.Module):
    """A layer a user writes around their program: projections in torch, the mixer a tile program."""

    def __init__(self, width: int, heads: int, mixer):
        super().__init__()
        self.heads, self.mixer = heads, mixer
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.gate = torch.nn.Linear(width, heads)
        self.out = torch.nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)
        g = torch.nn.functional.logsigmoid(self.gate(x))  # log decay per token and head
        o, _ = self.mixer(q=q, k=k, v=v, g=g)
        return self.out(o.flatten(2))


def test_a_layer_with_a_mixer_trains():
    torch.manual_seed(0)
    layer = GatedRetentionLayer(32, 2, MIXERS["gated_retention"])
    x = torch.randn(2, 80, 32)
    target = torch.roll(x, 1, dims=1)  # the previous token: needs the state
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.gpu
def test_gpu_derived_backward_within_bf16_bound():
    """CUDA tensors: the derived programs run as GPU kernels (``ops.derived_cuda``); bf16 gradients
    within the bf16 bound of the float64 ones."""
    m = MIXERS["gla"]
    exact = _inputs("gla", K=64, V=64, seed=3)
    low = {n: t.cuda() for n, t in _inputs("gla", K=64, V=64, seed=3, dtype=torch.bfloat16).items()}
    cotangents = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                  for i, t in enumerate(m(**exact))]

    def grads(args):
        xs = {n: t.clone().requires_grad_() for n, t in args.items()}
        loss = sum((o.double() * c.to(o.device)).sum() for o, c in zip(m(**xs), cotangents))
        return dict(zip(xs, torch.autograd.grad(loss, list(xs.values()))))

    want, got = grads(exact), grads(low)
    for n, g in got.items():
        assert g.is_cuda and g.dtype == low[n].dtype, n
        assert rel_err(g, want[n].numpy()) <= bound(torch.bfloat16), n
