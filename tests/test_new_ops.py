"""The position, trigonometric, identity, strict-mask and equality ops: the interpreter against
float64 NumPy, their gradients (gradcheck), and their lowering for sm_90a and sm_80 (tensor-core
matmuls, no local memory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tilemix.tiles import (
    Head,
    Out,
    Seq,
    TensorSpec,
    TileError,
    causal,
    chunks,
    colsum,
    concat,
    cos,
    exp,
    eye,
    iota,
    kernel,
    linrec,
    outer,
    position,
    rowsum,
    sigmoid,
    sin,
    where,
    zeros,
)
from tilemix.tiles.autodiff import gradients


def _gradients_match_differences(program, inputs: dict[str, np.ndarray], seed: int = 0) -> None:
    """The derived gradients of a random projection of the outputs, along a random direction of the
    inputs, against central differences of the float64 interpreter."""
    rng = np.random.default_rng(seed)
    outputs = program(**inputs)
    weights = {n: rng.standard_normal(np.shape(v)) for n, v in outputs.items()}
    grads = gradients(program, inputs, weights, wrt=tuple(inputs))
    direction = {n: rng.standard_normal(v.shape) for n, v in inputs.items()}

    def loss(step):
        out = program(**{n: v + step * direction[n] for n, v in inputs.items()})
        return sum((out[n] * w).sum() for n, w in weights.items())
    want = (loss(1e-6) - loss(-1e-6)) / 2e-6
    got = sum((np.asarray(grads[n]) * direction[n]).sum() for n in inputs)
    assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (got, want)


@kernel
def rotary_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], o: Out[Seq["V"]], p: Out[Seq[1]]):
    """Rotary-style angles from positions, strictly causal scores plus half the identity, and
    per-row picks by equality with the row index."""
    for c in chunks(64):
        qc, kc, vc = q[c], k[c], v[c]
        angle = position(c) * exp(iota(1, q.cols, axis=1) * -0.1)
        qr = qc * cos(angle) - kc * sin(angle)
        kr = kc * cos(angle) + qc * sin(angle)
        scores = causal(qr @ kr.T, strict=True) + eye(64) * 0.5
        o[c] = scores @ vc
        p[c] = where(iota(64) == 3.0, rowsum(scores), where(iota(64) != 5.0, position(c), -1.0))


def _rotary_reference(q, k, v):
    """float64 NumPy: each 64-token chunk on its own (the program carries nothing)."""
    B, T, H, K = q.shape
    angle = np.arange(T)[:, None] * np.exp(-0.1 * np.arange(K))[None, :]
    qr = q * np.cos(angle)[:, None] - k * np.sin(angle)[:, None]
    kr = k * np.cos(angle)[:, None] + q * np.sin(angle)[:, None]
    o, p = np.zeros(v.shape), np.zeros((B, T, H))
    for t0 in range(0, T, 64):
        rows = slice(t0, min(t0 + 64, T))
        n = rows.stop - t0
        scores = np.tril(np.einsum("bthd,bshd->bhts", qr[:, rows], kr[:, rows]), -1) + 0.5 * np.eye(n)
        o[:, rows] = np.einsum("bhts,bshd->bthd", scores, v[:, rows])
        row = np.arange(n)
        pick = np.where(row == 5, -1.0, t0 + row)[None, :, None]
        p[:, rows] = np.where((row == 3)[None, :, None], scores.sum(-1).transpose(0, 2, 1), pick)
    return o, p


@given(B=st.integers(1, 2), T=st.integers(1, 300), H=st.integers(1, 2), K=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**16))
def test_new_ops_match_float64(B, T, H, K, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, H, K)) for _ in range(3))
    out = rotary_fwd(q=q, k=k, v=v)
    o, p = _rotary_reference(q, k, v)
    np.testing.assert_allclose(out["o"], o, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["p"], p, rtol=1e-12, atol=1e-12)


@kernel
def trig_fwd(x: Seq["D"], y: Seq["D"], o: Out[Seq["D"]]):
    for c in chunks(64):
        xc, yc = x[c], y[c]
        o[c] = (sin(xc) * cos(yc) + where(iota(64) == position(c), eye(64) @ xc, -xc)  # first chunk: xc
                + causal(xc @ yc.T, strict=True, transposed=True) @ yc)


def test_new_ops_gradcheck():
    """sin and cos carry gradients; positions, iota, eye and the comparisons are constants; the
    strict mask passes the gradient of the entries it keeps."""
    rng = np.random.default_rng(0)
    _gradients_match_differences(trig_fwd, {n: rng.standard_normal((2, 100, 2, 16)) for n in ("x", "y")})


@pytest.mark.parametrize("call, message", [
    (lambda c: iota(64, 1, axis=2), "iota(axis=2): axis must be 0 (rows) or 1 (columns)"),
    (lambda c: iota(0), "iota: dims must be positive ints"),
    (lambda c: eye(16.0), "eye: dims must be positive ints"),
    (lambda c: position(3), "position(c) takes a loop index, got int"),
])
def test_bad_arguments_are_named(call, message):
    @kernel
    def bad(x: Seq["D"], o: Out[Seq["D"]]):
        for c in chunks(64):
            o[c] = x[c] + call(c)

    with pytest.raises(TileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bad.trace(target="cpu", x=TensorSpec((1, 64, 1, 16), "float32"))


@kernel
def blocks_fwd(x: Seq["D"], y: Seq["D"], o: Out[Seq["D"]]):
    """Halves of the feature dim swapped and mixed (``D`` a multiple of 32)."""
    half = x.cols // 2
    for c in chunks(64):
        xc, yc = x[c], y[c]
        swapped = concat([xc[:, half:], xc[:, :half]], axis=1)
        o[c] = causal(swapped @ yc.T) @ concat([yc[:, :half] * 2.0, sin(yc[:, half:])])


def _blocks_reference(x, y):
    h = x.shape[-1] // 2
    swapped = np.concatenate([x[..., h:], x[..., :h]], -1)
    z = np.concatenate([y[..., :h] * 2, np.sin(y[..., h:])], -1)
    o = np.zeros(x.shape)
    for t0 in range(0, x.shape[1], 64):
        rows = slice(t0, t0 + 64)
        scores = np.tril(np.einsum("bthd,bshd->bhts", swapped[:, rows], y[:, rows]))
        o[:, rows] = np.einsum("bhts,bshd->bthd", scores, z[:, rows])
    return o


@given(B=st.integers(1, 2), T=st.integers(1, 200), H=st.integers(1, 2), D=st.sampled_from([32, 64, 96]),
       seed=st.integers(0, 2**16))
def test_slices_and_concat_match_float64(B, T, H, D, seed):
    rng = np.random.default_rng(seed)
    x, y = (rng.standard_normal((B, T, H, D)) for _ in range(2))
    np.testing.assert_allclose(blocks_fwd(x=x, y=y)["o"], _blocks_reference(x, y), rtol=1e-12, atol=1e-12)


@kernel
def row_blocks_fwd(x: Seq["D"], y: Seq["D"], o: Out[Seq["D"]]):
    """Row slices and a row concat (the chunk's halves swapped), a slice of a slice."""
    for c in chunks(64):
        xc, yc = x[c], y[c]
        top = xc[0:32] * yc[:, :][0:32]
        o[c] = concat([xc[32:64] + yc[32:], top], axis=0)


def test_row_slices_and_concat_match_float64():
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((2, 100, 2, 16)) for _ in range(2))
    want = np.zeros(x.shape)
    for t0 in range(0, 100, 64):
        xc, yc = (np.pad(a[:, t0:t0 + 64], ((0, 0), (0, 64 - len(a[0, t0:t0 + 64])), (0, 0), (0, 0))) for a in (x, y))
        chunk = np.concatenate([xc[:, 32:] + yc[:, 32:], xc[:, :32] * yc[:, :32]], 1)
        want[:, t0:t0 + 64] = chunk[:, :len(want[0, t0:t0 + 64])]
    np.testing.assert_allclose(row_blocks_fwd(x=x, y=y)["o"], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("program", [blocks_fwd, row_blocks_fwd], ids=lambda p: p.name)
def test_slices_and_concat_gradcheck(program):
    rng = np.random.default_rng(1)
    _gradients_match_differences(program, {n: rng.standard_normal((2, 100, 2, 32)) for n in ("x", "y")})


@pytest.mark.parametrize("call, message", [
    (lambda x: x[:, 8:24], "columns 8:24 do not start and end at multiples of 16"),
    (lambda x: x[0:64:2], "no step"),
    (lambda x: x[3], "cannot be indexed element by element"),
    (lambda x: x[:, 32:32], "empty range of columns"),
    (lambda x: concat([x, x[0:16]], axis=1), "the rows of 64x32, 16x32 differ"),
    (lambda x: concat([x], axis=2), "axis must be 0 (rows) or 1 (columns)"),
])
def test_bad_slices_and_concats_are_named(call, message):
    @kernel
    def bad(x: Seq["D"], o: Out[Seq["D"]]):
        for c in chunks(64):
            o[c] = call(x[c])

    with pytest.raises(TileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bad.trace(target="cpu", x=TensorSpec((1, 64, 1, 32), "float32"))


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_row_slices_below_a_register_block_are_refused_by_name(arch):
    """Register tiles split rows in blocks of 64 across warps: a 32-row slice is refused, naming
    the line, rather than miscompiled."""
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    from tilemix.codegen.schedule import default_source

    specs = {n: TensorSpec((2, 4096, 4, 64), "bfloat16") for n in ("x", "y")}
    binding = row_blocks_fwd.bind({**row_blocks_fwd.consts_for(arch, specs), **specs})
    with pytest.raises(TileError, match="slices of register tiles take rows in multiples of 64") as info:
        default_source(row_blocks_fwd, binding, arch)
    assert "top = xc[0:32]" in str(info.value)


@kernel
def selective_scan_fwd(a: Seq["D"], b: Seq["D"], g: Seq[1], o: Out[Seq["D"]], r: Out[Seq["D"]]):
    """A gated recurrence carried across chunks (``o``), and a reverse exclusive one within each
    chunk with a per-token decay broadcast over the columns (``r``)."""
    h = zeros(1, a.cols)
    for c in chunks(64):
        ac, bc = a[c], b[c]
        hs = linrec(sigmoid(ac), bc, h)
        o[c] = hs
        r[c] = linrec(exp(g[c]), bc * ac, 0.5, reverse=True, exclusive=True)
        h = hs[-1:]


def _selective_scan_reference(a, b, g):
    """float64 token loops."""
    B, T, H, D = a.shape
    o, r, h = np.zeros(a.shape), np.zeros(a.shape), np.zeros((B, H, D))
    for t in range(T):
        h = h / (1 + np.exp(-a[:, t])) + b[:, t]
        o[:, t] = h
    for t0 in range(0, T, 64):
        state = np.full((B, H, D), 0.5)
        for t in reversed(range(t0, t0 + 64)):
            if t < T:
                r[:, t] = state
            a_t, x_t = (np.exp(g[:, t])[..., None], (b * a)[:, t]) if t < T else (1.0, 0.0)
            state = a_t * state + x_t
    return o, r


@given(B=st.integers(1, 2), T=st.integers(1, 300), H=st.integers(1, 2), D=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**16))
def test_linrec_matches_float64(B, T, H, D, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal((B, T, H, D)) for _ in range(2))
    g = -rng.uniform(0, 1, (B, T, H))
    out = selective_scan_fwd(a=a, b=b, g=g)
    o, r = _selective_scan_reference(a, b, g)
    np.testing.assert_allclose(out["o"], o, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["r"], r, rtol=1e-10, atol=1e-12)


@kernel
def linrec_variants_fwd(a: Seq["D"], b: Seq["D"], o: Out[Seq["D"]]):
    """Every direction and exclusivity, each carried, so gradients cross chunks in each."""
    h1, h2, h3 = zeros(1, a.cols), zeros(1, a.cols), zeros(1, a.cols)
    for c in chunks(64):
        ac, bc = sigmoid(a[c]), b[c]
        x1 = linrec(ac, bc, h1, exclusive=True)
        x2 = linrec(ac, bc * bc, h2, reverse=True)
        x3 = linrec(rowsum(ac) * 0.05, bc, h3, reverse=True, exclusive=True)
        o[c] = x1 * x2 + x3
        h1, h2, h3 = x1[-1:] * ac[-1:] + bc[-1:], x2[0:1], x3[0:1]


@pytest.mark.parametrize("program", [selective_scan_fwd, linrec_variants_fwd], ids=lambda p: p.name)
def test_linrec_gradcheck(program):
    rng = np.random.default_rng(2)
    inputs = {n: rng.standard_normal((2, 100, 2, 16)) for n in ("a", "b")}
    if program is selective_scan_fwd:
        inputs["g"] = -rng.uniform(0, 1, (2, 100, 2))
    _gradients_match_differences(program, inputs)


@kernel
def scan_mix_fwd(a: Seq["D"], b: Seq["D"], q: Seq["D"], o: Out[Seq["D"]]):
    """A carried recurrence and a reverse exclusive one, beside a matmul."""
    h = zeros(1, a.cols)
    for c in chunks(64):
        decay, bc = sigmoid(a[c]), b[c]
        hs = linrec(decay, bc, h)
        o[c] = causal(q[c] @ bc.T) @ hs + linrec(decay, bc, 0.0, reverse=True, exclusive=True)
        h = hs[-1:]


@kernel
def based_fwd(q: Seq["F"], k: Seq["F"], v: Seq["V"], o: Out[Seq["V"]]):
    """Based's second-order feature map within each chunk, on 16 features:
    (q_t·k_s)² = outer(q, q)_t · outer(k, k)_s."""
    for c in chunks(64):
        qf, kf = q[c][:, 0:16], k[c][:, 0:16]
        o[c] = causal(outer(qf, qf) @ outer(kf, kf).T) @ v[c] + outer(qf, v[c][:, 0:16])[:, 0:v.cols]


def _based_reference(q, k, v):
    o = np.zeros(v.shape)
    for t0 in range(0, q.shape[1], 64):
        rows = slice(t0, t0 + 64)
        scores = np.tril(np.einsum("bthf,bshf->bhts", q[:, rows, :, :16], k[:, rows, :, :16]) ** 2)
        o[:, rows] = np.einsum("bhts,bshd->bthd", scores, v[:, rows])
    pairs = q[..., :16, None] * v[..., None, :16]
    return o + pairs.reshape(pairs.shape[:-2] + (256,))[..., :v.shape[-1]]


@given(B=st.integers(1, 2), T=st.integers(1, 200), H=st.integers(1, 2), F=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**16))
def test_outer_matches_float64(B, T, H, F, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, H, d)) for d in (F, F, 32))
    np.testing.assert_allclose(based_fwd(q=q, k=k, v=v)["o"], _based_reference(q, k, v), rtol=1e-10, atol=1e-10)


