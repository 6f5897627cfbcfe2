"""lolcats_attention on the GPU targets: the forward program and the backward programs derived from it
compile for sm_90a with wgmma at D = 64 and 128 (a 64-column value piece, 128 features: LoLCATs' Llama
heads) and for sm_80 with mma.sync at D = 64 and 64 features, spilling where measured below; past each
target's carried-state budget the program is refused by name."""

from __future__ import annotations

import pytest
from compile_checks import check_compiled

from tilemix.ops.lolcats import lolcats_fwd
from tilemix.tiles import TensorSpec, TileError

pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from tilemix.ops.derived_cuda import backward_launches  # noqa: E402

# (arch, D) -> features: the widest each target's budget carries beside a 64-column value piece
SHAPES = {("sm_90a", 64): 128, ("sm_90a", 128): 128, ("sm_80", 64): 64}
# (arch, D, program) -> local memory bytes measured: the carried previous chunk (k, v, φk) and the
# state beside a chunk's score tiles do not fit the registers
SPILLING = {("sm_90a", 64, "forward"): 512, ("sm_90a", 64, "states"): 8, ("sm_90a", 64, "d_q"): 784,
            ("sm_90a", 64, "d_k"): 1064, ("sm_90a", 64, "d_v"): 736, ("sm_90a", 64, "d_q_features"): 80,
            ("sm_90a", 64, "d_k_features"): 880,
            ("sm_90a", 128, "forward"): 808, ("sm_90a", 128, "states"): 128, ("sm_90a", 128, "d_q"): 880,
            ("sm_90a", 128, "d_k"): 1456, ("sm_90a", 128, "d_v"): 536, ("sm_90a", 128, "d_q_features"): 80,
            ("sm_90a", 128, "d_k_features"): 912,
            ("sm_80", 64, "forward"): 24, ("sm_80", 64, "d_q"): 280, ("sm_80", 64, "d_k"): 528,
            ("sm_80", 64, "d_v"): 200, ("sm_80", 64, "d_q_features"): 8, ("sm_80", 64, "d_k_features"): 392}
PROGRAMS = ("forward", "states", "d_q", "d_k", "d_v", "d_q_features", "d_k_features")


def _specs(D=64, V=64, F=128, B=8, T=4096, H=16) -> dict:
    seq = lambda width: TensorSpec((B, T, H, width), "bfloat16")  # noqa: E731
    return dict(q=seq(D), k=seq(D), v=seq(V), q_features=seq(F), k_features=seq(F), scale=D ** -0.5, window=64)


def _program(arch: str, D: int, name: str):
    binding = lolcats_fwd.bind(_specs(D=D, F=SHAPES[arch, D]))
    if name == "forward":
        return lolcats_fwd, binding
    wrt = ["q", "k", "v", "q_features", "k_features"]
    derived = {f"d_{n}" if n else "states": (kernel, b) for n, kernel, b in backward_launches(lolcats_fwd, binding,
                                                                                            ["o"], wrt)}
    return derived[name]


@pytest.mark.parametrize("arch, D", list(SHAPES))
@pytest.mark.parametrize("name", PROGRAMS)
def test_compiles_with_tensor_cores(arch, D, name):
    kernel, binding = _program(arch, D, name)
    check_compiled(kernel, binding, arch, (arch, D, name), SPILLING)


@pytest.mark.parametrize("arch, dims, size", [("sm_80", dict(F=128), 96), ("sm_90a", dict(D=128, V=128), 160)])
def test_over_budget_shapes_are_refused_by_name(arch, dims, size):
    """sm_90a at D = V = 128 whole: why the op runs 64-column value pieces."""
    with pytest.raises(TileError, match=rf"loop-carried state of {size} KiB .* exceeds the {arch} budget"):
        lolcats_fwd.trace(target=arch, **_specs(**dims))
