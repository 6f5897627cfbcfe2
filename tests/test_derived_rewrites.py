"""Rewrites of derived programs: tiles carried transposed (``tiles.transpose_carried``: the same
gradients as the programs as derived, on the float64 interpreter, and a refusal where an op would
need a whole tile transposed), scalars moved out of matmul operands (``tiles.matmul_scalars``) and
carried values nothing reads dropped (``tiles.passes.drop_dead_carries``)."""

from __future__ import annotations

import numpy as np
import pytest
from test_autodiff import MIXERS, _case

from tilemix import ops
from tilemix.ops.examples import example_specs, kernel_specs
from tilemix.tiles import Out, Seq, State, chunks, kernel, rowsum
from tilemix.tiles.autodiff import derive_backward
from tilemix.tiles.ir import Loop
from tilemix.tiles.transpose_carried import transpose_carried


@pytest.mark.parametrize("name", MIXERS)
def test_transposed_programs_give_the_derived_gradients(name):
    """Each input's gradient alone (as the CUDA path derives them), with the output and final-state
    gradients given and a partial last chunk: transposed or not, the same values."""
    program, tensors, fixed = _case(name, B=2, T=100, H=2, K=16, V=32, seed=3)
    inputs = {**fixed, **{n: t.numpy() for n, t in tensors.items()}}
    binding = program.bind(inputs)
    rng = np.random.default_rng(0)
    grads = {n: rng.standard_normal(np.shape(a)) for n, a in program(**inputs).items()}
    for wrt in tensors:
        want = derive_backward(program, binding, grads, [wrt]).run(binding, inputs, grads)[wrt]
        turned = derive_backward(program, binding, grads, [wrt], transpose=True)
        got = turned.run(binding, inputs, grads)[wrt]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=f"{name} d{wrt} {turned.transposed}")


def test_linear_attention_gradients_carry_their_states_transposed():
    """dq carries the recomputed state transposed (declared ``s: State["V", "K"]``), dk and dv the
    state's gradient (``d_s``); a state a program never reads (dq's ``d_s``, dk's and dv's ``s``) is
    declared so too: their matmuls then contract no K column."""
    program = ops.PROGRAMS["linear_attention"]
    binding = program.bind(example_specs("linear_attention", D=64))
    for wrt in ("q", "k", "v"):
        backward = derive_backward(program, binding, ["o", "s"], [wrt], transpose=True)
        assert backward.transposed == ("d_s", "s"), wrt
        assert all(backward.reverse.param(name).spec.dims == ("V", "K") for name in ("d_s", "s")), wrt


def test_a_state_no_op_touches_leaves_the_carried_columns_to_split():
    """Without a final-state gradient, linear attention's dk program reads no state parameter: its
    unread initial state ``s``, left ``[K, V]``, named V (which dk contracts) as the state columns to
    cut, and dk ran as two host column blocks and a combine; declared ``[V, K]`` like the carried
    gradient, K splits inside each CTA as dq's does."""
    from tilemix.codegen.schedule import wide_columns
    from tilemix.ops.derived_cuda import backward_launches

    program = ops.PROGRAMS["linear_attention"]
    binding = program.bind(kernel_specs(program, {}, B=2, T=256, H=2, size=128))
    (name, derived, derived_binding), = backward_launches(program, binding, ["o"], ["k"], transpose=True)
    assert name == "k" and derived.transposed == ("s",)
    assert wide_columns(derived, derived_binding) == ("K",)