def test_outer_gradients_match_differences():
    rng = np.random.default_rng(4)
    inputs = {n: rng.standard_normal((2, 100, 2, d)) for n, d in (("q", 16), ("k", 16), ("v", 32))}
    _gradients_match_differences(based_fwd, inputs)


# the programs compiled, with the names of their Seq["D"] inputs
LOWERED = {rotary_fwd: "qkv", trig_fwd: "xy", blocks_fwd: "xy", scan_mix_fwd: "abq", based_fwd: "qkv"}


def _lowered_specs(program, B=2, T=4096, H=4, D=64) -> dict:
    return {n: TensorSpec((B, T, H, D), "bfloat16") for n in LOWERED[program]}


@pytest.mark.parametrize("arch, mma", [("sm_90a", "HGMMA"), ("sm_80", "HMMA")])
@pytest.mark.parametrize("program", LOWERED, ids=lambda p: p.name)
def test_new_ops_lower_with_tensor_cores_and_no_local_memory(program, arch, mma):
    """... and on sm_90a ptxas neither serialises the wgmmas (C7512, C7515) nor ignores the register
    split (C7508)."""
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    from tilemix.codegen.compile import compile_cuda, ptxas_report, resources, sass
    from tilemix.codegen.schedule import default_source

    specs = _lowered_specs(program)
    source = default_source(program, program.bind({**program.consts_for(arch, specs), **specs}), arch)
    binary = compile_cuda(source.source, arch, source.name)
    code, usage = sass(binary), resources(binary)
    assert mma in code
    assert "LDL" not in code and "STL" not in code and not usage["stack"] and not usage["local"], usage
    if arch == "sm_90a":
        report = ptxas_report(source.source, arch, source.name)
        assert "Used" in report and not any(c in report for c in ("C7512", "C7515", "C7508")), report


