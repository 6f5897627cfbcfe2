"""Bench rows of sliding-window attention (issue 29's bar): ``ops.attention(..., causal=True,
window=W)`` beside PyTorch's compiled ``flex_attention`` with a sliding-window block mask, forward
and backward, at ``WINDOW_SHAPE``."""

from __future__ import annotations

import functools

import torch

from tilemix import ops

from .calls import backward_of, leaves

__all__ = ["WINDOW_CASES", "WINDOW_SHAPE"]

WINDOW_SHAPE = (4, 16384, 16, 128)  # B, T, H, D of the bar


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_forward(q, k, v, window: int):
    """flex_attention on ``[B, T, H, D]`` tensors (transposed views, as it takes ``[B, H, T, D]``)
    with a block mask of the causal window, built once here (outside the timed calls)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    T = q.shape[1]
    mask = create_block_mask(in_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device=q.device)
    flex = _compiled_flex()

    def forward():
        out = flex(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=mask)
        return out.transpose(1, 2)

    return forward


def _keys_seen(T: int, window: int) -> int:
    """Σ_t min(W, t + 1): the (query, key) pairs inside the window."""
    full = max(T - window, 0)
    ramp = min(window, T)
    return full * window + ramp * (ramp + 1) // 2


def _window_case(B, T, H, D, dtype, window: int, backward: bool = False, device="cuda"):
    q, k, v, do = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(4))
    pairs = B * H * _keys_seen(T, window)
    shape = dict(B=B, T=T, H=H, D=D, causal=True, window=window)
    if not backward:
        nbytes = 4 * q.numel() * q.element_size()  # read q, k, v; write o
        return (lambda: ops.attention(q, k, v, causal=True, window=window)), _flex_forward(q, k, v, window), \
            "flex_attention", nbytes, 4 * pairs * D, shape
    q, k, v = leaves(q, k, v)
    nbytes = 8 * q.numel() * q.element_size()  # read q, k, v, o, do; write dq, dk, dv
    ours = backward_of(lambda: ops.attention(q, k, v, causal=True, window=window), (q, k, v), do)
    peer = backward_of(_flex_forward(q, k, v, window), (q, k, v), do)
    return ours, peer, "flex_attention", nbytes, 2.5 * 4 * pairs * D, shape  # 5 matmuls vs the forward's 2


WINDOW_CASES = {f"attention-window{w}{suffix}": functools.partial(_window_case, window=w, backward=bool(suffix))
                for w in (512, 2048) for suffix in ("", "-bwd")}
