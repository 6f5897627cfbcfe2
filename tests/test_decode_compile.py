"""The decode steps' programs (``tiles/step.py``) compile for sm_90a and sm_80 at the bench head dims,
with their state passed (a step always reads one), without local memory. Their matmuls are vector
products against the state, so no tensor-core instruction is asked for."""

from __future__ import annotations

import pytest
from compile_checks import check_compiled

from tilemix.ops.decode import STEPS
from tilemix.ops.examples import kernel_specs
from tilemix.tiles import TensorSpec

pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

CASES = [(op, 128) for op in STEPS] + [("linear_attention", 64), ("ssd", 64)]  # the bars' head dims


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("op, D", CASES)
def test_step_compiles_without_spills(op, D, arch):
    step = STEPS[op]
    kernel, (state,) = step.kernel, step.states
    args = kernel_specs(kernel, size=D, B=128, T=1)
    args[state] = TensorSpec((128, 16, D, D), "float32")
    check_compiled(kernel, kernel.bind(args), arch, (op, D, arch), {}, mma=False)


@pytest.mark.parametrize("arch, bounds, registers", [("sm_90a", "(256, 2)", "setmaxnreg_inc<216>"),
                                                     ("sm_80", "(128, 2)", None)])
def test_step_at_two_ctas_per_sm_fits_its_share_of_registers(arch, bounds, registers):
    """The tuner's occupancy knob on a decode step: one consumer per 64-column block, two CTAs per SM
    (one's state moves while the other's updates), compiled for half the register file without
    local memory; on sm_90a the consumer takes what the producer leaves of the CTA's half."""
    from dataclasses import replace

    from tilemix.codegen.schedule import default_schedule

    kernel, (state,) = STEPS["linear_attention"].kernel, STEPS["linear_attention"].states
    args = kernel_specs(kernel, size=128, B=128, T=1)
    args[state] = TensorSpec((128, 16, 128, 128), "float32")
    binding = kernel.bind(args)
    schedule = replace(default_schedule(kernel, binding, arch), split=(("V", 64),), consumers=1, occupancy=2)
    source = check_compiled(kernel, binding, arch, None, {}, mma=False, schedule=schedule).source
    assert f"__launch_bounds__{bounds}" in source
    assert registers is None or registers in source


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_default_step_runs_more_ctas_per_sm_where_they_compile(arch):
    """A decode step moves its state through registers, bound by memory latency: the default takes
    one consumer and more than one CTA per SM, compiled without local memory (the lowering record
    takes the schedule unprobed, so this is where the choice is checked)."""
    from tilemix.codegen.schedule import default_schedule

    kernel, (state,) = STEPS["linear_attention"].kernel, STEPS["linear_attention"].states
    args = kernel_specs(kernel, size=64, B=128, T=1)
    args[state] = TensorSpec((128, 16, 64, 64), "float32")
    binding = kernel.bind(args)
    schedule, unprobed = default_schedule(kernel, binding, arch), default_schedule(kernel, binding, arch, probe=False)
    assert schedule.consumers == 1 and schedule.occupancy > unprobed.occupancy
    check_compiled(kernel, binding, arch, None, {}, mma=False, schedule=schedule)