@pytest.mark.gpu
@pytest.mark.parametrize("program", LOWERED, ids=lambda p: p.name)
@pytest.mark.parametrize("T", [1, 100, 300])
def test_gpu_new_ops_match_interpreter(program, T, monkeypatch):
    from tilemix.ops.runtime import run_kernel
    from tilemix.reference.tolerance import bound, rel_err

    monkeypatch.setenv("TILEMIX_POISON", "1")
    gen = torch.Generator().manual_seed(T)
    args = {n: (0.5 * torch.randn(2, T, 3, 64, generator=gen)).to(torch.bfloat16) for n in LOWERED[program]}
    gpu = run_kernel(program, {n: t.cuda() for n, t in args.items()})
    cpu = run_kernel(program, args)
    for out in cpu:
        assert rel_err(gpu[out].cpu(), cpu[out].double().numpy()) <= bound(torch.bfloat16), out


@pytest.mark.parametrize("shape, picked, out", [((64, 32), dict(row0=63, rows=1, col0=0, cols=32), (1, 32)),
                                                ((64, 64), dict(row0=0, rows=64, col0=5, cols=1), (64, 1))],
                         ids=["carried row", "column"])
def test_gradient_of_a_row_or_column_pick_is_a_select_the_generators_lower(shape, picked, out):
    """``h[-1:]``'s and ``x[:, 5:6]``'s adjoints put the row or column back with a select on its index:
    a concat of zero rows or columns would not lower (register tiles join at 64-row and 8-column blocks)."""
    from tilemix.tiles.adjoints import ADJOINTS, Emitter
    from tilemix.tiles.ir import Op, Value
    from tilemix.tiles.types import TileType

    x = Value(TileType(*shape))
    op = Op("slice", (x,), picked, Value(TileType(*out)), None)
    em = Emitter()
    dx = ADJOINTS["slice"](em, op, Value(TileType(*out)))[0]()
    assert dx.type.shape == shape
    assert "concat" not in [o.name for o in em.ops] and "where" in [o.name for o in em.ops]


