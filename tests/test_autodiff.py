"""Derived backward programs (``tiles.autodiff``): float64 gradcheck of the derived backward against
the CPU interpreter's forward, agreement with the hand-written backward programs, and a clear error
where a program cannot be differentiated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_readme import _section_code
from test_user_mixers import anticausal_la_fwd, gla_fwd, normalized_la_fwd

from tilemix import ops
from tilemix.ops.attention import attention_fwd
from tilemix.ops.examples import example_specs
from tilemix.ops.gated import retention_fwd
from tilemix.ops.linear_attention import linear_attention_fwd
from tilemix.ops.ssd import ssd_fwd
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import (
    Head,
    Out,
    Scalar,
    Seq,
    State,
    TileError,
    blocks,
    cast,
    causal,
    chunks,
    colmax,
    colsum,
    cumsum,
    exp,
    exp2,
    full,
    in_seq,
    kernel,
    log,
    maximum,
    minimum,
    rowmax,
    rowsum,
    segsum,
    sigmoid,
    softplus,
    sqrt,
    tanh,
    trisolve,
    where,
    window,
)
from tilemix.tiles.adjoints import ADJOINTS, VALUE_FREE, Emitter
from tilemix.tiles.autodiff import derive_backward, gradient_groups, gradients
from tilemix.tiles.ir import Op, Value
from tilemix.tiles.types import Axis, TileType


class _Interpreted(torch.autograd.Function):
    """The interpreter's forward with the derived backward: what gradcheck differentiates. 0-d
    tensors stand for ``Scalar`` arguments."""

    @staticmethod
    def forward(ctx, program, fixed, names, *tensors):
        args = {**fixed, **{n: (float(t) if t.dim() == 0 else t.detach().numpy()) for n, t in zip(names, tensors)}}
        out = program(**args)
        ctx.program, ctx.args, ctx.names, ctx.outputs = program, args, names, list(out)
        return tuple(torch.from_numpy(np.array(a)) for a in out.values())

    @staticmethod
    def backward(ctx, *grads):
        given_grads = {n: g.numpy() for n, g in zip(ctx.outputs, grads)}
        g = gradients(ctx.program, ctx.args, given_grads, wrt=ctx.names)
        return (None, None, None, *(torch.from_numpy(np.asarray(g[n])) for n in ctx.names))


def _gradcheck(program, tensors: dict[str, torch.Tensor], **fixed) -> bool:
    names = tuple(tensors)
    xs = tuple(t.clone().requires_grad_() for t in tensors.values())
    # fast_mode: random directions (the full Jacobian would run the interpreter per input element)
    return torch.autograd.gradcheck(lambda *xs: _Interpreted.apply(program, fixed, names, *xs), xs, fast_mode=True)


def _gated_retention():
    """The README's "Your own mixer" program, as written there."""
    scope: dict = {}
    exec(compile(_section_code("Your own mixer")[0], "README.md", "exec"), scope)
    return scope["gated_retention_fwd"]


gated_retention_fwd = _gated_retention()


def _case(name: str, B: int, T: int, H: int, K: int, V: int, seed: int = 0):
    """(program, differentiable tensors, fixed arguments) for one mixer, float64."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    q, k, v, s = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V), randn(B, H, K, V)
    if name == "linear_attention":
        return linear_attention_fwd, dict(q=q, k=k, v=v, s=s), dict(scale=0.3)
    if name == "ssd":  # G < H, D, an initial state
        G = max(1, H // 2)
        return ssd_fwd, dict(x=randn(B, T, H, V), dt=0.1 + 0.4 * rand(B, T, H), A=-(0.5 + rand(H)),
                             B=randn(B, T, G, K), C=randn(B, T, G, K), D=randn(H), h=s), {}
    if name == "gla":
        return gla_fwd, dict(q=q, k=k, v=v, g=-0.1 * rand(B, T, H, K), s=s), {}
    if name == "normalized_la":  # positive features and normaliser state: no zero denominators
        return normalized_la_fwd, dict(q=0.3 * q, k=0.3 * k, v=v, s=s, z=1 + rand(B, H, K, 1)), {}
    if name == "anticausal_la":
        return anticausal_la_fwd, dict(q=q, k=k, v=v, s=s), {}
    if name == "gated_retention":
        return gated_retention_fwd, dict(q=q, k=k, v=v, g=-0.1 * rand(B, T, H), s=s), {}
    if name == "retention":  # the shipped program (its decays fixed): a scale and decays on do's way to matmuls
        log_gamma = (-0.05 - 0.2 * rand(H)).float().numpy()
        return retention_fwd, dict(q=q, k=k, v=v, s=s), dict(scale=0.3, log_gamma=log_gamma)
    raise ValueError(name)


MIXERS = ("linear_attention", "ssd", "gla", "normalized_la", "anticausal_la", "gated_retention", "retention")


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("T", [1, 64, 100])
def test_derived_backward_gradcheck(name, T):
    """Every input's gradient, the final state's gradient flowing in (the state is an output), the
    initial state's gradient; T = 100: a partial last chunk."""
    program, tensors, fixed = _case(name, B=2, T=T, H=2, K=16, V=32, seed=T)
    assert _gradcheck(program, tensors, **fixed)


