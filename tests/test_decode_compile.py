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
