"""LoLCATs' sliding-window hybrid attention: exact softmax over the last ``window`` tokens and linear
attention over learned features (Hedgehog's ``[softmax(xW), softmax(-xW)]``) for every older token,
the two under one normaliser:

    o_t = (Σ_{t-W<s≤t} exp(scale·q_t·k_s - m_t) v_s + Σ_{s≤t-W} φq_t·φk_s v_s) / (the same sums without v)

with ``m_t`` the largest windowed score (LoLCATs' ``hybrid_attention_quadratic``). One sequential
program, linear in T: a chunk's queries see the window's keys in their own chunk and in the one
before it, carried as tiles (hence ``window <= 64``); older chunks come in through the carried
state ``Σ φk vᵀ`` and its normaliser ``Σ φk``. The feature map runs in torch, so its weights train
through torch's autograd; the backward of this program is derived from it.

Carried per program instance: the previous chunk's k, v and φk and the F x V state, in fp32:
96 KiB at D = V = 64 and 128 features (sm_90a's budget is 128 KiB; sm_80's 66 KiB holds 64 features).
The op runs the program once per ``VALUE_PIECE`` columns of v (each piece recomputes the weights), so
LoLCATs' Llama heads (D = V = 128, 128 features: 160 KiB whole) fit at 112 KiB."""

from __future__ import annotations

import torch

from tilemix.tiles import (
    Const,
    Out,
    Scalar,
    Seq,
    TileError,
    causal,
    chunks,
    colsum,
    exp,
    kernel,
    maximum,
    position,
    rowmax,
    rowsum,
    where,
    zeros,
)
from tilemix.tiles import window as sliding_window
from tilemix.tiles.errors import user_loc

from ._library import mixer
from .runtime import check_call, default_scale

__all__ = ["lolcats_attention", "lolcats_fwd", "CHUNK", "VALUE_PIECE"]

CHUNK = 64  # the program's chunk: the window's keys lie in a query's chunk and the one before it
VALUE_PIECE = 64  # value columns per program run: the carried v and state grow with them
NO_SCORE = -1e30  # a masked score: finite, so a row's max stays finite (its own key is always in the window)


@kernel
def lolcats_fwd(q: Seq["D"], k: Seq["D"], v: Seq["V"], q_features: Seq["F"], k_features: Seq["F"], scale: Scalar,
                o: Out[Seq["V"]], window: Const = CHUNK):
    """The previous chunk's k, v, φk are carried (``kp, vp, fkp``: zeros before the first chunk);
    the state ``s, z`` holds the chunks before that one."""
    if not 1 <= window <= CHUNK:
        raise TileError(f"lolcats_fwd(window={window!r}): the window takes 1 to {CHUNK} keys (a chunk and the one "
                        "before it hold them)", user_loc())
    kp, vp, fkp = zeros(CHUNK, q.cols), zeros(CHUNK, v.cols), zeros(CHUNK, q_features.cols)
    s, z = zeros(q_features.cols, v.cols), zeros(q_features.cols, 1)
    for c in chunks(CHUNK):
        qc, kc, vc, fqc, fkc = q[c], k[c], v[c], q_features[c], k_features[c]
        older_numerator, older_denominator = fqc @ s, fqc @ z  # read before s takes in the previous chunk
        queries = position(c)
        keys_before = queries.T - float(CHUNK)  # the previous chunk's positions, a row
        gap = queries - keys_before  # query minus key position, keys in the previous chunk
        linear_before = where(gap >= window, fqc @ fkp.T, 0.0)
        s, z = s + fkp.T @ vp, z + colsum(fkp).T  # early: fewer tiles live at once (fewer spills)
        here = sliding_window(qc @ kc.T * scale, window, fill=NO_SCORE)
        before = where(keys_before >= 0.0, where(gap < window, qc @ kp.T * scale, NO_SCORE), NO_SCORE)
        m = maximum(rowmax(here), rowmax(before))
        weights_here = exp(here - m)
        weights_before = exp(before - m) + linear_before
        if window < CHUNK:  # the chunk's own keys older than the window
            linear = fqc @ fkc.T
            weights_here = weights_here + causal(linear) - sliding_window(linear, window)
        numerator = weights_here @ vc + weights_before @ vp + older_numerator
        o[c] = numerator / (rowsum(weights_here) + rowsum(weights_before) + older_denominator)
        kp, vp, fkp = kc, vc, fkc


lolcats_mixer = mixer(lolcats_fwd, "tilemix::lolcats_attention")


def _check(q, k, v, q_features, k_features, window) -> None:
    check_call("lolcats_attention", differentiable=True, q=q, k=k, v=v, q_features=q_features, k_features=k_features)
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, T, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    for name, t in (("v", v), ("q_features", q_features)):
        if t.dim() != 4 or t.shape[:3] != q.shape[:3]:
            raise ValueError(f"{name}: expected [B, T, H, ...] with B, T, H = {list(q.shape[:3])}, "
                             f"got shape {tuple(t.shape)}")
    if k_features.shape != q_features.shape:
        raise ValueError(f"k_features: expected the shape of q_features {tuple(q_features.shape)}, "
                         f"got {tuple(k_features.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= CHUNK:
        raise ValueError(f"window: expected an int from 1 to {CHUNK} (the keys of a query's window lie in its "
                         f"chunk and the one before), got {window!r}")


def lolcats_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_features: torch.Tensor,
                      k_features: torch.Tensor, window: int = CHUNK, scale: float | None = None) -> torch.Tensor:
    """LoLCATs' hybrid attention, causal: softmax of ``scale · q·k`` over each token's last ``window``
    keys (itself included) and linear attention ``q_features · k_features`` over the keys before
    them, one normaliser for both.

    q, k: ``[B, T, H, D]``; v: ``[B, T, H, V]``; q_features, k_features: ``[B, T, H, F]``, the
    feature map's outputs (non-negative; Hedgehog's ``[softmax(xW), softmax(-xW)]``). LoLCATs'
    per-head ``window_factor`` w and ``linear_factor`` λ weight the two parts: pass
    ``q_features · λ / w`` (the one normaliser makes only their ratio count). scale defaults to
    ``D ** -0.5``. On a GPU, D, V and F are multiples of 64. Returns ``o [B, T, H, V]``;
    differentiable in all five tensors (the derived backward)."""
    _check(q, k, v, q_features, k_features, window)
    scale = default_scale(q, scale)
    pieces = [lolcats_mixer(q=q, k=k, v=piece, q_features=q_features, k_features=k_features, scale=scale,
                            window=window) for piece in v.split(VALUE_PIECE, dim=-1)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
