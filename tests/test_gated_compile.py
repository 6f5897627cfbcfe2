"""retention, gla and rwkv6 on the GPU targets: the forward programs and the backward programs derived from
them (one column block's launches, ``ops/derived_cuda.py``) compile for sm_90a with wgmma and for
sm_80 with mma.sync, without local memory except where measured below."""

from __future__ import annotations

import pytest
from compile_checks import MMA, check_compiled, has_wide_matmul

from tilemix.ops.examples import kernel_specs
from tilemix.ops.gated import gla_exact_fwd, gla_fwd, retention_fwd, rwkv6_exact_fwd, rwkv6_fwd

pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from tilemix.codegen.schedule import SPLIT_WIDTH  # noqa: E402
from tilemix.ops.derived_cuda import backward_launches, column_split  # noqa: E402

PROGRAMS = {"retention": (retention_fwd, ("q", "k", "v", "log_gamma")), "gla": (gla_fwd, ("q", "k", "v", "g")),
            "rwkv6": (rwkv6_fwd, ("r", "k", "v", "w", "u"))}
# (op, head dim, arch, program) -> local memory bytes measured, where the program still spills: the
# decay gradients (d_log_gamma, d_g, d_w; at D = 128 in row blocks of K), at D = 128 d_v (it contracts
# K: no row blocks) and rwkv6's forward (GLA's 64x128 cumsum and exp factors, and the bonus term's)
SPILLING: dict[tuple, int] = {
    ("retention", 64, "sm_90a", "d_log_gamma"): 88, ("retention", 128, "sm_90a", "d_log_gamma"): 64,
    ("gla", 64, "sm_90a", "d_g"): 144, ("gla", 64, "sm_80", "d_g"): 104,
    ("gla", 128, "sm_90a", "d_v"): 168, ("gla", 128, "sm_90a", "d_g"): 128,
    ("gla", 128, "sm_80", "d_v"): 360, ("gla", 128, "sm_80", "d_g"): 104,
    ("rwkv6", 64, "sm_90a", "d_k"): 64, ("rwkv6", 64, "sm_90a", "d_w"): 272,
    ("rwkv6", 64, "sm_80", "d_k"): 40, ("rwkv6", 64, "sm_80", "d_w"): 152,
    ("rwkv6", 128, "sm_90a", "forward"): 192, ("rwkv6", 128, "sm_90a", "d_r"): 32, ("rwkv6", 128, "sm_90a", "d_k"): 56,
    ("rwkv6", 128, "sm_90a", "d_v"): 256, ("rwkv6", 128, "sm_90a", "d_w"): 296,
    ("rwkv6", 128, "sm_80", "forward"): 136, ("rwkv6", 128, "sm_80", "d_r"): 24, ("rwkv6", 128, "sm_80", "d_k"): 64,
    ("rwkv6", 128, "sm_80", "d_v"): 520, ("rwkv6", 128, "sm_80", "d_w"): 176,
}


def _programs(op: str, D: int) -> dict:
    """The forward and one column block's backward launches at head dim ``D``: name -> (kernel, binding)."""
    kernel, wrt = {**PROGRAMS, **EXACT}[op]
    binding = kernel.bind(kernel_specs(kernel, size=D, T=4096))
    found = {"forward": (kernel, binding)}
    dim = column_split(kernel, binding)
    if dim is not None:
        binding = kernel.bind(kernel_specs(kernel, sizes={dim: SPLIT_WIDTH}, size=D, T=4096))
    outputs = [p.name for p in binding.params if p.spec.output or p.spec.kind == "state"]
    for name, derived, derived_binding in backward_launches(kernel, binding, outputs, wrt):
        found[f"d_{name}" if name else "states"] = (derived, derived_binding)
    return found


# the exact forms (ops/decayed_scores.py) and their forward's local memory, measured: the six levels'
# segment sums (linrec) beside the carried state and the scores, over 232 registers already at D = 64
EXACT = {"gla_exact": (gla_exact_fwd, PROGRAMS["gla"][1]), "rwkv6_exact": (rwkv6_exact_fwd, PROGRAMS["rwkv6"][1])}
EXACT_SPILLING: dict[tuple, int] = {
    ("gla_exact", 64, "sm_90a", "forward"): 968, ("rwkv6_exact", 64, "sm_90a", "forward"): 408,
    ("gla_exact", 64, "sm_80", "forward"): 224, ("rwkv6_exact", 64, "sm_80", "forward"): 352,
    ("gla_exact", 128, "sm_90a", "forward"): 5152, ("rwkv6_exact", 128, "sm_90a", "forward"): 6576,
    ("gla_exact", 128, "sm_80", "forward"): 1424, ("rwkv6_exact", 128, "sm_80", "forward"): 1984,
}

CASES = [(op, D, arch, name) for op in PROGRAMS for D in (64, 128) for arch in MMA
         for name in ("forward", "states", *(f"d_{n}" for n in PROGRAMS[op][1]))]


@pytest.mark.parametrize("op, D, arch, program", CASES)
def test_compiles_with_tensor_cores_without_local_memory(op, D, arch, program):
    kernel, binding = _programs(op, D)[program]
    check_compiled(kernel, binding, arch, (op, D, arch, program), SPILLING, mma=has_wide_matmul(kernel, binding, arch))


@pytest.mark.parametrize("op", EXACT)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("arch", MMA)
def test_exact_forms_compile_with_tensor_cores(op, D, arch):
    kernel, binding = _programs(op, D)["forward"]
    check_compiled(kernel, binding, arch, (op, D, arch, "forward"), EXACT_SPILLING)


@pytest.mark.parametrize("op", EXACT)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("arch", MMA)
def test_exact_forms_backward_launches_lower(op, D, arch):
    """Every backward launch derived from the exact forms lowers (its CUDA generated, not compiled)."""
    from tilemix.codegen.schedule import default_schedule
    from tilemix.codegen.specialise import kernel_source

    for name, (kernel, binding) in _programs(op, D).items():
        assert kernel_source(kernel, binding, default_schedule(kernel, binding, arch), arch).source, name


@pytest.mark.parametrize("op, decay", [("gla", "d_g"), ("rwkv6", "d_w")])
def test_decay_gradients_split_the_state_rows(op, decay):
    """At D = 128 a decay's gradient contracts the state's V columns and keeps its K rows apart: the
    schedule cuts K into blocks (the state's rows, the keys' columns) as it cuts V in the forward,
    and each block reads its rows of the states and checkpoints. d_v contracts K: no split."""
    from tilemix.codegen.schedule import default_schedule
    from tilemix.codegen.specialise import kernel_source

    programs = _programs(op, 128)
    kernel, binding = programs[decay]
    schedule = default_schedule(kernel, binding, "sm_90a")
    assert dict(schedule.split) == {"K": SPLIT_WIDTH}
    source = kernel_source(kernel, binding, schedule, "sm_90a").source
    block = f"(colcta * {schedule.consumers} + wg) * {SPLIT_WIDTH} * {binding.extent('V')}"
    assert "ptr_saved_0 + " in source and block in source  # a row block of each [K, V] tile
    assert "K" not in dict(default_schedule(*programs["d_v"], "sm_90a").split)