def test_outer_adjoint_matmuls_take_n_in_multiples_of_64():
    """The 0/1 picks that sum outer's products back to 16-wide operands are padded to 64 rows, the
    result sliced back: the code generators take no matmul of N = 16."""
    from tilemix.tiles.adjoints import ADJOINTS, Emitter
    from tilemix.tiles.ir import Op, Value
    from tilemix.tiles.types import DType, TileType

    x, y = Value(TileType(64, 16)), Value(TileType(64, 16))
    op = Op("outer", (x, y), {"operand_dtype": DType.bf16}, Value(TileType(64, 256)), None)
    em = Emitter()
    grads = [thunk() for thunk in ADJOINTS["outer"](em, op, Value(TileType(64, 256))).values()]
    assert [g.type.shape for g in grads] == [(64, 16), (64, 16)]
    assert all(o.result.type.cols % 64 == 0 for o in em.ops if o.name == "matmul")


@kernel
def column_picks_fwd(x: Seq["D"], y: Seq["D"], w: Head["D"], o: Out[Seq["D"]]):
    """Single columns picked from a loaded tile (read where it lies in shared memory), from a
    computed one (in registers) and from a head's row (loaded where read), each broadcast."""
    for c in chunks(64):
        xc, yc = x[c], y[c]
        s = sin(yc)
        o[c] = causal(xc @ yc.T) @ (yc * xc[:, 3:4]) + s[:, 17:18] * w[:, 5:6] + w[:, 16:32][:, 1:2]


