"""delta_rule and gated_delta_rule: against the float64 token loops (tilemix.reference), fp32 on the
stress input (unit keys of pairwise cosine 0.98), state round trips, float64 gradcheck of the derived
backward, argument errors, and the forward and derived backward programs compiled for sm_90a and sm_80."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compile_checks import MMA, check_compiled
from hypothesis import given
from hypothesis import strategies as st

from tilemix.ops import DeltaNet, delta_rule, delta_rule_fwd, gated_delta_rule, gated_delta_rule_fwd
from tilemix.reference import mixers as reference
from tilemix.reference.tolerance import bound, rel_err

OPS = {"delta_rule": (delta_rule, reference.delta_rule),
       "gated_delta_rule": (gated_delta_rule, reference.gated_delta_rule)}


def correlated_keys(rng, B, T, H, K, cosine):
    """L2-normalised keys whose pairwise cosine is about ``cosine`` (a shared direction plus noise)."""
    shared = rng.standard_normal((B, 1, H, K))
    noise = rng.standard_normal((B, T, H, K))
    shared /= np.linalg.norm(shared, axis=-1, keepdims=True)
    noise /= np.linalg.norm(noise, axis=-1, keepdims=True)
    keys = np.sqrt(cosine) * shared + np.sqrt(1 - cosine) * noise
    return keys / np.linalg.norm(keys, axis=-1, keepdims=True)


def _inputs(op, B, T, H, K, V, seed, cosine=0.5, dtype=torch.float64):
    """Positional inputs of ``op``: unit keys, beta in (0, 1), log decays from about -1e-3 to -20 per
    step; and an initial state."""
    rng = np.random.default_rng(seed)
    args = [rng.standard_normal((B, T, H, K)), correlated_keys(rng, B, T, H, K, cosine),
            rng.standard_normal((B, T, H, V))]
    if op == "gated_delta_rule":
        args.append(-np.exp(rng.uniform(np.log(1e-3), np.log(20.0), (B, T, H))))
    args.append(rng.uniform(0, 1, (B, T, H)))
    state = rng.standard_normal((B, H, K, V))
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [torch.tensor(a, dtype=dtype) for a in args], torch.tensor(state, dtype=state_dtype)


@pytest.mark.parametrize("op", OPS)
@given(B=st.integers(1, 2), T=st.integers(1, 300), H=st.integers(1, 2), K=st.sampled_from([16, 32, 64, 128]),
       V=st.sampled_from([16, 64]), with_state=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_float64_token_loop(op, B, T, H, K, V, with_state, seed):
    fn, ref = OPS[op]
    args, state = _inputs(op, B, T, H, K, V, seed)
    state = state if with_state else None
    o, final = fn(*args, scale=0.3, initial_state=state, output_final_state=True)
    want_o, want_final = ref(*args, scale=0.3, initial_state=state, output_final_state=True)
    np.testing.assert_allclose(o.numpy(), want_o, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(final.numpy(), want_final, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("K", [16, 64, 128])
@pytest.mark.parametrize("T", [63, 300])
def test_fp32_within_its_bound_with_keys_of_cosine_098(op, K, T):
    """The issue's stress input, in fp32, against the float64 loop on the same (fp32) values: the
    chunk's triangular solve keeps the output and final state within fp32's error bound."""
    fn, ref = OPS[op]
    args, state = _inputs(op, 1, T, 2, K, K, seed=K + T, cosine=0.98, dtype=torch.float32)
    o, final = fn(*args, initial_state=state, output_final_state=True)
    want_o, want_final = ref(*args, initial_state=state, output_final_state=True)
    assert rel_err(o, want_o) <= bound(torch.float32)
    assert rel_err(final, want_final) <= bound(torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_state_round_trip(op):
    """Two calls carrying the final state equal one call over the whole sequence, and the default
    scale is K ** -0.5."""
    fn, _ = OPS[op]
    args, _ = _inputs(op, 2, 150, 2, 32, 16, seed=1)
    whole, whole_state = fn(*args, output_final_state=True)
    first, state = fn(*(a[:, :70] for a in args), output_final_state=True)
    second, end = fn(*(a[:, 70:] for a in args), initial_state=state, output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(end, whole_state, rtol=1e-12, atol=1e-12)
    scaled, _ = fn(*args, scale=32 ** -0.5)
    torch.testing.assert_close(scaled, whole, rtol=0, atol=0)
    assert fn(*args)[1] is None


@pytest.mark.parametrize("op", OPS)
def test_derived_backward_gradcheck(op):
    """float64 gradcheck (fast mode: random projections of the Jacobian) of every input, the
    initial state's included, through output and final state; 70 tokens cross a chunk boundary."""
    fn, _ = OPS[op]
    args, state = _inputs(op, 1, 70, 2, 16, 16, seed=2, cosine=0.9)
    inputs = [a.requires_grad_() for a in (*args, state)]
    assert torch.autograd.gradcheck(
        lambda *x: fn(*x[:-1], scale=0.5, initial_state=x[-1], output_final_state=True), inputs, fast_mode=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("final", [False, True])
def test_opcheck_with_gradients(op, final):
    """torch.library's checks (schema, fake tensors, AOT dispatch) with inputs that require grad:
    the derived backward traces as an op, so a compiled training step sees no Python."""
    args, state = _inputs(op, 1, 70, 2, 16, 16, seed=3, dtype=torch.float32)
    inputs = [a.requires_grad_() for a in args]
    torch.library.opcheck(getattr(torch.ops.tilemix, op).default, (*inputs, 0.25, state.requires_grad_(), final))


def test_layer_trains_and_extends():
    """DeltaNet layers (gated and not): gradients reach every parameter, and a sequence run in two
    ``extend`` calls gives the output of one call."""
    torch.manual_seed(0)
    for gated in (False, True):
        layer = DeltaNet(dim=64, heads=2, gated=gated).double()
        x = torch.randn(2, 90, 64, dtype=torch.float64)
        y = layer(x)
        y.square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
        with torch.no_grad():
            a, cache = layer.extend(x[:, :40])
            b, _ = layer.extend(x[:, 40:], cache)
        torch.testing.assert_close(torch.cat([a, b], 1), y.detach(), rtol=1e-10, atol=1e-10)


def _good():
    args, state = _inputs("gated_delta_rule", 1, 8, 2, 16, 16, seed=0, dtype=torch.float32)
    return dict(zip("q k v g beta".split(), args)), state


@pytest.mark.parametrize("change, error, message", [
    (lambda a: {**a, "beta": a["beta"][..., :1]}, ValueError, "^beta: expected"),
    (lambda a: {**a, "g": a["g"].unsqueeze(-1)}, ValueError, "^g: expected"),
    (lambda a: {**a, "k": a["k"][..., :8]}, ValueError, "^k: expected"),
    (lambda a: {**a, "v": a["v"][:, :4]}, ValueError, "^v: expected"),
    (lambda a: {**a, "beta": 0.5}, TypeError, "beta: expected a tensor"),
    (lambda a: {**a, "initial_state": torch.zeros(1, 2, 16, 8)}, ValueError, "^initial_state: expected"),
    (lambda a: {**a, "output_final_state": "yes"}, TypeError, "output_final_state: expected True or False"),
    (lambda a: {**a, "scale": "1"}, TypeError, "scale: expected a Python number"),
])
def test_bad_arguments_are_named(change, error, message):
    args, _ = _good()
    gated = change(args)
    with pytest.raises(error, match=message):
        gated_delta_rule(**gated)
    if "g" in gated and gated["g"] is args["g"]:
        with pytest.raises(error, match=message):
            delta_rule(**{n: x for n, x in gated.items() if n != "g"})


# -- compiled for the GPU ----------------------------------------------------------------------
PROGRAMS = {delta_rule_fwd: ("q", "k", "v", "beta"), gated_delta_rule_fwd: ("q", "k", "v", "g", "beta")}
# (program, head dim, arch, launch) -> local memory bytes measured, where a program spills: the derived
# reverse programs for beta, g and k keep more 64-wide fp32 tiles live (the chunk's solve and its
# adjoint) than a thread's registers hold; the gated forward at 128
SPILLING: dict[tuple, int] = {
    ("delta_rule_fwd", 64, "sm_80", "beta"): 312, ("delta_rule_fwd", 64, "sm_90a", "beta"): 400,
    ("delta_rule_fwd", 64, "sm_80", "k"): 416, ("delta_rule_fwd", 64, "sm_90a", "k"): 616,
    ("delta_rule_fwd", 64, "sm_90a", "v"): 56, ("delta_rule_fwd", 128, "sm_80", "beta"): 1568,
    ("delta_rule_fwd", 128, "sm_90a", "beta"): 1464, ("delta_rule_fwd", 128, "sm_80", "k"): 1776,
    ("delta_rule_fwd", 128, "sm_90a", "k"): 1952, ("gated_delta_rule_fwd", 64, "sm_80", "beta"): 408,
    ("gated_delta_rule_fwd", 64, "sm_90a", "beta"): 680, ("gated_delta_rule_fwd", 64, "sm_80", "forward"): 8,
    ("gated_delta_rule_fwd", 64, "sm_80", "g"): 1144, ("gated_delta_rule_fwd", 64, "sm_90a", "g"): 1120,
    ("gated_delta_rule_fwd", 64, "sm_80", "k"): 792, ("gated_delta_rule_fwd", 64, "sm_90a", "k"): 896,
    ("gated_delta_rule_fwd", 128, "sm_80", "beta"): 1592, ("gated_delta_rule_fwd", 128, "sm_90a", "beta"): 1752,
    ("gated_delta_rule_fwd", 128, "sm_80", "forward"): 56, ("gated_delta_rule_fwd", 128, "sm_90a", "forward"): 56,
    ("gated_delta_rule_fwd", 128, "sm_80", "g"): 2080, ("gated_delta_rule_fwd", 128, "sm_90a", "g"): 2384,
    ("gated_delta_rule_fwd", 128, "sm_80", "k"): 1920, ("gated_delta_rule_fwd", 128, "sm_90a", "k"): 2368,
    ("gated_delta_rule_fwd", 128, "sm_80", "v"): 80,
}


def _launches(program, D: int):
    """The forward and the derived backward's launches (one column block) at head dim ``D``, as the
    CUDA path runs them (``derived_cuda``)."""
    from tilemix.codegen.schedule import SPLIT_WIDTH
    from tilemix.ops.derived_cuda import backward_launches, column_split
    from tilemix.ops.examples import kernel_specs

    forward = binding = program.bind(kernel_specs(program, H=4, size=D))  # the forward splits in the kernel
    dim = column_split(program, binding)
    if dim is not None:
        binding = program.bind(kernel_specs(program, {dim: SPLIT_WIDTH}, H=4, size=D))
    outputs = [p.name for p in binding.params if p.spec.output or p.spec.kind == "state"]
    backward = backward_launches(program, binding, outputs, PROGRAMS[program])
    return {"forward": (program, forward), **{(name or "states"): (k, b) for name, k, b in backward}}


@pytest.mark.parametrize("arch", list(MMA))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("program, launch", [pytest.param(p, n, id=f"{p.name}-{n}") for p, names in PROGRAMS.items()
                                             for n in ("forward", "states", *names)])
def test_programs_compile_with_tensor_cores_without_local_memory(program, launch, D, arch):
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    kernel, binding = _launches(program, D)[launch]
    check_compiled(kernel, binding, arch, (program.name, D, arch, launch), SPILLING)


# -- on the GPU --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T", [1, 200, 256])
@pytest.mark.parametrize("K", [64, 128])
def test_gpu_bf16_forward_and_backward_within_bf16_bound(op, T, K):
    """bf16 q, k, v on the GPU (keys of cosine 0.98; fp32 gates and state): the output, final state
    and every gradient within the bf16 bound of float64 on the same rounded values."""
    fn, _ = OPS[op]
    args, state = _inputs(op, 2, T, 4, K, K, seed=T, cosine=0.98)
    dtypes = [torch.bfloat16] * 3 + [torch.float32] * (len(args) - 2)  # q, k, v; gates; state
    low = [a.to(d).cuda().requires_grad_() for a, d in zip((*args, state), dtypes)]
    exact_inputs = [a.detach().cpu().double().requires_grad_() for a in low]
    results = []
    for inputs in (exact_inputs, low):
        o, final = fn(*inputs[:-1], initial_state=inputs[-1], output_final_state=True)
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device) for t in (o, final)]
        (o.double() * weights[0]).sum().add((final.double() * weights[1]).sum()).backward()
        results.append([o, final, *(x.grad for x in inputs)])
    for exact, got in zip(*results):
        assert rel_err(got.double().cpu(), exact.detach().numpy()) <= bound(torch.bfloat16)
