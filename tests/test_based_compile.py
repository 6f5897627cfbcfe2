"""based on the GPU targets: the forward program at the layout the op passes on a GPU (q and k padded
to 64 features) and the backward programs derived from it compile for sm_90a with wgmma, spilling
where measured below; sm_80 refuses the program by name (its state is over the generic budget), and
both targets refuse Based's 16 features unpadded (loads take 64-column panels)."""

from __future__ import annotations

import pytest
from compile_checks import check_compiled

from tilemix.ops.based import FEATURES, GPU_FEATURES, based_fwd
from tilemix.tiles import TensorSpec, TileError

pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from tilemix.ops.derived_cuda import backward_launches  # noqa: E402

# (program, normalize) -> local memory bytes measured on sm_90a: the 256x64 fp32 state of the k⊗k
# features beside the 64x256 feature tiles of a chunk do not fit a warpgroup's registers
SPILLING = {("forward", True): 1744, ("states", True): 1032, ("d_q", True): 1192, ("d_k", True): 2392,
            ("d_v", True): 1728, ("forward", False): 608}


def _specs(features: int, normalize: bool = True, B=8, T=4096, H=16, V=64) -> dict:
    seq = lambda width: TensorSpec((B, T, H, width), "bfloat16")  # noqa: E731
    return dict(q=seq(features), k=seq(features), v=seq(V), scale=FEATURES ** -0.5, normalize=normalize)


def _programs(normalize: bool) -> dict:
    binding = based_fwd.bind(_specs(GPU_FEATURES, normalize))
    found = {"forward": (based_fwd, binding)}
    if normalize:  # the backward of the default; normalize=False's differs only by the normaliser's terms
        for name, derived, derived_binding in backward_launches(based_fwd, binding, ["o"], ["q", "k", "v"]):
            found[f"d_{name}" if name else "states"] = (derived, derived_binding)
    return found


@pytest.mark.parametrize("program, normalize", list(SPILLING))
def test_compiles_for_sm90a_with_wgmma(program, normalize):
    kernel, binding = _programs(normalize)[program]
    check_compiled(kernel, binding, "sm_90a", (program, normalize), SPILLING)


@pytest.mark.parametrize("features, size", [(GPU_FEATURES, 81), (FEATURES, 69)])
def test_sm80_refuses_the_state_by_name(features, size):
    """The F² x V state alone is 64 KiB at V = 64: over the generic target's budget at either width."""
    with pytest.raises(TileError, match=rf"loop-carried state of {size} KiB .* exceeds the sm_80 budget of 66 KiB"):
        based_fwd.trace(target="sm_80", **_specs(features))


def test_unpadded_features_are_refused_by_name_on_sm90a():
    """Why the op pads: 16-wide tiles do not load."""
    with pytest.raises(TileError, match="tiles loaded from q are 16 wide; feature dims must be multiples of 64"):
        based_fwd.trace(target="sm_90a", **_specs(FEATURES))