def _column_picks_reference(x, y, w):
    o = np.zeros(x.shape)
    for t0 in range(0, x.shape[1], 64):
        rows = slice(t0, t0 + 64)
        xc, yc = x[:, rows], y[:, rows]
        scores = np.tril(np.einsum("bthd,bshd->bhts", xc, yc))
        o[:, rows] = np.einsum("bhts,bshd->bthd", scores, yc * xc[..., 3:4])
        o[:, rows] += np.sin(yc[..., 17:18]) * w[:, 5:6] + w[:, 17:18]
    return o


@given(B=st.integers(1, 2), T=st.integers(1, 150), H=st.integers(1, 2), D=st.sampled_from([32, 64]),
       seed=st.integers(0, 2**16))
def test_column_picks_match_float64(B, T, H, D, seed):
    rng = np.random.default_rng(seed)
    x, y = (rng.standard_normal((B, T, H, D)) for _ in range(2))
    w = rng.standard_normal((H, D))
    np.testing.assert_allclose(column_picks_fwd(x=x, y=y, w=w)["o"], _column_picks_reference(x, y, w),
                               rtol=1e-12, atol=1e-12)


def test_column_picks_gradients_match_differences():
    rng = np.random.default_rng(2)
    inputs = {n: rng.standard_normal((2, 100, 2, 32)) for n in ("x", "y")}
    _gradients_match_differences(column_picks_fwd, {**inputs, "w": rng.standard_normal((2, 32))})


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_column_picks_read_where_the_column_lies(arch):
    """A loaded tile's column is read from shared memory, a register tile's from the quad lane that
    holds it, and a head row read only in slices is loaded slice by slice where read, never whole."""
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    from tilemix.codegen.compile import compile_cuda, resources, sass
    from tilemix.codegen.schedule import default_source

    specs = {"x": TensorSpec((2, 4096, 4, 64), "bfloat16"), "y": TensorSpec((2, 4096, 4, 64), "bfloat16"),
             "w": TensorSpec((4, 64), "float32")}
    source = default_source(column_picks_fwd, column_picks_fwd.bind(specs), arch)
    text = source.source
    assert "tm::shared_tile" in text.split("tm::take_col<3>(")[1].split(";")[0]
    assert "tm::shared_tile" not in text.split("tm::take_col<17>(")[1].split(";")[0]
    assert text.count("tm::load_row_here(") == 2 and "tm::load_f32(" not in text
    binary = compile_cuda(text, arch, source.name)
    code, usage = sass(binary), resources(binary)
    assert "LDL" not in code and "STL" not in code and not usage["local_memory"], usage


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 100, 300])
def test_gpu_column_picks_match_interpreter(T, monkeypatch):
    from tilemix.ops.runtime import run_kernel
    from tilemix.reference.tolerance import bound, rel_err

    monkeypatch.setenv("TILEMIX_POISON", "1")
    gen = torch.Generator().manual_seed(T)
    args = {n: (0.5 * torch.randn(2, T, 3, 64, generator=gen)).to(torch.bfloat16) for n in ("x", "y")}
    args["w"] = torch.randn(3, 64, generator=gen)
    gpu = run_kernel(column_picks_fwd, {n: t.cuda() for n, t in args.items()})
    cpu = run_kernel(column_picks_fwd, args)
    assert rel_err(gpu["o"].cpu(), cpu["o"].double().numpy()) <= bound(torch.bfloat16)


