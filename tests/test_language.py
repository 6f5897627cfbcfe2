"""The language front end: tracing, the IR, and one test per verifier error.

Each error test checks the message and that it names the user's line — the
line of this file where the offending statement is.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from tilemix.tiles import (
    Const,
    Head,
    Out,
    Scalar,
    Seq,
    State,
    TensorSpec,
    TileError,
    blocks,
    cast,
    causal,
    chunks,
    colsum,
    cumsum,
    kernel,
    rowsum,
    verify,
    window,
    zeros,
)


def spec(*shape, dtype="float32"):
    return TensorSpec(tuple(shape), dtype)


def line_of(fn, text: str) -> int:
    """The line number of the first line in ``fn``'s source containing ``text``."""
    lines, start = inspect.getsourcelines(fn.fn if hasattr(fn, "fn") else fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def trace_error(program, target="cpu", **args) -> TileError:
    with pytest.raises(TileError) as info:
        program.trace(target=target, **args)
    return info.value


SEQ_ARGS = dict(q=spec(1, 100, 2, 32), k=spec(1, 100, 2, 32), v=spec(1, 100, 2, 32))


# -- one test per verifier error --------------------------------------------------
def test_error_shape_mismatch_in_matmul():
    @kernel
    def bad(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]]):
        for c in chunks(64):
            o[c] = (q[c] @ k[c]) @ v[c]  # 64x32 @ 64x32: inner dims differ

    err = trace_error(bad, q=spec(1, 100, 2, 32), k=spec(1, 100, 2, 32), v=spec(1, 100, 2, 48))
    assert "shape mismatch in @: 64x32 @ 64x32" in str(err)
    assert err.loc.line == line_of(bad, "inner dims differ")