@given(name=st.sampled_from(MIXERS), B=st.integers(1, 2), T=st.integers(1, 200), H=st.sampled_from([1, 2, 4]),
       K=st.sampled_from([16, 32]), V=st.sampled_from([16, 32]), seed=st.integers(0, 2**16),
       initial_states=st.booleans())
def test_derived_backward_gradcheck_any_shape(name, B, T, H, K, V, seed, initial_states):
    """(T = 0: gradcheck takes no empty inputs; test_empty_sequence_passes_the_state_gradient_through.)"""
    program, tensors, fixed = _case(name, B, T, H, K, V, seed)
    if not initial_states:  # the states start from zeros: no initial state's gradient
        tensors = {n: t for n, t in tensors.items() if program.specs[n].kind != "state"}
    assert _gradcheck(program, tensors, **fixed)


@pytest.mark.parametrize("name", MIXERS)
def test_bf16_derived_backward_within_bf16_bounds(name):
    """bfloat16 inputs, as a GPU runs them (matmul operands rounded, gradients written in bf16),
    emulated by the interpreter: within the bf16 bound of the float64 gradients."""
    program, tensors, fixed = _case(name, B=2, T=200, H=2, K=64, V=64, seed=3)
    exact_args = {**fixed, **{n: t.numpy() for n, t in tensors.items()}}
    gen = np.random.default_rng(0)
    cotangents = {n: gen.standard_normal(a.shape) for n, a in program(**exact_args).items()}
    exact = gradients(program, exact_args, cotangents)
    states = [n for n, spec in program.specs.items() if spec.kind == "state"]
    low = {**fixed, **{n: t.float() if n in states or not program.specs[n].is_tile_operand else t.bfloat16()
                       for n, t in tensors.items()}}
    binding = program.bind(low)
    backward = derive_backward(program, binding, cotangents)
    got = backward.run(binding, {n: (t.float().numpy() if isinstance(t, torch.Tensor) else t) for n, t in low.items()},
                       {n: c.astype(np.float32) for n, c in cotangents.items()})
    for n in tensors:  # not a fixed decay's (retention's): a sum over every token, K and V
        assert rel_err(torch.from_numpy(np.asarray(got[n], np.float64)), exact[n]) <= bound(torch.bfloat16), n


def test_empty_sequence_passes_the_state_gradient_through():
    program, tensors, fixed = _case("ssd", B=2, T=0, H=2, K=16, V=16)
    args = {**fixed, **{n: t.numpy() for n, t in tensors.items()}}
    dh = np.random.default_rng(0).standard_normal((2, 2, 16, 16))
    grads = gradients(program, args, dict(h=dh))
    assert np.array_equal(grads["h"], dh)
    assert grads["x"].shape == (2, 0, 2, 16) and np.array_equal(grads["A"], np.zeros(2))


def _torch_grads(forward, tensors: dict[str, torch.Tensor], cotangents: list[torch.Tensor]) -> dict:
    xs = {n: t.clone().requires_grad_() for n, t in tensors.items()}
    outs = forward(**xs)
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
    return dict(zip(xs, torch.autograd.grad(loss, list(xs.values()))))


def _derived_grads(program, tensors, fixed, cotangents: dict) -> dict:
    args = {**fixed, **{n: t.numpy() for n, t in tensors.items()}}
    return gradients(program, args, {n: c.numpy() for n, c in cotangents.items()})


