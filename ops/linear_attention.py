"""Linear attention: ``S_t = S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``."""

from __future__ import annotations

import torch

from tilemix.tiles import Out, Scalar, Seq, State, causal, chunks, kernel

from ._dispatch import check_call, default_scale
from ._library import no_state, tile_op

__all__ = ["linear_attention", "linear_attention_fwd"]


@kernel
def linear_attention_fwd(q: Seq["K"], k: Seq["K"], v: Seq["V"], scale: Scalar,
                         o: Out[Seq["V"]], s: State["K", "V"] = None):
    for c in chunks(64):
        qc, kc, vc = q[c] * scale, k[c], v[c]
        o[c] = causal(qc @ kc.T) @ vc + qc @ s  # within the chunk + everything before it
        s = s + kc.T @ vc


linear_attention_op = tile_op(
    "linear_attention",
    "(Tensor q, Tensor k, Tensor v, float scale, Tensor? initial_state, bool output_final_state) -> (Tensor, Tensor)",
    linear_attention_fwd,
    lambda q, k, v, scale, initial_state, final: (dict(q=q, k=k, v=v, scale=scale, s=initial_state),
                                                  {"s": "initial_state"}, ("s",) if final else ()),
    lambda out: (out["o"], out.get("s", no_state(out["o"]))))


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     initial_state: torch.Tensor | None = None, output_final_state: bool = False):
    """Causal linear attention without normalisation (flash-linear-attention's
    ``chunk_linear_attn`` convention).

    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; scale defaults to ``K ** -0.5``;
    initial_state: float32 ``[B, H, K, V]`` or None (zeros).
    Returns ``(o [B, T, H, V], final_state [B, H, K, V] or None)``.
    """
    check_call("linear_attention", q=q, k=k, v=v, initial_state=initial_state)
    o, state = linear_attention_op(q, k, v, default_scale(q, scale), initial_state, bool(output_final_state))
    return o, (state if output_final_state else None)
