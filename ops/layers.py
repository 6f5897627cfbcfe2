"""Mixer layers: ``nn.Module``s with the usual projections around the tile ops.

All three train: the ops' backward kernels are tile programs (SSD's in ``ops/ssd_backward.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .linear_attention import linear_attention
from .ssd import ssd

__all__ = ["MultiHeadAttention", "LinearAttention", "Mamba2Mixer"]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, heads * D]`` → ``[B, T, heads, D]``: a view, which the GPU kernels read in place (no
    copy of a fused projection's slices)."""
    return x.unflatten(-1, (heads, -1))


class MultiHeadAttention(nn.Module):
    """Softmax attention with fused q/k/v and output projections.

    >>> layer = MultiHeadAttention(dim=256, heads=4, causal=True)
    >>> with torch.no_grad():
    ...     y = layer(torch.randn(2, 100, 256))
    >>> y.shape
    torch.Size([2, 100, 256])
    """

    def __init__(self, dim: int, heads: int, causal: bool = True, bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.out(attention(q, k, v, causal=self.causal).flatten(-2))


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "elu+1": lambda x: F.elu(x) + 1,  # positive features (Katharopoulos et al.)
    "relu": F.relu,
}


class LinearAttention(nn.Module):
    """Causal linear attention (no normalisation) with an optional feature map on q and k; the
    recurrent state can be carried across calls.

    >>> layer = LinearAttention(dim=256, heads=4, feature_map="elu+1")
    >>> with torch.no_grad():
    ...     y, state = layer(torch.randn(2, 100, 256), output_final_state=True)
    >>> y.shape, state.shape
    (torch.Size([2, 100, 256]), torch.Size([2, 4, 64, 64]))
    """

    def __init__(self, dim: int, heads: int, feature_map: str | Callable = "identity", bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        if isinstance(feature_map, str) and feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {feature_map!r}; expected one of {sorted(FEATURE_MAPS)} "
                             "or a callable")
        self.heads = heads
        self.feature_map = FEATURE_MAPS[feature_map] if isinstance(feature_map, str) else feature_map
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False):
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = self.feature_map(q), self.feature_map(k)
        o, state = linear_attention(q, k, v, initial_state=initial_state, output_final_state=output_final_state)
        y = self.out(o.flatten(-2))
        return (y, state) if output_final_state else y


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block's mixer: in-projection to (z, x, B, C, dt), a short causal depthwise
    convolution with SiLU over (x, B, C), the SSD scan with ``dt = softplus(dt + dt_bias)`` and
    ``A = -exp(A_log)``, a skip ``D·x``, gating by ``silu(z)``, out-projection.

    >>> layer = Mamba2Mixer(dim=256, heads=8, head_dim=64, state_dim=64)
    >>> with torch.no_grad():
    ...     y = layer(torch.randn(2, 100, 256))
    >>> y.shape
    torch.Size([2, 100, 256])
    """

    def __init__(self, dim: int, heads: int, head_dim: int = 64, state_dim: int = 64, conv_kernel: int = 4,
                 groups: int = 1, bias: bool = False):
        super().__init__()
        if heads % groups:
            raise ValueError(f"groups {groups} must divide heads {heads}")
        self.heads, self.head_dim, self.state_dim, self.groups = heads, head_dim, state_dim, groups
        inner, bc = heads * head_dim, 2 * groups * state_dim
        self.in_proj = nn.Linear(dim, 2 * inner + bc + heads, bias=bias)  # z, x, B, C, dt
        self.conv = nn.Conv1d(inner + bc, inner + bc, conv_kernel, groups=inner + bc, padding=conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, heads)))
        self.D = nn.Parameter(torch.ones(heads))
        self.out_proj = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False):
        batch, T, _ = x.shape
        inner, bc = self.heads * self.head_dim, 2 * self.groups * self.state_dim
        z, xbc, dt = self.in_proj(x).split([inner, inner + bc, self.heads], dim=-1)
        xbc = F.silu(self.conv(xbc.transpose(1, 2))[..., :T].transpose(1, 2))  # causal: drop the look-ahead
        xs, B, C = xbc.split([inner, bc // 2, bc // 2], dim=-1)
        exact = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # for dt, A, D
        dt = F.softplus(dt.to(exact) + self.dt_bias.to(exact))
        y, state = ssd(_heads(xs, self.heads), dt, -torch.exp(self.A_log.to(exact)),
                       _heads(B, self.groups), _heads(C, self.groups),
                       D=self.D.to(exact), initial_state=initial_state, output_final_state=output_final_state)
        out = self.out_proj(y.flatten(-2) * F.silu(z))
        return (out, state) if output_final_state else out
