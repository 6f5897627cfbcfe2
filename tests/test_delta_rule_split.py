"""delta_rule and gated_delta_rule as two programs: the UT transform in a grid program parallel over
chunks (``*_prepare``, ``blocks``), the state recurrence in a scan (``*_scan``). They compute what the
one-program forwards (``*_fwd``) do; the grid program and the derived backward of both compile for
sm_90a with wgmma and for sm_80 with mma.sync, without local memory except where measured below."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compile_checks import MMA, check_compiled
from test_delta_rule import _inputs

from tilemix.ops import (
    delta_rule,
    delta_rule_fwd,
    delta_rule_prepare,
    delta_rule_scan,
    gated_delta_rule,
    gated_delta_rule_fwd,
    gated_delta_rule_prepare,
    gated_delta_rule_scan,
)
from tilemix.ops.examples import kernel_specs
from tilemix.reference.tolerance import bound, rel_err

# op -> (prepare, its inputs; scan, its inputs; the one-program forward)
SPLITS = {"delta_rule": (delta_rule_prepare, ("k", "v", "beta"), delta_rule_scan, ("q", "k", "w", "u0"),
                         delta_rule_fwd),
          "gated_delta_rule": (gated_delta_rule_prepare, ("k", "v", "g", "beta"), gated_delta_rule_scan,
                               ("q", "k", "g", "w", "u0"), gated_delta_rule_fwd)}


@pytest.mark.parametrize("op", SPLITS)
@pytest.mark.parametrize("T", [1, 64, 150])
def test_prepare_and_scan_compute_the_one_program_forward(op, T):
    prepare, _, scan, _, fused = SPLITS[op]
    args, state = _inputs(op, 2, T, 2, 32, 16, seed=T)
    names = ("q", "k", "v", "g", "beta") if op == "gated_delta_rule" else ("q", "k", "v", "beta")
    x = {n: a.numpy() for n, a in zip(names, args)}
    prepared = prepare(**{n: x[n] for n in ("k", "v", "g", "beta") if n in x})
    split = scan(**{n: x[n] for n in ("q", "k", "g") if n in x}, **prepared, scale=0.3, s=state.numpy())
    whole = fused(**x, scale=0.3, s=state.numpy())
    for name in ("o", "s"):
        np.testing.assert_allclose(split[name], whole[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", SPLITS)
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_prepare_runs_one_block_per_chunk(op, arch):
    """The solves leave the sequential path: the prepare kernel's grid spans the sequence, each CTA
    taking one 64-token chunk per consumer."""
    pytest.importorskip("cuda.bindings", reason="lowering needs the codegen extra")
    from tilemix.codegen.schedule import default_schedule
    from tilemix.codegen.specialise import kernel_source

    prepare = SPLITS[op][0]
    binding = prepare.bind(kernel_specs(prepare, size=128, T=4096))
    schedule = default_schedule(prepare, binding, arch)
    source = kernel_source(prepare, binding, schedule, arch)
    per_cta = schedule.consumers if schedule.consumer_axis == "blocks" else 1
    assert list(source.grid_loops) == [("T", 64 * per_cta)]


@pytest.mark.parametrize("op", SPLITS)
def test_bf16_on_the_interpreter_within_the_bf16_bound(op):
    """The GPU test's check on the interpreter, which rounds as the GPU does: w and u0 (and their
    gradients) pass between the programs in bf16, and the output, final state and every gradient
    stay within the bf16 bound of float64 on the same rounded values (keys of cosine 0.98)."""
    fn = {"delta_rule": delta_rule, "gated_delta_rule": gated_delta_rule}[op]
    args, state = _inputs(op, 2, 256, 2, 64, 64, seed=256, cosine=0.98)
    dtypes = [torch.bfloat16] * 3 + [torch.float32] * (len(args) - 2)  # q, k, v; gates; state
    low = [a.to(d).requires_grad_() for a, d in zip((*args, state), dtypes)]
    exact_inputs = [a.detach().double().requires_grad_() for a in low]
    results = []
    for inputs in (exact_inputs, low):
        o, final = fn(*inputs[:-1], initial_state=inputs[-1], output_final_state=True)
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (o, final)]
        (o.double() * weights[0]).sum().add((final.double() * weights[1]).sum()).backward()
        results.append([o, final, *(x.grad for x in inputs)])
    for exact, got in zip(*results):
        assert rel_err(got.double(), exact.detach().numpy()) <= bound(torch.bfloat16)


# -- compiled for the GPU ----------------------------------------------------------------------
# (program, head dim, arch, launch) -> local memory bytes measured, where a program spills: the derived
# reverse programs for the gates and keys, which keep the chunk's solve (prepare) or the 128x128 state
# gradient (scan) beside their adjoints; no forward spills
SPILLING: dict[tuple, int] = {
    ("delta_rule_prepare", 128, "sm_80", "k"): 32, ("delta_rule_scan", 128, "sm_80", "k"): 224,
    ("delta_rule_scan", 128, "sm_90a", "k"): 144, ("gated_delta_rule_prepare", 128, "sm_80", "beta"): 176,
    ("gated_delta_rule_prepare", 128, "sm_90a", "beta"): 32, ("gated_delta_rule_prepare", 128, "sm_80", "g"): 264,
    ("gated_delta_rule_prepare", 128, "sm_90a", "g"): 88, ("gated_delta_rule_prepare", 128, "sm_80", "k"): 520,
    ("gated_delta_rule_prepare", 128, "sm_90a", "k"): 400, ("gated_delta_rule_scan", 128, "sm_80", "g"): 560,
    ("gated_delta_rule_scan", 128, "sm_90a", "g"): 744, ("gated_delta_rule_scan", 128, "sm_80", "k"): 528,
    ("gated_delta_rule_scan", 128, "sm_90a", "k"): 352,
}


def _launches(program, wrt: tuple[str, ...]):
    """The forward and the derived backward's launches (one column block) at head dim 128, as the
    CUDA path runs them (``derived_cuda``)."""
    from tilemix.codegen.schedule import SPLIT_WIDTH
    from tilemix.ops.derived_cuda import backward_launches, column_split

    forward = binding = program.bind(kernel_specs(program, H=4, size=128))
    dim = column_split(program, binding)
    if dim is not None:
        binding = program.bind(kernel_specs(program, {dim: SPLIT_WIDTH}, H=4, size=128))
    outputs = [p.name for p in binding.params if p.spec.output or p.spec.kind == "state"]
    backward = backward_launches(program, binding, outputs, wrt)
    return {"forward": (program, forward), **{(name or "states"): (k, b) for name, k, b in backward}}


def _cases():
    for prepare, prepare_inputs, scan, scan_inputs, _ in SPLITS.values():
        for program, inputs in ((prepare, prepare_inputs), (scan, scan_inputs)):
            states = ("states",) if program is scan else ()
            for launch in ("forward", *states, *inputs):
                yield pytest.param(program, inputs, launch, id=f"{program.name}-{launch}")


@pytest.mark.parametrize("arch", list(MMA))
@pytest.mark.parametrize("program, inputs, launch", list(_cases()))
def test_programs_compile_with_tensor_cores_without_local_memory(program, inputs, launch, arch):
    """At head dim 128 (the bench's), the forwards and every derived launch."""
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    kernel, binding = _launches(program, inputs)[launch]
    check_compiled(kernel, binding, arch, (program.name, 128, arch, launch), SPILLING)
