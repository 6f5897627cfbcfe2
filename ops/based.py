"""Based: linear attention through the 2nd-order Taylor feature map,
``φ(q)·φ(k) = 1 + x + x²/2`` with ``x = scale · q·k`` (the Taylor expansion of ``exp``), causal and
normalised as flash-linear-attention's ``parallel_based``.

Linear in T: within a 64-token chunk the weights are computed directly; the chunks before it come
in through the state of the 1 + F + F² features, kept as its three parts: the running sum of the
values (the constant feature), ``Σ k vᵀ`` (F x V) and ``Σ (k⊗k) vᵀ`` (F² x V, ``outer``), with the
normaliser's column sums beside them. The backward is derived from the program.

On a GPU, q and k are padded with zero columns to 64 features (loads take 64-column panels, matmuls
N in 64-multiples): the program lowers for sm_90a, spilling (tests/test_based_compile.py); its
81 KiB state exceeds the sm_80 budget (66 KiB), so the generic target refuses it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tilemix.tiles import Const, Out, Scalar, Seq, causal, chunks, colsum, kernel, outer, rowsum, zeros

from ._library import mixer
from .runtime import check_call, default_scale

__all__ = ["based", "based_fwd", "FEATURES", "GPU_FEATURES", "GPU_VALUES"]

FEATURES = 16  # the feature dim Based projects q and k to (fla's parallel_based, ThunderKittens)
GPU_FEATURES = 64  # the width GPU loads take (128-byte panels): q and k padded with zero columns to it
GPU_VALUES = 64  # the value dim the GPU kernels take: loads are 64 wide, and at 128 the F² x V state is over budget


@kernel
def based_fwd(q: Seq["F"], k: Seq["F"], v: Seq["V"], scale: Scalar, o: Out[Seq["V"]], normalize: Const = True):
    """q and k hold Based's 16 features, then (on a GPU) zero columns up to the 64 its loads take."""
    f, width = q.cols, v.cols
    s0, s1, s2 = zeros(1, width), zeros(f, width), zeros(FEATURES ** 2, width)  # Σ v, Σ k vᵀ, Σ (k⊗k) vᵀ
    z0, z1, z2 = zeros(1, 1), zeros(f, 1), zeros(FEATURES ** 2, 1)  # the same sums of 1 in place of v
    for c in chunks(64):
        qc, kc, vc = q[c] * scale, k[c], v[c]
        qq = outer(qc[:, 0:FEATURES], qc[:, 0:FEATURES]) * 0.5
        x = qc @ kc.T
        weights = causal(1.0 + x + x * x * 0.5)
        numerator = weights @ vc + s0 + qc @ s1 + qq @ s2
        o[c] = numerator / (rowsum(weights) + z0 + qc @ z1 + qq @ z2 + 1e-6) if normalize else numerator
        kk = outer(kc[:, 0:FEATURES], kc[:, 0:FEATURES])  # after the output: fewer 64x256 tiles live at once
        s0, s1, s2 = s0 + colsum(vc), s1 + kc.T @ vc, s2 + kk.T @ vc
        if normalize:
            z0, z1, z2 = z0 + 64.0, z1 + colsum(kc).T, z2 + colsum(kk).T  # 64: only a last chunk is partial

based_mixer = mixer(based_fwd, "tilemix::based")


def _check(q, k, v, normalize) -> None:
    check_call("based", differentiable=True, flags=dict(normalize=normalize), q=q, k=k, v=v)
    if q.dim() != 4 or q.shape[-1] != FEATURES:
        raise ValueError(f"q: expected [B, T, H, {FEATURES}] (Based's feature dim is {FEATURES}: the state holds "
                         f"1 + F + F² features), got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected [B, T, H, V] with B, T, H = {list(q.shape[:3])}, got shape {tuple(v.shape)}")
    if q.device.type != "cpu" and v.shape[-1] != GPU_VALUES:
        raise ValueError(f"v: the GPU kernels take V = {GPU_VALUES} (CPU tensors any V), got {v.shape[-1]}")


def based(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
          normalize: bool = True) -> torch.Tensor:
    """Based's Taylor-feature linear attention (flash-linear-attention's ``parallel_based``
    convention, its ``use_norm`` named ``normalize``): ``o_t = Σ_{s≤t} w_ts v_s`` with
    ``w_ts = 1 + x + x²/2``, ``x = scale · q_t·k_s``, divided by ``Σ_{s≤t} w_ts + 1e-6`` when
    ``normalize``.

    On a GPU, q and k travel padded with zero columns to 64 features (the width the kernels load).
    q, k: ``[B, T, H, 16]``; v: ``[B, T, H, V]`` (on a GPU V = 64); scale defaults to ``16 ** -0.5``. Returns
    ``o [B, T, H, V]``. Differentiable (the derived backward)."""
    _check(q, k, v, normalize)
    scale = default_scale(q, scale)
    if q.device.type != "cpu":
        q, k = (F.pad(t, (0, GPU_FEATURES - FEATURES)) for t in (q, k))
    return based_mixer(q=q, k=k, v=v, scale=scale, normalize=bool(normalize))