def test_a_column_pick_of_part_of_the_rows_is_refused_by_name():
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    from tilemix.codegen.schedule import default_source

    @kernel
    def part(x: Seq["D"], o: Out[Seq["D"]]):
        for c in chunks(64):
            o[c] = x[c] * colsum(x[c][0:16, 3:4])

    specs = {"x": TensorSpec((2, 4096, 4, 64), "bfloat16")}
    with pytest.raises(TileError, match="a one-column slice takes every row"):
        default_source(part, part.bind(specs), "sm_90a")


@kernel
def scan_rows_fwd(a: Seq["D"], b: Seq["D"], o: Out[Seq["D"]]):
    """Rows a scan ends on (a forward scan's last, a reverse one's first) and rows it does not."""
    for c in chunks(64):
        ac, bc = sigmoid(a[c]), b[c]
        forward, backward, before = linrec(ac, bc, 0.0), linrec(ac, bc, 0.0, reverse=True), \
            linrec(ac, bc, 0.0, exclusive=True)
        o[c] = bc * (forward[63:64] + backward[0:1] + forward[0:1] + before[63:64])


def _scan_rows_reference(a, b):
    o = np.zeros(a.shape)
    for t0 in range(0, a.shape[1], 64):  # the last chunk padded with zeros, as loads past T read
        ac, bc = (np.pad(x[:, t0:t0 + 64], ((0, 0), (0, 64 - len(x[0, t0:t0 + 64])), (0, 0), (0, 0))) for x in (a, b))
        ac = 1 / (1 + np.exp(-ac))
        forward, backward, h, g = np.zeros(ac.shape), np.zeros(ac.shape), 0.0, 0.0
        for t in range(64):
            forward[:, t] = h = ac[:, t] * h + bc[:, t]
            backward[:, 63 - t] = g = ac[:, 63 - t] * g + bc[:, 63 - t]
        rows = (forward[:, 63] + backward[:, 0] + forward[:, 0] + forward[:, 62])[:, None]
        o[:, t0:t0 + 64] = (bc * rows)[:, :len(o[0, t0:t0 + 64])]
    return o