@pytest.mark.parametrize("T", [1, 100, 200])
def test_linear_attention_derived_matches_hand_written(T):
    program, tensors, fixed = _case("linear_attention", B=2, T=T, H=3, K=32, V=16, seed=T)
    gen = torch.Generator().manual_seed(1)
    do, ds = torch.randn(2, T, 3, 16, generator=gen, dtype=torch.float64), torch.randn(2, 3, 32, 16, generator=gen,
                                                                                        dtype=torch.float64)
    hand = _torch_grads(lambda q, k, v, s: ops.linear_attention(q, k, v, fixed["scale"], s, output_final_state=True),
                        tensors, [do, ds])
    derived = _derived_grads(program, tensors, fixed, dict(o=do, s=ds))
    for name in tensors:
        assert np.allclose(derived[name], hand[name].numpy(), rtol=1e-10, atol=1e-11), name


@pytest.mark.parametrize("T", [1, 100, 200])
def test_ssd_derived_matches_hand_written(T):
    """G < H, D, an initial state and the final state's gradient; dB/dC summed over each group's heads,
    dA/dD over the batch."""
    program, tensors, fixed = _case("ssd", B=2, T=T, H=4, K=16, V=32, seed=T)
    gen = torch.Generator().manual_seed(2)
    dy, dh = torch.randn(2, T, 4, 32, generator=gen, dtype=torch.float64), torch.randn(2, 4, 16, 32, generator=gen,
                                                                                        dtype=torch.float64)
    hand = _torch_grads(lambda x, dt, A, B, C, D, h: ops.ssd(x, dt, A, B, C, D, h, output_final_state=True),
                        tensors, [dy, dh])
    derived = _derived_grads(program, tensors, fixed, dict(y=dy, h=dh))
    for name in tensors:
        assert derived[name].shape == tuple(tensors[name].shape), name
        assert np.allclose(derived[name], hand[name].numpy(), rtol=1e-9, atol=1e-10), name


def _column_block(program, name: str, array: np.ndarray, dim: str, block: slice) -> np.ndarray:
    """``array`` (parameter ``name``'s, or its gradient's) cut to ``block`` along ``dim``, if it has it."""
    layout = program.specs[name].layout
    return array[(slice(None),) * layout.index(dim) + (block,)] if dim in layout else array


@pytest.mark.parametrize("name, dim", [("linear_attention", "V"), ("ssd", "P"), ("gated_retention", "V")])
def test_derived_backward_splits_into_column_blocks(name, dim):
    """What a GPU needs at head dim 128 (the forward's column split): the backward derived from the
    forward traced at the block width, run on each block of the split dim, gives that block's share
    of the gradients; inputs without the dim sum the blocks' shares."""
    program, tensors, fixed = _case(name, B=2, T=100, H=2, K=16, V=32)
    args = {**fixed, **{n: t.numpy() for n, t in tensors.items()}}
    gen = np.random.default_rng(0)
    cotangents = {n: gen.standard_normal(a.shape) for n, a in program(**args).items()}
    whole = gradients(program, args, cotangents)
    shares = [gradients(program, {n: _column_block(program, n, a, dim, block) for n, a in args.items()},
                        {n: _column_block(program, n, c, dim, block) for n, c in cotangents.items()})
              for block in (slice(0, 16), slice(16, 32))]
    for n, g in whole.items():
        if dim in program.specs[n].layout:
            for share, block in zip(shares, (slice(0, 16), slice(16, 32))):
                assert np.allclose(share[n], _column_block(program, n, g, dim, block), rtol=1e-12, atol=1e-12), n
        else:
            assert np.allclose(shares[0][n] + shares[1][n], g, rtol=1e-10, atol=1e-12), n