def test_error_dim_not_multiple_of_16():
    @kernel
    def copy(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = q[c] * 2.0

    for arch in ("sm_90a", "sm_80"):  # tensor-core targets build tiles from 16x16 fragments
        err = trace_error(copy, target=arch, q=spec(1, 100, 2, 40))
        assert "dimension 40 is not a multiple of 16" in str(err)
        assert err.loc.line == line_of(copy, "o[c] = q[c]")
    q = np.random.default_rng(0).standard_normal((1, 100, 2, 40)).astype(np.float32)
    assert np.array_equal(copy(q=q)["o"], q * 2)  # the interpreter takes any size


def test_error_chunk_size_not_multiple_of_16():
    @kernel
    def copy(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(50):
            o[c] = q[c]

    err = trace_error(copy, q=spec(1, 100, 2, 32))
    assert "multiple of 16" in str(err) and err.loc.line == line_of(copy, "chunks(50)")


def test_error_unsupported_dtype_for_target():
    @kernel
    def scores(q: Seq["K"], k: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = causal(q[c] @ k[c].T) @ k[c]

    args = dict(q=spec(1, 100, 2, 32), k=spec(1, 100, 2, 32))
    scores.trace(target="cpu", **args)  # fp32 is fine for the interpreter
    err = trace_error(scores, target="sm_90a", **args)
    assert "unsupported dtype: sm_90a matmuls take f16 or bf16 operands" in str(err)
    assert err.loc.line == line_of(scores, "o[c] = causal")
    scores.trace(target="sm_90a", q=spec(1, 100, 2, 64, dtype="bfloat16"), k=spec(1, 100, 2, 64, dtype="bfloat16"))


def test_error_unsupported_dtype_in_cast():
    @kernel
    def narrow(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = cast(q[c], "int8")

    err = trace_error(narrow, q=spec(1, 64, 1, 32))
    assert "unsupported dtype 'int8'" in str(err) and err.loc.line == line_of(narrow, "cast(q[c]")


def test_error_unsupported_input_dtype_names_the_argument():
    @kernel
    def copy(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = q[c]

    with pytest.raises(TypeError, match="q: dtype int32 is not supported"):
        copy.trace(q=spec(1, 64, 1, 32, dtype="int32"))


def test_error_carried_tile_changes_shape():
    @kernel
    def grows(q: Seq["K"], o: Out[Seq["K"]]):
        acc = zeros(64, 1)
        for c in chunks(64):
            acc = q[c] * acc  # 64x1 becomes 64x32
            o[c] = acc

    err = trace_error(grows, q=spec(1, 100, 2, 32))
    assert "carried tile 'acc' changes shape: 64x1 before the loop, 64x32 after one iteration" in str(err)
    assert err.loc.line == line_of(grows, "for c in chunks")
    assert f"line {line_of(grows, 'becomes')}" in str(err)


def test_error_output_never_written():
    @kernel
    def forgets(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], s: State["K", "V"] = None):
        for c in chunks(64):
            s = s + k[c].T @ v[c]

    err = trace_error(forgets, **SEQ_ARGS)
    assert "output 'o' is never written" in str(err)
    assert err.loc.line == line_of(forgets, "def forgets")


def test_error_state_too_large_for_target():
    from tilemix.ops import linear_attention_fwd

    big = dict(q=spec(1, 64, 1, 256, dtype="bfloat16"), k=spec(1, 64, 1, 256, dtype="bfloat16"),
               v=spec(1, 64, 1, 256, dtype="bfloat16"), scale=1.0)
    linear_attention_fwd.trace(target="cpu", **big)  # the interpreter has no register budget
    err = trace_error(linear_attention_fwd, target="sm_90a", **big)
    assert "loop-carried state of 256 KiB (256x256 fp32) exceeds the sm_90a budget of 128 KiB" in str(err)
    assert err.loc.line == line_of(linear_attention_fwd, "for c in chunks")
    mid = {k: (spec(1, 64, 1, 128, dtype="bfloat16") if k != "scale" else v) for k, v in big.items()}
    linear_attention_fwd.trace(target="sm_90a", **mid)  # 64 KiB fits


# -- other front-end errors --------------------------------------------------------
def test_error_loop_value_used_after_loop():
    @kernel
    def leaks(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            t = q[c] * 2.0
            o[c] = t
        o[c] = t + 1.0

    err = trace_error(leaks, q=spec(1, 64, 1, 32))
    assert "computed inside the loop at line" in str(err) and err.loc.line == line_of(leaks, "t + 1.0")


def test_error_python_if_on_a_tile():
    @kernel
    def branches(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = q[c] if q[c] else q[c]

    err = trace_error(branches, q=spec(1, 64, 1, 32))
    assert "use where(cond, a, b)" in str(err)


def test_error_blocks_inside_chunks():
    @kernel
    def nested(q: Seq["K"], o: Out[Seq["K"]]):
        for _ in chunks(64):
            for i in blocks(64):
                o[i] = q[i]

    err = trace_error(nested, q=spec(1, 64, 1, 32))
    assert "cannot be nested inside a sequential chunks() loop" in str(err)


def test_error_break_in_loop():
    @kernel
    def stops(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = q[c]
            break

    err = trace_error(stops, q=spec(1, 64, 1, 32))
    assert "did not finish" in str(err)


def test_error_mask_needs_positions():
    @kernel
    def masks(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = causal(q[c].T @ q[c]) @ zeros(32, 32) + q[c]

    err = trace_error(masks, q=spec(1, 64, 1, 32))
    assert "causal() needs a tile whose rows are sequence positions" in str(err)


def test_error_store_shape():
    @kernel
    def wrong(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = rowsum(q[c])

    err = trace_error(wrong, q=spec(1, 64, 1, 32))
    assert "expected a 64x32 tile" in str(err) and err.loc.line == line_of(wrong, "rowsum")


def test_error_missing_annotation():
    with pytest.raises(TileError, match="needs an annotation"):
        @kernel
        def unannotated(q, o: Out[Seq["K"]]):
            pass


def test_error_argument_shapes_name_the_argument():
    from tilemix.ops import linear_attention_fwd

    with pytest.raises(ValueError, match=r"k: expected shape \[B, T, H, K\] = \[1, 100, 2, 32\]"):
        linear_attention_fwd.trace(q=spec(1, 100, 2, 32), k=spec(1, 100, 2, 16), v=spec(1, 100, 2, 32),
                                   scale=1.0)


# -- tracing and the IR ----------------------------------------------------------
def test_second_loop_rebinds_a_name_the_first_left_behind():
    """A name bound inside one loop and not carried out of it is free to bind again in a later loop
    (``qc = q[c]`` in each): the second loop carries nothing."""
    @kernel
    def twice(q: Seq["K"], o: Out[Seq["K"]], p: Out[Seq["K"]]):
        for c in chunks(64):
            qc = q[c] * 2.0
            o[c] = qc
        for c in chunks(64):
            qc = q[c] * 3.0
            p[c] = qc

    program = twice.trace(q=spec(1, 100, 2, 32))
    assert [len(op.carried) for op in program.body if op.name == "loop"] == [0, 0]


def test_carried_state_and_transpose_folding():
    from tilemix.ops import linear_attention_fwd

    program = linear_attention_fwd.trace(q=spec(1, 100, 2, 32), k=spec(1, 100, 2, 32), v=spec(1, 100, 2, 48),
                                         scale=1.0)
    text = str(program)
    loop = next(op for op in program.body if op.name == "loop")
    assert len(loop.carried) == 1 and loop.carried[0].type.shape == (32, 48)
    assert "transpose" not in text  # .T folded into the matmuls
    assert sum(op.name == "matmul" for op in program.walk()) == 4
    assert "store_state" in text and "compute f32" in text


def test_programs_are_cached_per_specialisation():
    from tilemix.ops import linear_attention_fwd

    a = linear_attention_fwd.trace(**SEQ_ARGS, scale=1.0)
    b = linear_attention_fwd.trace(q=spec(3, 7, 5, 32), k=spec(3, 7, 5, 32), v=spec(3, 7, 5, 32), scale=2.0)
    c = linear_attention_fwd.trace(q=spec(1, 100, 2, 64), k=spec(1, 100, 2, 64), v=spec(1, 100, 2, 32), scale=1.0)
    assert a is b  # runtime sizes and scalars do not retrace
    assert c is not a


def test_gpu_targets_verify_what_their_code_generator_lowers():
    """``trace(target=...)`` for a GPU target rejects, at the user's line, what the lowering would:
    the same message on sm_90a and sm_80; the interpreter takes it."""
    @kernel
    def narrow(q: Seq["K"], k: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = causal(q[c] @ k[c].T) @ k[c]

    @kernel
    def side_by_side(q: Seq["K"], o: Out[Seq["K"]], p: Out[Seq["K"]]):
        for c in blocks(64):
            o[c] = q[c] * 2.0
        for c in chunks(64):
            p[c] = q[c] * 3.0

    @kernel
    def turned(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = (q[c] * 2.0).T

    @kernel
    def staged(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = q[c] @ (zeros(32, 64).T @ zeros(32, 64))

    narrow_args = dict(q=spec(1, 100, 2, 32, dtype="bfloat16"), k=spec(1, 100, 2, 32, dtype="bfloat16"))
    wide = spec(1, 100, 2, 64, dtype="bfloat16")
    for program, args, words, line in ((narrow, narrow_args, "multiples of 64", "o[c] = causal"),
                                       (side_by_side, dict(q=wide), "around chunks() loops, one after another", None),
                                       (turned, dict(q=wide), "standalone transposes", "o[c] = (q[c]"),
                                       (staged, dict(q=wide), "register tile used as a shared matmul operand",
                                        "o[c] = q[c] @ (zeros")):
        program.trace(target="cpu", **args)
        for target in ("sm_90a", "sm_80"):
            err = trace_error(program, target=target, **args)
            assert f"{target} code generator: " in str(err) and words in str(err), err
            if line is not None:
                assert err.loc.line == line_of(program, line)


def test_verify_reruns_on_the_finished_program():
    from tilemix.ops import ssd_fwd

    args = dict(x=spec(1, 70, 2, 64, dtype="bfloat16"), dt=spec(1, 70, 2), A=spec(2), B=spec(1, 70, 1, 64,
                dtype="bfloat16"), C=spec(1, 70, 1, 64, dtype="bfloat16"))
    program = ssd_fwd.trace(target="sm_90a", **args)
    assert verify(program, "sm_80") is program


def test_interpreter_masks_partial_chunks_and_carries_state():
    @kernel
    def prefix_sum(x: Seq[1], w: Seq["K"], o: Out[Seq["K"]]):
        total = zeros(1, 1)
        for c in chunks(16):
            o[c] = w[c] * (cumsum(x[c]) + total)  # running sum over the whole sequence
            total = total + colsum(x[c])

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 40, 3)).astype(np.float32)  # 40 = two chunks and a partial one
    w = rng.standard_normal((2, 40, 3, 16)).astype(np.float32)
    out = prefix_sum(x=x, w=w)["o"]
    np.testing.assert_allclose(out, w * np.cumsum(x, axis=1)[..., None], rtol=1e-5, atol=1e-5)


def test_interpreter_runs_reverse_chunks_last_to_first():
    @kernel
    def suffix_sum(x: Seq[1], w: Seq["K"], o: Out[Seq["K"]]):
        total = zeros(1, 1)
        for c in chunks(16, reverse=True):
            o[c] = w[c] * (cumsum(x[c], reverse=True) + total)  # running sum from the end
            total = total + colsum(x[c])

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 40, 3)).astype(np.float32)  # the partial chunk runs first
    w = rng.standard_normal((2, 40, 3, 16)).astype(np.float32)
    assert "reverse" in str(suffix_sum.trace(x=x, w=w))
    out = suffix_sum(x=x, w=w)["o"]
    suffix = np.flip(np.cumsum(np.flip(x, 1), axis=1), 1)
    np.testing.assert_allclose(out, w * suffix[..., None], rtol=1e-5, atol=1e-5)


def test_error_reverse_chunks_with_a_bound():
    @kernel
    def bounded(x: Seq["K"], o: Out[Seq["K"]]):
        for i in blocks(64):
            for c in chunks(64, through=i, reverse=True):
                o[c] = x[c]

    err = trace_error(bounded, x=spec(1, 128, 1, 16))
    assert "reverse=True" in str(err) and "through=" in str(err)
    assert err.loc.line == line_of(bounded, "reverse=True")


def test_tiles_cannot_be_indexed():
    @kernel
    def sliced(q: Seq["K"], o: Out[Seq["K"]]):
        for c in chunks(64):
            o[c] = q[c][0]

    err = trace_error(sliced, q=spec(1, 64, 1, 32))
    assert "cannot be indexed" in str(err) and err.loc.line == line_of(sliced, "q[c][0]")


def test_const_and_scalar_parameters():
    @kernel
    def scaled(q: Seq["K"], alpha: Scalar, o: Out[Seq["K"]], twice: Const = False):
        for c in chunks(64):
            o[c] = q[c] * alpha * (2.0 if twice else 1.0)

    q = np.arange(2 * 70 * 3 * 16, dtype=np.float32).reshape(2, 70, 3, 16) / 100
    once = scaled(q=q, alpha=0.5)["o"]
    double = scaled(q=q, alpha=0.5, twice=True)["o"]
    np.testing.assert_allclose(once, q * 0.5, rtol=1e-6)
    np.testing.assert_allclose(double, q, rtol=1e-6)


def test_head_parameter_and_window_mask():
    @kernel
    def local(q: Seq["K"], k: Seq["K"], v: Seq["V"], g: Head[1], o: Out[Seq["V"]]):
        for c in chunks(32):
            o[c] = window(q[c] @ k[c].T, 2) @ v[c] * g

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 40, 2, 16)).astype(np.float32) for _ in range(3))
    g = np.array([1.0, -2.0], np.float32)
    out = local(q=q, k=k, v=v, g=g)["o"]
    expected = np.zeros_like(v)
    for t in range(40):
        for s in range(max(t - 1, (t // 32) * 32), t + 1):  # window of 2 within the chunk
            expected[:, t] += np.einsum("bh,bhv->bhv", np.einsum("bhk,bhk->bh", q[:, t], k[:, s]), v[:, s])
    expected *= g[None, None, :, None]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_chunks_start_transposed_causal_and_per_token_outputs():
    """``chunks(start=j)`` begins at the chunk holding block j's first row; ``causal(transposed=True)``
    keeps row <= column (keys on the rows); an ``Out[Seq[1]]`` is float32 whatever the inputs."""
    import torch

    from tilemix.ops.runtime import run_kernel
    from tilemix.tiles import in_seq

    @kernel
    def prog(q: Seq["K"], k: Seq["K"], later: Out[Seq[1]], seen: Out[Seq[1]]):
        for j in blocks(32):
            n, m = zeros(32, 1), zeros(32, 1)
            for i in chunks(16, start=j):
                st = k[j] @ q[i].T * 0.0 + 1.0
                n = n + rowsum(in_seq(causal(st, transposed=True)))  # queries at or after each key
                m = m + rowsum(st)  # 16 per chunk visited
            later[j] = n
            seen[j] = m

    T = 100
    x = torch.randn(1, T, 2, 16).bfloat16()
    out = run_kernel(prog, dict(q=x, k=x))
    t = torch.arange(T, dtype=torch.float32)[None, :, None].expand(1, T, 2)
    assert out["later"].dtype == torch.float32 and torch.equal(out["later"], T - t)
    chunks_visited = -(-T // 16) - (t // 32) * 2  # from block j's first chunk (2j) to the last
    assert torch.equal(out["seen"], 16 * chunks_visited)


def test_target_consts_name_const_parameters_of_known_targets():
    """``@kernel(target_consts=...)``: per-arch Const defaults, checked when the program is defined."""
    def program(v: Seq["V"], o: Out[Seq["V"]], chunk: Const = 64):
        for c in chunks(chunk):
            o[c] = v[c] * 2.0

    v = TensorSpec((1, 256, 1, 64), "bfloat16")
    assert kernel(target_consts={"sm_90": dict(chunk=128)})(program).consts_for("sm_90", dict(v=v)) == dict(chunk=128)
    assert kernel(target_consts={"sm_90": dict(chunk=128)})(program).consts_for("sm_90", dict(v=v, chunk=64)) == {}
    assert kernel(program).consts_for("sm_90", dict(v=v)) == {}
    with pytest.raises(TileError, match="'v', which is not one of its Const parameters"):
        kernel(target_consts={"sm_90": dict(v=1)})(program)
    with pytest.raises(ValueError, match="unknown target 'sm_70'"):
        kernel(target_consts={"sm_70": dict(chunk=128)})(program)


def test_matmuls_of_state_and_head_tiles_bind():
    """A program whose matmuls read only State and Head tiles binds and runs: it computes in its
    inputs' dtype (float32 here), and its tile output is in that dtype."""
    import torch

    from tilemix.ops.runtime import run_kernel

    @kernel
    def project(x: Seq[1], w: Head["D"], y: Out[Seq["D"]], s: State["D", "D"] = None):
        for c in chunks(64):
            y[c] = x[c] * (w @ s)

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 70, 3, generator=g), torch.randn(3, 32, generator=g)
    s = torch.randn(2, 3, 32, 32, generator=g)
    out = run_kernel(project, dict(x=x, w=w, s=s))
    expected = x[..., None] * torch.einsum("hd,bhde->bhe", w, s)[:, None]
    assert out["y"].dtype == torch.float32
    torch.testing.assert_close(out["y"], expected, rtol=1e-5, atol=1e-5)


def test_absent_state_needs_its_dims_sized():
    """A state whose dims no other input sizes cannot start from zeros of an unknown size: binding without
    it is a TypeError naming it; passed, it sizes them."""

    @kernel
    def read_state(x: Seq["K"], y: Out[Seq["K"]], s: State["K", "N"] = None):
        for c in chunks(64):
            y[c] = x[c] + rowsum(x[c] @ s)

    x = spec(1, 100, 2, 32)
    with pytest.raises(TypeError, match=r"^s: its dims \['N'\] are sized by no other input"):
        read_state.bind(dict(x=x))
    assert read_state.bind(dict(x=x, s=spec(1, 2, 32, 48))).sizes["N"] == 48


def test_kernel_defined_in_exec_code_whose_file_is_prose(tmp_path):
    """A ``@kernel`` exec'd under the name of a file that is not its source (a README section run
    as code) is defined, its errors at the ``def`` line: the prose does not tokenize as Python."""
    prose = tmp_path / "README.md"
    prose.write_text("A quote: it's here\n\nand a fence\n\"\"\"never closed\n")
    source = ("from tilemix.tiles import kernel, Seq, Out, chunks\n"
              "@kernel\n"
              "def copy(x: Seq['D'], y: Out[Seq['D']]):\n"
              "    for c in chunks(64):\n"
              "        y[c] = x[c]\n")
    scope: dict = {}
    exec(compile(source, str(prose), "exec"), scope)
    assert scope["copy"].loc.line == 2
