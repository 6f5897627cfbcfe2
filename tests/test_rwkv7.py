"""rwkv7 (ops/rwkv7.py): against the float64 token loop (tilemix.reference.rwkv7), the range of its
factorised decay, state round trips, float64 gradcheck of the derived backward, argument errors, the
layer, and the prepare and scan programs (and their derived backwards) compiled for sm_90a and sm_80."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compile_checks import MMA, check_compiled, has_wide_matmul
from hypothesis import given
from hypothesis import strategies as st
from test_delta_rule import correlated_keys

from tilemix.ops import RWKV7TimeMix, rwkv7, rwkv7_prepare, rwkv7_prepare_output, rwkv7_scan
from tilemix.ops.examples import kernel_specs
from tilemix.reference import rwkv7 as reference
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles.errors import ResourceError

NAMES = ("r", "w", "k", "v", "a", "b")


def _inputs(B, T, H, K, V, seed, max_decay=0.6, cosine=0.5, dtype=torch.float64):
    """Keyword inputs as an RWKV-7 layer makes them: r and k of about unit norm, log decays uniform in
    [-max_decay, 0] per step (RWKV-7's own: down to -exp(-0.5)), ``a = -κ̂``, ``b = κ̂ ⊙ η`` for unit
    removal keys κ̂ of pairwise cosine about ``cosine`` and rates η in (0, 1); and an initial state."""
    rng = np.random.default_rng(seed)
    removal = correlated_keys(rng, B, T, H, K, cosine)
    args = dict(r=rng.standard_normal((B, T, H, K)) * K ** -0.5, w=-max_decay * rng.uniform(0, 1, (B, T, H, K)),
                k=rng.standard_normal((B, T, H, K)) * K ** -0.5, v=rng.standard_normal((B, T, H, V)),
                a=-removal, b=removal * rng.uniform(0, 1, (B, T, H, K)))
    state = rng.standard_normal((B, H, K, V))
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return {n: torch.tensor(x, dtype=dtype) for n, x in args.items()}, torch.tensor(state, dtype=state_dtype)


@given(B=st.integers(1, 2), T=st.integers(1, 300), H=st.integers(1, 2), K=st.sampled_from([16, 32, 64, 128]),
       V=st.sampled_from([16, 64]), with_state=st.booleans(), seed=st.integers(0, 2**16),
       max_decay=st.sampled_from([1e-3, 0.1, 0.6, 1.3]))
def test_matches_float64_token_loop(B, T, H, K, V, with_state, seed, max_decay):
    """Decays per step down to -1.3: a 64-token chunk's cumulative log decay stays above -88."""
    args, state = _inputs(B, T, H, K, V, seed, max_decay)
    state = state if with_state else None
    o, final = rwkv7(**args, scale=0.3, initial_state=state, output_final_state=True)
    want_o, want_final = reference(**args, scale=0.3, initial_state=state, output_final_state=True)
    np.testing.assert_allclose(o.numpy(), want_o, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(final.numpy(), want_final, rtol=1e-9, atol=1e-9)


def _fp32_error(T, K, max_decay, cosine=0.5):
    """The fp32 op's relative errors (output, final state) against float64 on the same fp32 values."""
    args, state = _inputs(1, T, 2, K, K, seed=K + T, max_decay=max_decay, cosine=cosine, dtype=torch.float32)
    o, final = rwkv7(**args, initial_state=state, output_final_state=True)
    want_o, want_final = reference(**args, initial_state=state, output_final_state=True)
    return rel_err(o, want_o), rel_err(final, want_final)


@pytest.mark.parametrize("K", [16, 64, 128])
@pytest.mark.parametrize("T", [63, 300])
def test_fp32_within_its_bound_with_removal_keys_of_cosine_098(K, T):
    """The delta rules' stress input (removal keys of pairwise cosine 0.98) at RWKV-7's decays."""
    assert max(_fp32_error(T, K, max_decay=0.6, cosine=0.98)) <= bound(torch.float32)


@pytest.mark.parametrize("max_decay", [1.3, 2.0])
def test_fp32_exact_within_the_exponent_range(max_decay):
    """Decays per step uniform in [-2, 0]: a chunk's cumulative log decay reaches about -64, exp(-G)
    about 6e27, still exact."""
    assert max(_fp32_error(200, 64, max_decay)) <= bound(torch.float32)


@pytest.mark.xfail(strict=True, reason="rwkv7's programs factorise the in-chunk decay as exp(G_i)·exp(-G_j), as "
                   "gla_fwd does: a cumulative log decay below about -88 within a 64-token chunk overflows fp32's "
                   "exp(-G) (measured at T = 128, K = 64: decays uniform in [-2, 0] per step hold to 8e-7; "
                   "[-2.5, 0] and stronger make every output non-finite, the state carrying the first chunk's NaN)")
@pytest.mark.parametrize("max_decay", [5.0, 20.0])
def test_strong_decay(max_decay):
    assert max(_fp32_error(128, 64, max_decay)) <= bound(torch.float32)


def test_strong_decay_within_a_short_sequence():
    """-20 per step holds while a chunk's cumulative decay stays in range (T = 4: above -80)."""
    assert max(_fp32_error(4, 64, max_decay=20.0)) <= bound(torch.float32)


def _low_precision_error(dtype, max_decay):
    """The op's relative errors on ``dtype`` inputs (the interpreter emulates their rounding) against
    float64 on the same rounded values, at T = 200, K = V = 64, removal keys of cosine 0.98."""
    args, state = _inputs(1, 200, 2, 64, 64, seed=1, max_decay=max_decay, cosine=0.98)
    low = {n: x.to(dtype) for n, x in args.items()}
    o, final = rwkv7(**low, initial_state=state.float(), output_final_state=True)
    want_o, want_final = reference(**low, initial_state=state, output_final_state=True)
    return rel_err(o, want_o), rel_err(final, want_final)


@pytest.mark.parametrize("dtype, max_decay", [(torch.bfloat16, 0.6), (torch.bfloat16, 2.0), (torch.float16, 0.1)])
def test_low_precision_within_its_bound(dtype, max_decay):
    """bf16 over the whole fp32 exponent range; fp16 while exp(-G), a matmul operand, stays finite."""
    assert max(_low_precision_error(dtype, max_decay)) <= bound(dtype)


@pytest.mark.xfail(strict=True, reason="fp16 overflows exp(-G) once a chunk's cumulative log decay passes about -11 "
                   "(fp16's largest value, 65504, is about e^11): at RWKV-7's decays, uniform in [-0.6, 0] a step, "
                   "every output is non-finite (measured at T = 200), the overflow reaching each chunk's solves")
def test_fp16_at_rwkv7_decays():
    assert max(_low_precision_error(torch.float16, 0.6)) <= bound(torch.float16)


def test_state_round_trip_and_default_scale():
    """Two calls carrying the final state equal one call over the whole sequence; the default scale
    is 1, chunk_rwkv7's."""
    args, _ = _inputs(2, 150, 2, 32, 16, seed=1)
    whole, whole_state = rwkv7(**args, output_final_state=True)
    first, state = rwkv7(**{n: x[:, :70] for n, x in args.items()}, output_final_state=True)
    second, end = rwkv7(**{n: x[:, 70:] for n, x in args.items()}, initial_state=state, output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(end, whole_state, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rwkv7(**args, scale=1.0)[0], whole, rtol=0, atol=0)
    assert rwkv7(**args)[1] is None


def test_derived_backward_gradcheck():
    """float64 gradcheck (fast mode: random projections of the Jacobian) of every input, the initial
    state's included, through output and final state; 70 tokens cross a chunk boundary."""
    args, state = _inputs(1, 70, 2, 16, 16, seed=2, cosine=0.9)
    inputs = [x.requires_grad_() for x in (*args.values(), state)]
    assert torch.autograd.gradcheck(
        lambda *x: rwkv7(*x[:-1], scale=0.5, initial_state=x[-1], output_final_state=True), inputs, fast_mode=True)


@pytest.mark.parametrize("final", [False, True])
def test_opcheck_with_gradients(final):
    """torch.library's checks (schema, fake tensors, AOT dispatch) with inputs that require grad."""
    args, state = _inputs(1, 70, 2, 16, 16, seed=3, dtype=torch.float32)
    inputs = [x.requires_grad_() for x in args.values()]
    torch.library.opcheck(torch.ops.tilemix.rwkv7.default, (*inputs, 0.25, state.requires_grad_(), final))


def test_layer_trains_and_extends():
    """Gradients reach every parameter, and a sequence run in two ``extend`` calls gives the output
    of one call."""
    torch.manual_seed(0)
    layer = RWKV7TimeMix(dim=64, heads=2).double()
    x = torch.randn(2, 90, 64, dtype=torch.float64)
    y = layer(x)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    with torch.no_grad():
        first, cache = layer.extend(x[:, :40])
        second, _ = layer.extend(x[:, 40:], cache)
    torch.testing.assert_close(torch.cat([first, second], 1), y.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: {**a, "w": a["w"][..., :8]}, ValueError, "^w: expected"),
    (lambda a: {**a, "a": a["a"][:, :4]}, ValueError, "^a: expected"),
    (lambda a: {**a, "b": a["b"][0]}, ValueError, "^b: expected"),
    (lambda a: {**a, "k": a["k"][..., :8]}, ValueError, "^k: expected"),
    (lambda a: {**a, "r": a["r"][0]}, ValueError, "^r: expected"),
    (lambda a: {**a, "v": a["v"][:, :4]}, ValueError, "^v: expected"),
    (lambda a: {**a, "a": 0.5}, TypeError, "^a: expected a tensor"),
    (lambda a: {**a, "initial_state": torch.zeros(1, 2, 16, 8)}, ValueError, "^initial_state: expected"),
    (lambda a: {**a, "output_final_state": "yes"}, TypeError, "output_final_state: expected True or False"),
    (lambda a: {**a, "scale": "1"}, TypeError, "scale: expected a Python number"),
])
def test_bad_arguments_are_named(change, error, message):
    args, _ = _inputs(1, 8, 2, 16, 16, seed=0, dtype=torch.float32)
    with pytest.raises(error, match=message):
        rwkv7(**change(args))


# -- compiled for the GPU ----------------------------------------------------------------------
PROGRAMS = {rwkv7_prepare: ("w", "k", "v", "a", "b"),
            rwkv7_prepare_output: ("r", "w", "k", "v", "b", "a_state", "u0"),
            rwkv7_scan: ("w", "v", "a_state", "u0", "r_state", "o0", "b_end", "k_end")}
# (program, head dim, arch, launch) -> local memory bytes measured, where a program spills: the forward
# prepares at 128 (a decay factor per key dim beside the chunk's solves) and the derived launches for the
# decays and the solve's inputs, which keep the solve beside its adjoint
SPILLING: dict[tuple, int] = {
    ("rwkv7_prepare", 64, "sm_80", "a"): 152, ("rwkv7_prepare", 64, "sm_90a", "a"): 16,
    ("rwkv7_prepare", 64, "sm_80", "b"): 280, ("rwkv7_prepare", 64, "sm_90a", "b"): 184,
    ("rwkv7_prepare", 64, "sm_80", "w"): 584, ("rwkv7_prepare", 64, "sm_90a", "w"): 760,
    ("rwkv7_prepare", 128, "sm_90a", "a"): 1016, ("rwkv7_prepare", 128, "sm_90a", "b"): 1232,
    ("rwkv7_prepare", 128, "sm_80", "forward"): 272, ("rwkv7_prepare", 128, "sm_90a", "forward"): 632,
    ("rwkv7_prepare", 128, "sm_90a", "k"): 752, ("rwkv7_prepare_output", 64, "sm_80", "w"): 72,
    ("rwkv7_prepare_output", 64, "sm_90a", "w"): 120, ("rwkv7_prepare_output", 128, "sm_80", "forward"): 72,
    ("rwkv7_prepare_output", 128, "sm_90a", "forward"): 104, ("rwkv7_prepare_output", 128, "sm_90a", "k"): 8,
    ("rwkv7_prepare_output", 128, "sm_80", "r"): 424, ("rwkv7_prepare_output", 128, "sm_90a", "r"): 384,
    ("rwkv7_prepare_output", 128, "sm_90a", "w"): 1352, ("rwkv7_scan", 128, "sm_90a", "b_end"): 8,
}
# launches that need more shared memory than the target has, at every schedule: the derived backward
# of the prepares at head dim 128 (measured: 176 to 280 KiB), so the GPU backward runs at 64 only
OVER_SHARED_MEMORY = {("rwkv7_prepare", 128, "sm_90a", "w"), ("rwkv7_prepare", 128, "sm_80", "w"),
                      ("rwkv7_prepare", 128, "sm_80", "k"), ("rwkv7_prepare", 128, "sm_80", "a"),
                      ("rwkv7_prepare", 128, "sm_80", "b"), ("rwkv7_prepare_output", 128, "sm_80", "w")}


def _launches(program, D: int):
    """The forward and the derived backward's launches (one column block) at head dim ``D``, as the
    CUDA path runs them (``derived_cuda``)."""
    from tilemix.codegen.schedule import SPLIT_WIDTH
    from tilemix.ops.derived_cuda import backward_launches, column_split

    forward = binding = program.bind(kernel_specs(program, H=4, size=D))
    dim = column_split(program, binding)
    if dim is not None:
        binding = program.bind(kernel_specs(program, {dim: SPLIT_WIDTH}, H=4, size=D))
    outputs = [p.name for p in binding.params if p.spec.output or p.spec.kind == "state"]
    backward = backward_launches(program, binding, outputs, PROGRAMS[program])
    return {"forward": (program, forward), **{(name or "states"): (k, b) for name, k, b in backward}}


def _cases():
    for program, inputs in PROGRAMS.items():
        for launch in ("forward", *(("states",) if program is rwkv7_scan else ()), *inputs):
            yield pytest.param(program, launch, id=f"{program.name}-{launch}")


@pytest.mark.parametrize("arch", list(MMA))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("program, launch", list(_cases()))
def test_programs_compile_with_tensor_cores_without_local_memory(program, launch, D, arch):
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    kernel, binding = _launches(program, D)[launch]
    key = (program.name, D, arch, launch)
    if key in OVER_SHARED_MEMORY:
        with pytest.raises(ResourceError, match="shared memory"):
            check_compiled(kernel, binding, arch, key, SPILLING)
        pytest.xfail(f"{key} needs more shared memory than {arch} has")
    check_compiled(kernel, binding, arch, key, SPILLING, mma=has_wide_matmul(kernel, binding, arch))


# -- on the GPU --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 200, 256])
@pytest.mark.parametrize("dtype, max_decay", [(torch.bfloat16, 0.6), (torch.float16, 0.1)])
def test_gpu_forward_and_backward_within_bound(T, dtype, max_decay):
    """bf16/fp16 inputs on the GPU at RWKV-7's head size, 64 (removal keys of cosine 0.98; fp32 state;
    fp16 at decays its range holds): the output, final state and every gradient within the dtype's
    bound of float64 on the same rounded values."""
    args, state = _inputs(2, T, 4, 64, 64, seed=T, max_decay=max_decay, cosine=0.98)
    low = [x.to("cuda", dtype).requires_grad_() for x in args.values()]
    low.append(state.to("cuda", torch.float32).requires_grad_())
    exact_inputs = [x.detach().cpu().double().requires_grad_() for x in low]
    results = []
    for inputs in (exact_inputs, low):
        o, final = rwkv7(*inputs[:-1], initial_state=inputs[-1], output_final_state=True)
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device) for t in (o, final)]
        (o.double() * weights[0]).sum().add((final.double() * weights[1]).sum()).backward()
        results.append([o, final, *(x.grad for x in inputs)])
    for name, exact, got in zip(("o", "final_state", *NAMES, "initial_state"), *results):
        assert rel_err(got.double().cpu(), exact.detach().numpy()) <= bound(dtype), name


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 300])
def test_gpu_forward_at_head_dim_128_within_bound(T):
    """The forward alone at K = V = 128 (its backward exceeds shared memory): bf16 output and final
    state within the bf16 bound of float64 on the same rounded values."""
    args, state = _inputs(2, T, 4, 128, 128, seed=T)
    low = {n: x.to("cuda", torch.bfloat16) for n, x in args.items()}
    o, final = rwkv7(**low, initial_state=state.float().cuda(), output_final_state=True)
    want_o, want_final = reference(**low, initial_state=state, output_final_state=True)
    assert rel_err(o.double().cpu(), want_o) <= bound(torch.bfloat16)
    assert rel_err(final.double().cpu(), want_final) <= bound(torch.bfloat16)