@kernel
def every_op_fwd(x: Seq["D"], y: Seq["D"], w: Head["D"], a: Head[1], scale: Scalar, o: Out[Seq["D"]],
                 m: Out[Seq[1]], s: State["D", "D"] = None):
    """Every op with an adjoint rule but cast (rounding: see below); the Head and Scalar parameters
    also reach the loop through values computed before it (their gradients flow back through those
    ops after the loop)."""
    wa = sigmoid(w) * a * 2.0 - full(1, 1, 0.5)
    for c in chunks(64):
        xc, yc = x[c], y[c]
        p = sigmoid(xc) * tanh(yc) + softplus(xc) - exp2(yc * 0.5) / (2.0 + xc ** 2) + abs(xc - 0.1) * wa
        r = sqrt(1.0 + yc ** 3 * yc) + log(1.0 + xc * xc) - (-yc)
        decay = -softplus(rowsum(xc) * 0.1)  # a log decay per token
        scores = window(p @ r.T, 32) * exp(segsum(decay)) + in_seq(xc @ yc.T) * 0.01
        att = causal(maximum(scores, -0.5) + minimum(scores, 0.5) * scale, transposed=False)
        o[c] = (att @ yc + where(xc > 0, xc, yc * scale) + cumsum(xc, exclusive=True)
                + cumsum(yc, reverse=True) * colmax(r) + cumsum(xc, reverse=True, exclusive=True) + xc @ s)
        m[c] = rowmax(p) + rowsum(att) / (1.0 + exp(cumsum(decay)))
        s = s * exp(colsum(decay)) + (xc * exp(cumsum(decay, reverse=True, exclusive=True))).T @ (yc * wa)


@pytest.mark.parametrize("T", [1, 100])
def test_every_op_gradcheck(T):
    """Every adjoint rule, and Head (both shapes) and Scalar gradients, summed over the batch."""
    gen = torch.Generator().manual_seed(T)
    B, H, D = 2, 2, 16
    tensors = dict(x=torch.randn(B, T, H, D, generator=gen, dtype=torch.float64),
                   y=torch.randn(B, T, H, D, generator=gen, dtype=torch.float64),
                   w=torch.randn(H, D, generator=gen, dtype=torch.float64),
                   a=torch.randn(H, generator=gen, dtype=torch.float64),
                   scale=torch.tensor(0.7, dtype=torch.float64),
                   s=torch.randn(B, H, D, D, generator=gen, dtype=torch.float64))
    assert _gradcheck(every_op_fwd, tensors)


@kernel
def vector_products_fwd(x: Seq["D"], y: Seq["D"], w: Head["D"], o: Out[Seq["D"]], s: State["D", 1] = None):
    """Matmuls with a unit dim, in every orientation: their adjoints are elementwise products."""
    for c in chunks(64):
        xc, yc = x[c], y[c]
        col = xc @ w.T  # a matrix-vector product
        row = w @ yc.T  # a row-vector product
        o[c] = col @ w + row.T * yc + (xc.T @ col).T * xc + (row @ yc) * xc + (xc @ s) * yc  # outer, ...
        s = s + yc.T @ col


@pytest.mark.parametrize("T", [1, 100])
def test_vector_product_gradients_gradcheck(T):
    gen = torch.Generator().manual_seed(T)
    tensors = dict(x=torch.randn(2, T, 2, 16, generator=gen, dtype=torch.float64),
                   y=torch.randn(2, T, 2, 16, generator=gen, dtype=torch.float64),
                   w=torch.randn(2, 16, generator=gen, dtype=torch.float64),
                   s=torch.randn(2, 2, 16, 1, generator=gen, dtype=torch.float64))
    assert _gradcheck(vector_products_fwd, tensors)


@kernel
def masked_sums_fwd(x: Seq["D"], y: Seq["D"], o: Out[Seq["D"]]):
    """Masked scores reach the outputs only through row and column sums: the gradients coming back
    are vectors, which must be given the scores' positions before a mask can read them."""
    for c in chunks(64):
        xc, yc = x[c], y[c]
        scores = xc @ yc.T
        o[c] = rowsum(causal(scores)) * yc + colsum(window(scores, 16, transposed=True)).T * xc


@pytest.mark.parametrize("T", [1, 100])
def test_mask_gradients_from_vectors_gradcheck(T):
    gen = torch.Generator().manual_seed(T)
    tensors = {n: torch.randn(2, T, 2, 16, generator=gen, dtype=torch.float64) for n in ("x", "y")}
    assert _gradcheck(masked_sums_fwd, tensors)


@kernel
def cast_fwd(x: Seq["D"], y: Seq["D"], o: Out[Seq["D"]]):
    for c in chunks(64):
        o[c] = cast(x[c], "bf16") * y[c]