@kernel
def _row_normalised(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        o[c] = q[c] @ s
        s = s + k[c].T @ v[c] - rowsum(s)  # a row sum over the carried tile: no transposed form


def test_a_row_sum_over_the_carried_tile_is_not_transposed():
    binding = _row_normalised.bind(kernel_specs(_row_normalised, {"K": 64, "V": 64}, "float32", B=1, T=128, H=1))
    reverse = derive_backward(_row_normalised, binding, ["o"], ["q"]).reverse
    assert transpose_carried(reverse) is None
    assert derive_backward(_row_normalised, binding, ["o"], ["q"], transpose=True).transposed == ()


def test_scaled_gradients_reach_transposed_matmuls_unscaled():
    """Linear attention's ``o = (...) * scale``: the adjoint scales ``do``; the transposed programs'
    matmuls read ``do`` as loaded and scale their products (no fp32 copy of the scaled ``do``)."""
    program = ops.PROGRAMS["linear_attention"]
    binding = program.bind(example_specs("linear_attention", D=64))
    for wrt in ("q", "k", "v"):
        reverse = derive_backward(program, binding, ["o"], [wrt], transpose=True).reverse
        made = {op.result: op for op in reverse.walk() if op.result is not None}
        for op in reverse.walk():
            if op.name == "matmul":
                assert all(made[x].name != "mul" for x in op.operands if x in made), (wrt, op)


def test_decayed_gradients_reach_transposed_matmuls_unscaled():
    """Retention's adjoint scales ``do`` by ``scale``, then by each token's decay for the state's
    matmul. Transposed, dq's matmuls read ``do`` as loaded (both factors scale their products: the
    decay scales the product's rows); dk's state matmul contracts the tokens, so the decay stays on
    its operand, and takes ``scale`` with it (no 64-wide fp32 ``do·scale`` tile in either)."""
    program = ops.retention_fwd
    binding = program.bind(kernel_specs(program, size=128))
    for wrt in ("q", "k"):
        reverse = derive_backward(program, binding, ["o"], [wrt], transpose=True).reverse
        made = {op.result: op for op in reverse.walk() if op.result is not None}
        do, = [op.result for op in reverse.walk() if op.name == "load" and op.attrs["param"] == "d_o"]
        scaled = [made[x] for op in reverse.walk() if op.name == "matmul" for x in op.operands
                  if x in made and made[x].name == "mul" and do in made[x].operands]
        assert not any(o.type.rows == o.type.cols == 1 for op in scaled for o in op.operands), wrt
        assert len(scaled) == (wrt == "k"), wrt


def _chain(*, loop_reads: bool):
    """``matmul(x·r1·r2, y)`` on hand-built IR (``x`` loaded, ``r1``, ``r2`` per-row vectors), with
    ``x·r1`` also read inside a loop when ``loop_reads``."""
    from tilemix.tiles.ir import Op, Value
    from tilemix.tiles.types import DType, Space, TileType

    tile, vector = TileType(64, 64, DType.f32), TileType(64, 1, DType.f32)
    x, y = Value(TileType(64, 64, DType.bf16, Space.shared)), Value(TileType(64, 64, DType.bf16, Space.shared))
    r1, r2, once, twice, product = Value(vector), Value(vector), Value(tile), Value(tile), Value(tile)
    body = [Op("mul", (x, r1), {}, once, None), Op("mul", (once, r2), {}, twice, None),
            Op("matmul", (twice, y), {}, product, None)]
    if loop_reads:
        inner = Op("mul", (once, once), {}, Value(tile), None)
        body.append(Loop("loop", (), {}, None, None, body=[inner]))
    return body, x


@pytest.mark.parametrize("loop_reads", [False, True])
def test_a_chain_of_row_scalings_goes_only_where_nothing_else_reads_it(loop_reads):
    """``(x·r1)·r2`` read by one matmul (its rows scaled): the matmul reads ``x`` and both vectors
    scale its product; neither scaled copy is left. Where a loop reads ``x·r1`` too, it stays for
    the loop (the matmul still reads ``x``)."""
    from tilemix.tiles.matmul_scalars import scalars_after_matmuls

    body, x = _chain(loop_reads=loop_reads)
    scalars_after_matmuls(body)
    matmul, = [op for op in body if op.name == "matmul"]
    scaled = [op for op in body if op.name == "mul" and op.result.type.shape == (64, 64) and x in op.operands]
    assert matmul.operands[0] is x
    assert len(scaled) == loop_reads


def test_a_gradient_that_reads_no_state_carries_none():
    """SSD's dD sums ``dy · x``: its program (forward-fused) no longer carries the recurrence's state
    beside that sum, nor computes it."""
    program = ops.PROGRAMS["ssd"]
    binding = program.bind(example_specs("ssd", D=64))
    reverse = derive_backward(program, binding, ["y", "h"], ["D"]).reverse
    loop, = [op for op in reverse.body if isinstance(op, Loop)]
    assert [c.type.shape for c in loop.carried] == [(1, 1)]
    assert not any(op.name == "matmul" for op in reverse.walk())
