"""The public runtime on the CPU: ``run`` runs any @kernel program on torch tensors, ``mixer`` makes a
forward program a torch function (a custom op: opcheck clean, torch.compile without graph breaks,
dynamic shapes) whose derived backward a registered one replaces."""

from __future__ import annotations

import pytest
import torch

from tilemix import ops, reference
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import Const, Out, Scalar, Seq, State, chunks, colsum, kernel


@kernel
def decayed_sum(x: Seq["D"], y: Out[Seq["D"]], s: State["D", 1] = None, decay: Scalar = 1.0,
                flip: Const = False):
    for c in chunks(64):
        y[c] = -x[c] if flip else x[c] * decay
        s = s * decay + colsum(x[c]).T


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_run_a_shipped_program():
    q, k, v = (_randn(1, 100, 2, 32, seed=i, dtype=torch.float64) for i in range(3))
    out = ops.run(ops.linear_attention_fwd, q=q, k=k, v=v, scale=0.5)
    assert set(out) == {"o", "s"} and out["o"].dtype == torch.float64
    o, s = reference.linear_attention(q, k, v, scale=0.5, output_final_state=True)
    assert rel_err(out["o"], o) <= 1e-12 and rel_err(out["s"], s) <= 1e-12


def test_run_a_user_program():
    from test_user_mixers import gla_fwd

    x = _randn(2, 130, 3, 16)
    out = ops.run(decayed_sum, x=x, decay=1.0)
    assert torch.equal(out["y"], x) and out["s"].shape == (2, 3, 16, 1)
    assert rel_err(out["s"][..., 0], x.double().sum(1).numpy()) <= bound(torch.float32)
    assert torch.equal(ops.run(decayed_sum, x=x, flip=True)["y"], -x)  # defaults fill the rest
    out = ops.run(gla_fwd, q=x, k=x, v=x, g=-x.abs())
    assert set(out) == {"o", "s"} and out["o"].shape == x.shape


def test_run_checks_its_arguments_by_name():
    x = _randn(1, 64, 1, 16)
    with pytest.raises(TypeError, match="kernel: expected a @kernel program"):
        ops.run(lambda x: x, x=x)
    with pytest.raises(TypeError, match=r"\['y'\] are outputs"):
        ops.run(decayed_sum, x=x, y=x)
    with pytest.raises(TypeError, match="x: expected a tensor, got ndarray"):
        ops.run(decayed_sum, x=x.numpy())
    with pytest.raises(TypeError, match="missing argument 'x'"):
        ops.run(decayed_sum)
    with pytest.raises(ValueError, match="s: expected shape"):
        ops.run(decayed_sum, x=x, s=torch.zeros(1, 1, 8, 1))
    with pytest.raises(NotImplementedError, match="mixer"):
        ops.run(decayed_sum, x=x.requires_grad_())


def test_mixer_returns_outputs_then_the_states_asked_for():
    x = _randn(2, 100, 2, 16)
    only = ops.mixer(decayed_sum, "tilemix_test::decayed_sum_y")
    assert torch.equal(only(x=x, decay=0.5), 0.5 * x)
    both = ops.mixer(decayed_sum, "tilemix_test::decayed_sum_ys", final_states=("s",))
    y, s = both(x=x, decay=0.5)
    want = ops.run(decayed_sum, x=x, decay=0.5)
    assert torch.equal(y, want["y"]) and torch.equal(s, want["s"])
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['y'\]; \['y'\] are outputs"):
        both(x=x, y=x)
    with pytest.raises(TypeError, match=r"missing argument\(s\) \['x'\]"):
        both(decay=0.5)


def test_mixer_is_a_clean_custom_op():
    m = ops.mixer(decayed_sum, "tilemix_test::decayed_sum_opcheck", final_states=("s",))
    x = _randn(1, 70, 2, 16)
    torch.library.opcheck(m.op, (x, torch.ones(1, 2, 16, 1), 0.9, False))  # schema, fake, AOT static and dynamic


def test_mixer_compiles_whole_with_dynamic_shapes():
    m = ops.mixer(decayed_sum, "tilemix_test::decayed_sum_compile", final_states=("s",))
    counts = []

    def backend(gm, inputs):  # counts the graphs: a graph break makes a second one
        counts.append(1)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(lambda x, d: [t * 2 for t in m(x=x, decay=d)], fullgraph=True, dynamic=True, backend=backend)
    for T in (70, 130, 200):
        x = _randn(1, T, 2, 16, seed=T)
        y, s = step(x, 0.5)
        want = m(x=x, decay=0.5)
        assert torch.equal(y, 2 * want[0]) and torch.equal(s, 2 * want[1])
    assert len(counts) == 1  # one graph for every length: T is symbolic


def test_a_registered_backward_replaces_the_derived_one():
    m = ops.mixer(decayed_sum, "tilemix_test::decayed_sum_grad")
    x = _randn(1, 64, 1, 16, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: m(x=x, decay=0.7), (x,))  # the derived backward

    def setup(ctx, inputs, output):
        ctx.decay = inputs[2]

    m.register_autograd(lambda ctx, dy: (m(x=dy, decay=3 * ctx.decay), None, None, None), setup_context=setup)
    m(x=x, decay=0.7).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.1))  # the registered one, wrong on purpose


@pytest.mark.parametrize("function", [ops.run, ops.mixer])
def test_docstring_examples(function):
    import doctest

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(function, globs={"torch": torch, function.__name__: function}):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted and not runner.summarize(verbose=False).failed


@pytest.mark.gpu
def test_gpu_run_and_mixer_match_the_interpreter():
    from test_user_mixers import gla_fwd

    q, k, v = (0.5 * _randn(2, 200, 3, 64, seed=i) for i in range(3))
    g = -0.05 * _randn(2, 200, 3, 64, seed=3).abs()
    cpu = ops.run(gla_fwd, q=q, k=k, v=v, g=g)
    cuda = {n: t.cuda().to(torch.bfloat16) for n, t in dict(q=q, k=k, v=v, g=g).items()}
    out = ops.run(gla_fwd, **cuda)
    assert out["o"].device.type == "cuda" and out["s"].dtype == torch.float32
    for name in ("o", "s"):
        assert rel_err(out[name].float().cpu(), cpu[name].double().numpy()) <= bound(torch.bfloat16)
    o, s = ops.mixer(gla_fwd, "tilemix_test::gla_gpu", final_states=("s",))(**cuda)
    assert torch.equal(o, out["o"]) and torch.equal(s, out["s"])