def test_cast_passes_the_gradient_straight_through():
    """Rounding has no useful derivative (finite differences see its steps): the gradient passes
    through ``cast`` unchanged, as through torch's ``.to()``."""
    gen = np.random.default_rng(0)
    x, y, do = (gen.standard_normal((1, 70, 2, 16)) for _ in range(3))
    grads = gradients(cast_fwd, dict(x=x, y=y), dict(o=do))
    assert np.array_equal(grads["x"], do * y)


@kernel
def ignores_inputs_fwd(q: Seq["K"], unused: Seq["K"], w: Head[1], o: Out[Seq["K"]]):
    for c in chunks(64):
        o[c] = q[c] * 2.0


def test_inputs_the_program_ignores_get_zero_gradients():
    gen = np.random.default_rng(0)
    q, unused, do = (gen.standard_normal((2, 70, 3, 16)) for _ in range(3))
    grads = gradients(ignores_inputs_fwd, dict(q=q, unused=unused, w=np.ones(3)), dict(o=do))
    assert np.array_equal(grads["q"], 2 * do)
    assert np.array_equal(grads["unused"], np.zeros_like(unused))
    assert np.array_equal(grads["w"], np.zeros(3))


@kernel
def stores_twice_fwd(x: Seq["D"], y: Seq["D"], o: Out[Seq["D"]]):
    for c in chunks(64):
        o[c] = x[c] * 3.0
        o[c] = y[c] * 2.0  # what the output holds: x's value is overwritten


def test_an_overwritten_store_gets_no_gradient():
    gen = np.random.default_rng(0)
    x, y, do = (gen.standard_normal((1, 70, 2, 16)) for _ in range(3))
    grads = gradients(stores_twice_fwd, dict(x=x, y=y), dict(o=do))
    assert np.array_equal(grads["x"], np.zeros_like(x)) and np.array_equal(grads["y"], 2 * do)


def test_wrt_picks_the_gradients_computed():
    program, tensors, fixed = _case("gla", B=1, T=70, H=2, K=16, V=16)
    args = {**fixed, **{n: t.numpy() for n, t in tensors.items()}}
    out = program(**args)
    everything = gradients(program, args, {"o": np.ones_like(out["o"])})
    only_g = gradients(program, args, {"o": np.ones_like(out["o"])}, wrt=["g"])
    assert list(only_g) == ["g"]
    assert np.array_equal(only_g["g"], everything["g"])
    backward = derive_backward(program, program.bind(args), ["o"], wrt=["g"])
    assert "d_q" not in {p.name for p in backward.reverse.params}


@pytest.mark.parametrize("name", MIXERS)
def test_one_gradient_at_a_time_equals_all_at_once(name):
    """The GPU runs one program per input gradient: each, forward-fused or reverse, gives the joint
    backward's gradient (float64, initial states and a ragged last chunk)."""
    program, tensors, fixed = _case(name, B=1, T=150, H=2, K=16, V=16, seed=3)
    args = {**fixed, **{n: t.numpy() for n, t in tensors.items()}}
    out = program(**args)
    rng = np.random.default_rng(0)
    seeds = {n: rng.standard_normal(np.shape(a)) for n, a in out.items()}
    everything = gradients(program, args, seeds)
    for name_ in tensors:
        alone = gradients(program, args, seeds, wrt=[name_])[name_]
        assert np.allclose(alone, everything[name_], rtol=1e-10, atol=1e-12), name_


def test_scalar_gradients_ride_in_a_program_reaching_their_values():
    """A per-token or per-head scalar whose adjoints another gradient's program computes anyway is
    written by that program (SSD's dA by dt's, dD by dx's); wide gradients keep a program each."""
    ssd = ops.PROGRAMS["ssd"]
    groups = gradient_groups(ssd, ssd.bind(example_specs("ssd", D=64)), ["x", "dt", "A", "B", "C", "D"])
    assert sorted(groups) == [("B",), ("C",), ("dt", "A"), ("x", "D")]
    assert gradient_groups(ssd, ssd.bind(example_specs("ssd", D=64)), ["A", "D"]) == [("A",), ("D",)]
    la = ops.PROGRAMS["linear_attention"]
    assert sorted(gradient_groups(la, la.bind(example_specs("linear_attention")), ["q", "k", "v"])) == [
        ("k",), ("q",), ("v",)]