def test_scan_rows_match_float64():
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((2, 100, 2, 16)) for _ in range(2))
    np.testing.assert_allclose(scan_rows_fwd(a=a, b=b)["o"], _scan_rows_reference(a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_the_row_a_scan_ends_on_is_its_carry(arch):
    """Every thread holds a scan's state after its last row when it ends: that row (a recurrence's
    carried row) is taken from there, with no round through shared memory; other rows are taken
    from the warp that holds them."""
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    from tilemix.codegen.schedule import default_source

    specs = {n: TensorSpec((2, 4096, 4, 64), "bfloat16") for n in ("a", "b")}
    text = default_source(scan_rows_fwd, scan_rows_fwd.bind(specs), arch).source
    assert text.count("_carry);") == 2 and text.count("tm::take_row<") == 2
    assert "tm::take_row<0>" in text and "tm::take_row<63>" in text


@pytest.mark.gpu
def test_gpu_scan_rows_match_interpreter(monkeypatch):
    from tilemix.ops.runtime import run_kernel
    from tilemix.reference.tolerance import bound, rel_err

    monkeypatch.setenv("TILEMIX_POISON", "1")
    gen = torch.Generator().manual_seed(0)
    args = {n: (0.5 * torch.randn(2, 300, 3, 64, generator=gen)).to(torch.bfloat16) for n in ("a", "b")}
    gpu = run_kernel(scan_rows_fwd, {n: t.cuda() for n, t in args.items()})
    cpu = run_kernel(scan_rows_fwd, args)
    assert rel_err(gpu["o"].cpu(), cpu["o"].double().numpy()) <= bound(torch.bfloat16)
