"""mlstm on the GPU targets: its forward program and the backward programs derived from it (one
column block's launches, ``ops/derived_cuda.py``) compile for sm_90a with wgmma and for sm_80 with
mma.sync, without local memory except where measured below."""

from __future__ import annotations

import pytest
from compile_checks import MMA, check_compiled

from tilemix.ops.examples import kernel_specs
from tilemix.ops.mlstm import mlstm_fwd

pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from tilemix.codegen.schedule import SPLIT_WIDTH  # noqa: E402
from tilemix.ops.derived_cuda import backward_launches, column_split  # noqa: E402

INPUTS = ("q", "k", "v", "i", "f")
# (head dim, arch, program) -> local memory bytes measured, where the program still spills: the gate and key
# gradients (as gla's and rwkv6's decay gradients do), and at D = 256 the forward: q_t · n and Σ_j w_j k_j
# lower as 64 x K fp32 register tiles (128 registers a thread at K = 256) beside the 256 x 64 block of C
SPILLING: dict[tuple, int] = {
    (64, "sm_90a", "d_k"): 32, (64, "sm_90a", "d_i"): 408, (64, "sm_90a", "d_f"): 512,
    (64, "sm_80", "d_i"): 248, (64, "sm_80", "d_f"): 304, (128, "sm_90a", "d_k"): 472, (128, "sm_90a", "d_i"): 640,
    (128, "sm_90a", "d_f"): 768, (128, "sm_80", "d_k"): 232, (128, "sm_80", "d_i"): 480, (128, "sm_80", "d_f"): 520,
    (256, "sm_90a", "forward"): 200, (256, "sm_80", "forward"): 40,
}


def _programs(D: int) -> dict:
    """The forward and one column block's backward launches at head dim ``D``: name -> (kernel, binding)."""
    binding = mlstm_fwd.bind(kernel_specs(mlstm_fwd, size=D, T=4096))
    found = {"forward": (mlstm_fwd, binding)}
    dim = column_split(mlstm_fwd, binding)
    if dim is not None:
        binding = mlstm_fwd.bind(kernel_specs(mlstm_fwd, sizes={dim: SPLIT_WIDTH}, size=D, T=4096))
    outputs = [p.name for p in binding.params if p.spec.output or p.spec.kind == "state"]
    for name, derived, derived_binding in backward_launches(mlstm_fwd, binding, outputs, INPUTS):
        found[f"d_{name}" if name else "states"] = (derived, derived_binding)
    return found


CASES = [(D, arch, name) for D in (64, 128) for arch in MMA
         for name in ("forward", "states", *(f"d_{n}" for n in INPUTS))]
CASES += [(256, arch, "forward") for arch in MMA]


@pytest.mark.parametrize("D, arch, program", CASES)
def test_compiles_with_tensor_cores_without_local_memory(D, arch, program):
    kernel, binding = _programs(D)[program]
    check_compiled(kernel, binding, arch, (D, arch, program), SPILLING)