def test_value_free_adjoints_read_no_forward_values():
    """The reverse recomputes no forward value for an op whose rule is in VALUE_FREE: each such rule
    emits no op that reads the forward op's operands or result."""
    tile, col, row = TileType(64, 64), TileType(64, 1), TileType(1, 64)
    chunk = Axis(0, 64, "T")  # segsum's rule masks by sequence position
    positions, scores = TileType(64, 1, row_axis=chunk), TileType(64, 64, row_axis=chunk, col_axis=chunk)
    cases = {"add": ([tile, tile], tile, {}), "sub": ([tile, tile], tile, {}), "neg": ([tile], tile, {}),
             "rowsum": ([tile], col, {}), "colsum": ([tile], row, {}), "cast": ([tile], tile, {}),
             "cumsum": ([col], col, {"reverse": False, "exclusive": True}), "segsum": ([positions], scores, {}),
             "transpose": ([col], row, {}), "slice": ([tile], col, {"row0": 0, "rows": 64, "col0": 3, "cols": 1}),
             "concat": ([col, col], TileType(64, 2), {"axis": 1})}
    assert set(cases) == VALUE_FREE
    for name, (operand_types, result_type, attrs) in cases.items():
        op = Op(name, tuple(Value(t) for t in operand_types), attrs, Value(result_type), None)
        em = Emitter()
        for thunk in ADJOINTS[name](em, op, Value(result_type)).values():
            thunk()
        forward = {*op.operands, op.result}
        assert not [o for o in em.ops if forward & set(o.operands)], name


def test_a_gradient_the_states_do_not_depend_on_reads_no_checkpoint():
    """Linear attention's dq needs each chunk's entering state only: it runs forward, recomputing
    the states, and no program reads (so none writes) checkpoints; dk and dv carry dS back alone.
    A decay's gradient needs both the states and their gradients: it reads them."""
    program, tensors, fixed = _case("linear_attention", B=1, T=150, H=1, K=16, V=16)
    binding = program.bind({**fixed, **{n: t.numpy() for n, t in tensors.items()}})
    for name, direction in (("q", False), ("k", True), ("v", True)):
        backward = derive_backward(program, binding, ["o", "s"], wrt=[name])
        (loop,) = [op for op in backward.reverse.body if op.name == "loop"]
        assert (backward.states, loop.reverse) == (None, direction), name
        assert not any(p.spec.kind == "chunk_state" for p in backward.reverse.params), name
    program, tensors, fixed = _case("gated_retention", B=1, T=150, H=1, K=16, V=16)
    binding = program.bind({**fixed, **{n: t.numpy() for n, t in tensors.items()}})
    assert derive_backward(program, binding, ["o", "s"], wrt=["g"]).states is not None


def test_derived_programs_are_chunk_loops_of_the_language():
    """A states program forward in time and a reverse one: the shape the code generator lowers."""
    program, tensors, fixed = _case("gated_retention", B=1, T=70, H=1, K=16, V=16)
    args = {**fixed, **{n: t.numpy() for n, t in tensors.items()}}
    binding = program.bind(args)
    backward = derive_backward(program, binding, ["o", "s"])
    (states_loop,) = [op for op in backward.states.body if op.name == "loop"]
    (reverse_loop,) = [op for op in backward.reverse.body if op.name == "loop"]
    assert (states_loop.kind, states_loop.reverse, reverse_loop.kind, reverse_loop.reverse) == (
        "chunks", False, "chunks", True)
    saved = backward.bindings(binding)[0].param("saved_0")  # the program's own: the first call's shapes
    assert (saved.spec.kind, saved.spec.output, saved.shape) == ("chunk_state", True, (1, 1, 2, 16, 16))


@kernel
def grid_solve_fwd(k: Seq["K"], v: Seq["V"], beta: Seq[1], w: Out[Seq["K"]], u: Out[Seq["V"]]):
    for c in blocks(64):  # independent blocks, as the delta rule's UT transform
        kc, bc = k[c], beta[c]
        a = causal(kc @ kc.T * bc, strict=True)
        w[c] = trisolve(a, kc * bc)
        u[c] = trisolve(a, v[c] * bc) * exp(cumsum(bc))


@pytest.mark.parametrize("T", [1, 64, 130])
def test_grid_program_gradcheck(T):
    """A ``blocks`` grid program (nothing carried) differentiates per block: no states program, a
    reverse grid of the same blocks, and gradients that pass float64 gradcheck."""
    rng = np.random.default_rng(T)
    tensors = dict(k=torch.tensor(rng.standard_normal((2, T, 2, 16)) * 0.3),
                   v=torch.tensor(rng.standard_normal((2, T, 2, 8))),
                   beta=torch.tensor(rng.uniform(0, 1, (2, T, 2))))
    assert _gradcheck(grid_solve_fwd, tensors)
    backward = derive_backward(grid_solve_fwd, grid_solve_fwd.bind({n: t.numpy() for n, t in tensors.items()}),
                               ["w", "u"])
    (loop,) = [op for op in backward.reverse.body if op.name == "loop"]
    assert backward.states is None and (loop.kind, loop.carried) == ("blocks", [])


@kernel
def grid_head_fwd(x: Seq["D"], gain: Head["D"], y: Out[Seq["D"]]):
    for c in blocks(64):
        y[c] = x[c] * gain


def test_grid_program_gradient_of_a_head_input_is_a_clear_error():
    args = dict(x=np.ones((1, 70, 2, 16)), gain=np.ones((2, 16)))
    binding = grid_head_fwd.bind(args)
    with pytest.raises(TileError, match="sequence inputs only, not of a head input"):
        derive_backward(grid_head_fwd, binding, ["y"], wrt=["gain"])
    assert np.array_equal(gradients(grid_head_fwd, args, dict(y=np.ones((1, 70, 2, 16))), wrt=["x"])["x"],
                          np.ones((1, 70, 2, 16)))


@kernel
def state_after_loop_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        o[c] = q[c] @ s
        s = s + k[c].T @ v[c]
    s = s * 0.5


@kernel
def two_loops_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        s = s + k[c].T @ v[c]
    for c in chunks(64):
        o[c] = q[c] @ s


@kernel
def d_named_fwd(q: Seq["K"], d_q: Seq["K"], o: Out[Seq["K"]]):
    for c in chunks(64):
        o[c] = q[c] @ (d_q[c].T @ q[c])


@pytest.mark.parametrize("program, message, line", [
    (attention_fwd, "blocks() grid", "for i in blocks(block)"),
    (state_after_loop_fwd, "after the chunks() loop", "s = s * 0.5"),
    (two_loops_fwd, "only one chunks() loop", "for c in chunks(64):"),
    (d_named_fwd, "'d_q' has the name the backward gives a gradient", "def d_named_fwd"),
])
def test_cannot_differentiate_is_a_clear_error(program, message, line):
    D = 16
    seq = np.zeros((1, 70, 1, D))
    args = dict(q=seq, k=seq, v=seq) if program is not d_named_fwd else dict(q=seq, d_q=seq)
    if program is attention_fwd:
        args["scale"] = 1.0
    with pytest.raises(TileError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        derive_backward(program, program.bind(args), ["o"])
    assert line in error.value.loc.source


def test_wrong_names_are_errors():
    program, tensors, fixed = _case("linear_attention", B=1, T=10, H=1, K=16, V=16)
    args = {**fixed, **{n: t.numpy() for n, t in tensors.items()}}
    binding = program.bind(args)
    with pytest.raises(ValueError, match="no parameter 'p'"):
        derive_backward(program, binding, ["o"], wrt=["p"])
    with pytest.raises(ValueError, match="'q' is neither an output nor a state"):
        derive_backward(program, binding, ["q"])
    with pytest.raises(ValueError, match="'o' is not a tensor or Scalar input"):
        derive_backward(program, binding, ["o"], wrt=["o"])


@kernel
def _transposed_state(x: Seq["D"], y: Out[Seq[1]], n: State["D", 1] = None):
    for c in chunks(64):
        y[c] = rowsum(x[c] * n.T)
        n = n + colsum(x[c]).T


def test_a_state_read_transposed_differentiates_in_float64():
    """The reverse program loads each chunk's saved state typed as the forward's carried value: typed
    as the float64 checkpoint, a transpose of it no longer matched its recomputed type."""
    gen = torch.Generator().manual_seed(0)
    tensors = dict(x=torch.randn(1, 70, 2, 16, generator=gen, dtype=torch.float64),
                   n=torch.randn(1, 2, 16, 1, generator=gen, dtype=torch.float64))
    assert _gradcheck(_transposed_state, tensors)
