"""Mixer layers: ``nn.Module``s with the usual projections around the tile ops.

All train: the ops' backward kernels are tile programs (SSD's in ``ops/ssd_backward.py``; DeltaNet's derived).
Each also continues a sequence from a cache, ``extend(x, cache) -> (y, cache)``: a prefill (many
tokens) or a decode step (one), what ``ops.models`` generates with. Linear attention's and Mamba-2's
one-token steps without gradients run the decode steps (``ops/decode.py``), which update the cache's
state in place (copy a cache to branch from it); the other scans run their chunked programs at T = 1,
attention's cached steps run in torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .based import FEATURES, based
from .bidirectional import prefix_linear_attention
from .decode import linear_attention_step, ssd_step
from .delta_rule import delta_rule, gated_delta_rule
from .gated import gla, retention, rwkv6
from .linear_attention import linear_attention
from .lolcats import lolcats_attention
from .long_conv import gated_long_conv
from .mlstm import mlstm
from .rwkv7 import rwkv7
from .selective_scan import selective_scan
from .ssd import ssd

__all__ = ["MultiHeadAttention", "LinearAttention", "Mamba2Mixer", "KVCache", "Mamba2Cache", "DeltaNet", "Retention",
           "GatedLinearAttention", "RWKV6TimeMix", "Mamba1Mixer", "MLSTMLayer", "Based", "H3Conv",
           "HedgehogFeatureMap", "LoLCATsAttention", "RWKV7TimeMix"]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, heads * D]`` → ``[B, T, heads, D]``: a view, which the GPU kernels read in place (no
    copy of a fused projection's slices)."""
    return x.unflatten(-1, (heads, -1))


class _MultiHead(nn.Module):
    """A layer of ``heads`` heads on a ``dim``-wide stream between a fused input projection
    (``in_proj``: x to the op's inputs, of ``widths`` columns each) and an output projection
    (``out``, from the ``dim`` columns of the heads' outputs)."""

    def __init__(self, dim: int, heads: int, widths: Sequence[int], bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads, self.widths = heads, tuple(widths)
        self.in_proj = nn.Linear(dim, sum(self.widths), bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def _inputs(self, x: torch.Tensor, heads: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``x`` projected and cut into the op's inputs, each ``[B, T, h, width / h]`` with ``h`` from
        ``heads`` (one count per input; default ``self.heads`` each)."""
        parts = self.in_proj(x).split(self.widths, dim=-1)
        return [_heads(t, h) for t, h in zip(parts, heads or [self.heads] * len(parts))]

    def _projected(self, o: torch.Tensor, state, output_final_state: bool):
        """The heads' output ``o`` through ``self.out``, with ``state`` when it was asked for."""
        y = self.out(o.flatten(-2))
        return (y, state) if output_final_state else y


class _Recurrent(_MultiHead):
    """A layer whose state continues a sequence: ``forward(x, initial_state=, output_final_state=)``."""

    def extend(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` continuing the sequence whose state is ``cache`` (None: a new one): its output and state."""
        return self(x, initial_state=cache, output_final_state=True)


class KVCache(NamedTuple):
    """An attention layer's keys and values so far, ``[B, T, H_kv, D]`` each."""

    k: torch.Tensor
    v: torch.Tensor


class MultiHeadAttention(_MultiHead):
    """Softmax attention with fused q/k/v and output projections; ``kv_heads`` < ``heads`` makes it
    grouped-query attention (``kv_heads`` must divide ``heads``; 1: multi-query).

    >>> layer = MultiHeadAttention(dim=256, heads=4, causal=True, kv_heads=2)
    >>> with torch.no_grad():
    ...     y = layer(torch.randn(2, 100, 256))
    >>> y.shape
    torch.Size([2, 100, 256])
    """

    def __init__(self, dim: int, heads: int, causal: bool = True, bias: bool = False, kv_heads: int | None = None):
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads {kv_heads} must divide heads {heads}")
        kv_dim = dim // heads * kv_heads
        super().__init__(dim, heads, (dim, kv_dim, kv_dim), bias)
        self.kv_heads, self.causal = kv_heads, causal

    def _qkv(self, x: torch.Tensor):
        return self._inputs(x, (self.heads, self.kv_heads, self.kv_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(attention(*self._qkv(x), causal=self.causal).flatten(-2))

    def extend(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """``x`` continuing the sequence whose keys and values ``cache`` holds (None: a new one): the
        output for x's tokens and the cache with theirs appended (a copy: O(T) a step). x's queries
        attend to all the keys, causal aligned to the end (cross-attention; a few queries against a
        long cache run split over the keys, ``ops/attention_decode.py``)."""
        if not self.causal:
            raise ValueError("extend: a non-causal layer's earlier outputs depend on later tokens; "
                             "only causal attention continues a sequence")
        q, k, v = self._qkv(x)
        if cache is not None:
            k, v = torch.cat([cache.k, k], 1), torch.cat([cache.v, v], 1)
        return self.out(attention(q, k, v, causal=True).flatten(-2)), KVCache(k, v)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "elu+1": lambda x: F.elu(x) + 1,  # positive features (Katharopoulos et al.)
    "relu": F.relu,
}


class LinearAttention(_Recurrent):
    """Causal linear attention (no normalisation) with an optional feature map on q and k; the
    recurrent state can be carried across calls. ``causal=False``: bidirectional (SANA, linear DiT),
    normalised by the key sum when ``normalize`` (a positive feature map keeps that sum from 0);
    ``forward(x, prefix_len=P)``: JRT-RNN's prefix form, bidirectional over the first P tokens.

    >>> layer = LinearAttention(dim=256, heads=4, feature_map="elu+1")
    >>> with torch.no_grad():
    ...     y, state = layer(torch.randn(2, 100, 256), output_final_state=True)
    >>> y.shape, state.shape
    (torch.Size([2, 100, 256]), torch.Size([2, 4, 64, 64]))
    """

    def __init__(self, dim: int, heads: int, feature_map: str | Callable = "identity", bias: bool = False,
                 causal: bool = True, normalize: bool = False):
        super().__init__(dim, heads, (dim,) * 3, bias)
        if isinstance(feature_map, str) and feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {feature_map!r}; expected one of {sorted(FEATURE_MAPS)} "
                             "or a callable")
        if normalize and causal:
            raise ValueError("normalize: True is supported with causal=False only")
        self.causal, self.normalize = causal, normalize
        self.feature_map = FEATURE_MAPS[feature_map] if isinstance(feature_map, str) else feature_map

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._inputs(x)
        return self.feature_map(q), self.feature_map(k), v

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False, prefix_len: int | None = None):
        q, k, v = self._qkv(x)
        if prefix_len is not None:
            if not self.causal or initial_state is not None or output_final_state:
                raise ValueError("prefix_len: the prefix form runs on a causal layer, without states")
            o, state = prefix_linear_attention(q, k, v, prefix_len), None
        else:
            o, state = linear_attention(q, k, v, initial_state=initial_state, output_final_state=output_final_state,
                                        causal=self.causal, normalize=self.normalize)
        return self._projected(o, state, output_final_state)

    def extend(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``_Recurrent.extend``; one token without gradients runs the decode step, updating the
        cache's state in place."""
        if not _decode_step(x, cache):
            return super().extend(x, cache)
        return self.out(linear_attention_step(*self._qkv(x), cache).flatten(-2)), cache


def _decode_step(x: torch.Tensor, cache) -> bool:
    """Whether ``extend(x, cache)`` is a decode step: one token continuing a cache, no gradient."""
    return cache is not None and x.shape[1] == 1 and not torch.is_grad_enabled()


class Retention(_MultiHead):
    """Multi-scale retention (RetNet) between projections; head h decays by ``1 - 2^(-5-h)``.

    >>> layer = Retention(dim=128, heads=2)
    >>> with torch.no_grad():
    ...     y, state = layer(torch.randn(2, 100, 128), output_final_state=True)
    >>> y.shape, state.shape
    (torch.Size([2, 100, 128]), torch.Size([2, 2, 64, 64]))
    """

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__(dim, heads, (dim,) * 3, bias)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None, output_final_state: bool = False):
        o, state = retention(*self._inputs(x), initial_state=initial_state, output_final_state=output_final_state)
        return self._projected(o, state, output_final_state)


class Based(_MultiHead):
    """Based's linear attention between projections (``BasedLinearAttention`` in flash-linear-attention):
    q and k projected to 16 features a head, the Taylor feature map, normalised. The full Based block's
    sliding-window softmax attention is a separate layer.

    >>> layer = Based(dim=128, heads=2)
    >>> with torch.no_grad():
    ...     y = layer(torch.randn(2, 100, 128))
    >>> y.shape
    torch.Size([2, 100, 128])
    """

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__(dim, heads, (heads * FEATURES, heads * FEATURES, dim), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(based(*self._inputs(x)).flatten(-2))


class H3Conv(nn.Module):
    """H3's gated long convolution between projections (the shift-free core of H3 and of an order-2
    Hyena operator): ``q, k, v = x W``, ``y = (q ⊙ long_conv(k ⊙ v, h)) W_o`` with one explicit
    filter ``h`` per channel of ``max_len`` taps, initialised to decaying noise (each channel at its
    own rate, as Hyena's exponential modulation), cut to the sequence's length.

    >>> layer = H3Conv(dim=64, max_len=256)
    >>> with torch.no_grad():
    ...     y = layer(torch.randn(2, 100, 64))
    >>> y.shape
    torch.Size([2, 100, 64])
    """

    def __init__(self, dim: int, max_len: int, bias: bool = False):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)
        rates = torch.logspace(-2, 0, dim)[:, None]  # taps per e-fold: 1 to 100
        self.kernel = nn.Parameter(torch.randn(dim, max_len) * torch.exp(-rates * torch.arange(max_len)) * rates.sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.kernel.shape[1]:
            raise ValueError(f"x: {length} tokens, more than the filters' max_len = {self.kernel.shape[1]}")
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(gated_long_conv(q, k, v, self.kernel[:, :length].to(x.dtype)))


class GatedLinearAttention(_MultiHead):
    """GLA between projections: the log forget gates come from x, ``logsigmoid(x W_g) / 16`` (the
    GLA paper's gate temperature), so the state forgets slowly at initialisation.

    >>> layer = GatedLinearAttention(dim=128, heads=2)
    >>> with torch.no_grad():
    ...     y = layer(torch.randn(2, 100, 128))
    >>> y.shape
    torch.Size([2, 100, 128])
    """

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__(dim, heads, (dim,) * 4, bias)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None, output_final_state: bool = False):
        q, k, v, g = self._inputs(x)
        o, state = gla(q, k, v, F.logsigmoid(g) / 16, initial_state=initial_state,
                       output_final_state=output_final_state)
        return self._projected(o, state, output_final_state)


class RWKV6TimeMix(_MultiHead):
    """RWKV-6's time mixing between projections (without its token shift): data-dependent log
    decays ``w = -exp(x W_w)`` and a learned per-head bonus ``u``.

    >>> layer = RWKV6TimeMix(dim=128, heads=2)
    >>> with torch.no_grad():
    ...     y = layer(torch.randn(2, 100, 128))
    >>> y.shape
    torch.Size([2, 100, 128])
    """

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__(dim, heads, (dim,) * 4, bias)
        self.bonus = nn.Parameter(torch.zeros(heads, dim // heads))

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None, output_final_state: bool = False):
        r, k, v, w = self._inputs(x)
        o, state = rwkv6(r, k, v, -w.exp(), self.bonus, initial_state=initial_state,
                         output_final_state=output_final_state)
        return self._projected(o, state, output_final_state)


class RWKV7TimeMix(_Recurrent):
    """RWKV-7's time mixing between projections (without its token shift, LoRAs and output group
    norm): log decays ``w = -exp(-0.5) · sigmoid(x W_w)``, the removal key ``κ̂ = normalize(k)`` with its
    in-context rate ``η = sigmoid(x W_η)``, so the state moves by ``diag(exp w) - κ̂ (κ̂ ⊙ η)ᵀ``.

    >>> layer = RWKV7TimeMix(dim=128, heads=2)
    >>> with torch.no_grad():
    ...     y = layer(torch.randn(2, 100, 128))
    >>> y.shape
    torch.Size([2, 100, 128])
    """

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__(dim, heads, (dim,) * 5, bias)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None, output_final_state: bool = False):
        r, w, k, v, rate = self._inputs(x)
        removal = F.normalize(k, dim=-1)
        o, state = rwkv7(r, -math.exp(-0.5) * w.sigmoid(), k, v, -removal, removal * rate.sigmoid(),
                         initial_state=initial_state, output_final_state=output_final_state)
        return self._projected(o, state, output_final_state)


class Mamba2Cache(NamedTuple):
    """A Mamba-2 layer's state between calls: the depthwise convolution's last ``conv_kernel - 1``
    inputs ``[B, conv_kernel - 1, channels]`` and the SSD state ``[B, H, N, P]`` (float32; float64 in a
    float64 model)."""

    conv: torch.Tensor
    ssm: torch.Tensor


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

    def _split(self, x: torch.Tensor):
        inner, bc = self.heads * self.head_dim, 2 * self.groups * self.state_dim
        return self.in_proj(x).split([inner, inner + bc, self.heads], dim=-1)  # z, xbc, dt

    def _scan(self, xbc, z, dt, initial_state, output_final_state: bool, in_place: bool = False):
        """From the convolution's output on: SiLU, the SSD scan, gating and out-projection.
        ``in_place``: the decode step, ``initial_state`` updated in place (and returned)."""
        inner, n = self.heads * self.head_dim, self.groups * self.state_dim
        xs, B, C = F.silu(xbc).split([inner, n, n], dim=-1)
        exact = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype  # for dt, A, D
        dt = F.softplus(dt.to(exact) + self.dt_bias.to(exact))
        args = (_heads(xs, self.heads), dt, -torch.exp(self.A_log.to(exact)), _heads(B, self.groups),
                _heads(C, self.groups))
        if in_place:
            y, state = ssd_step(*args, initial_state, D=self.D.to(exact)), initial_state
        else:
            y, state = ssd(*args, D=self.D.to(exact), initial_state=initial_state,
                           output_final_state=output_final_state)
        return self.out_proj(y.flatten(-2) * F.silu(z)), state

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False):
        T = x.shape[1]
        z, xbc, dt = self._split(x)
        xbc = self.conv(xbc.transpose(1, 2))[..., :T].transpose(1, 2)  # causal: drop the look-ahead
        out, state = self._scan(xbc, z, dt, initial_state, output_final_state)
        return (out, state) if output_final_state else out

    def extend(self, x: torch.Tensor, cache: Mamba2Cache | None = None) -> tuple[torch.Tensor, Mamba2Cache]:
        """``x`` continuing the sequence ``cache`` ends (None: a new one): its output and the cache
        after it. The convolution reads the cached inputs in place of its zero padding; one token
        without gradients runs the decode step, updating the cache's SSD state in place."""
        z, xbc, dt = self._split(x)
        tail = self.conv.kernel_size[0] - 1
        before = xbc.new_zeros(x.shape[0], tail, xbc.shape[-1]) if cache is None else cache.conv
        window = torch.cat([before, xbc], 1)
        xbc = F.conv1d(window.transpose(1, 2), self.conv.weight, self.conv.bias,
                       groups=self.conv.groups).transpose(1, 2)
        out, state = self._scan(xbc, z, dt, None if cache is None else cache.ssm, True, _decode_step(x, cache))
        return out, Mamba2Cache(window[:, window.shape[1] - tail:], state)


class Mamba1Mixer(nn.Module):
    """Mamba-1's mixer without its convolution: in-projection to (x, z), ``silu(x)``, x-projection to
    (low-rank Δ, B, C), Δ's up-projection, the selective scan with ``Δ = softplus(Δ + dt_bias)``,
    ``A = -exp(A_log)`` (S4D-real: ``A[d, n] = -(n + 1)``) and a skip ``D·x``, gated by ``silu(z)``,
    out-projection.

    >>> layer = Mamba1Mixer(dim=64, inner=128, state_dim=16)
    >>> with torch.no_grad():
    ...     y, state = layer(torch.randn(2, 100, 64), output_final_state=True)
    >>> y.shape, state.shape
    (torch.Size([2, 100, 64]), torch.Size([2, 128, 16]))
    """

    def __init__(self, dim: int, inner: int | None = None, state_dim: int = 16, dt_rank: int | None = None,
                 bias: bool = False):
        super().__init__()
        inner = inner or 2 * dim
        self.dt_rank, self.state_dim = dt_rank or -(-dim // 16), state_dim
        self.in_proj = nn.Linear(dim, 2 * inner, bias=bias)  # x, z
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * state_dim, bias=False)  # Δ (low rank), B, C
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(inner))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state_dim + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None, output_final_state: bool = False):
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = F.silu(xs)
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.state_dim, self.state_dim], dim=-1)
        exact = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # for A, D, dt_bias
        y, state = selective_scan(xs, self.dt_proj(dt), -torch.exp(self.A_log.to(exact)), B, C, D=self.D.to(exact),
                                  z=z, delta_bias=self.dt_bias.to(exact), delta_softplus=True,
                                  initial_state=initial_state, output_final_state=output_final_state)
        out = self.out_proj(y)
        return (out, state) if output_final_state else out


class DeltaNet(_Recurrent):
    """DeltaNet (``gated=False``) or gated DeltaNet: q, k, v projections with L2-normalised q and k
    (a contracting recurrence), ``beta = sigmoid(x W_β)`` per head and, when gated, the log decay
    ``g = logsigmoid(x W_g)`` per head; the state can be carried across calls.

    >>> layer = DeltaNet(dim=128, heads=2, gated=True)
    >>> with torch.no_grad():
    ...     y, state = layer(torch.randn(2, 100, 128), output_final_state=True)
    >>> y.shape, state.shape
    (torch.Size([2, 100, 128]), torch.Size([2, 2, 64, 64]))
    """

    def __init__(self, dim: int, heads: int, gated: bool = False, bias: bool = False):
        super().__init__(dim, heads, (dim,) * 3, bias)
        self.gated = gated
        self.gates = nn.Linear(dim, (2 if gated else 1) * heads, bias=True)  # beta, then g

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False):
        q, k, v = self._inputs(x)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = self.gates(x)
        beta = torch.sigmoid(gates[..., :self.heads])
        if self.gated:
            o, state = gated_delta_rule(q, k, v, F.logsigmoid(gates[..., self.heads:]), beta,
                                        initial_state=initial_state, output_final_state=output_final_state)
        else:
            o, state = delta_rule(q, k, v, beta, initial_state=initial_state, output_final_state=output_final_state)
        return self._projected(o, state, output_final_state)


class MLSTMLayer(_MultiHead):
    """xLSTM's mLSTM between projections, minimal: q, k, v and per-head input and forget gate
    pre-activations from x, the forget gates' bias spread over 3 .. 6 per head as in xLSTM (a state
    that forgets slowly at initialisation); no output gate, norm or convolution around it.

    >>> layer = MLSTMLayer(dim=128, heads=2)
    >>> with torch.no_grad():
    ...     y = layer(torch.randn(2, 100, 128))
    >>> y.shape
    torch.Size([2, 100, 128])
    """

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__(dim, heads, (dim,) * 3, bias)
        self.gates = nn.Linear(dim, 2 * heads)
        with torch.no_grad():
            self.gates.bias[heads:] = torch.linspace(3.0, 6.0, heads)

    def forward(self, x: torch.Tensor, initial_state: tuple | None = None, output_final_state: bool = False):
        q, k, v = self._inputs(x)
        i, f = self.gates(x).float().chunk(2, dim=-1)
        h, state = mlstm(q, k, v, i, f, initial_state=initial_state, output_final_state=output_final_state)
        return self._projected(h, state, output_final_state)


class HedgehogFeatureMap(nn.Module):
    """Hedgehog's learned feature map, per head: ``φ(x) = [softmax(x W_h), softmax(-x W_h)]`` over the
    ``features`` columns of ``x W_h`` (``2 · features`` outputs), ``W_h`` the identity at initialisation
    (LoLCATs' init). ``[B, T, H, head_dim]`` → ``[B, T, H, 2 · features]`` in ``x``'s dtype.

    >>> HedgehogFeatureMap(heads=2, head_dim=64)(torch.randn(1, 5, 2, 64)).shape
    torch.Size([1, 5, 2, 128])
    """

    def __init__(self, heads: int, head_dim: int, features: int | None = None):
        super().__init__()
        features = head_dim if features is None else features
        self.weight = nn.Parameter(torch.eye(head_dim, features).repeat(heads, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bthd,hdf->bthf", x, self.weight.to(x.dtype))
        return torch.cat([y.softmax(-1), (-y).softmax(-1)], dim=-1)


class LoLCATsAttention(_MultiHead):
    """LoLCATs' linearised attention: q/k/v projections, a Hedgehog feature map for q and one for k,
    and ``lolcats_attention`` (softmax over the last ``window`` tokens, linear attention over the older
    ones, one normaliser), the window weighted against the linear part by a learned per-head factor
    ``sigmoid(window_factors)`` (LoLCATs' init: 0, a half). ``features`` per softmax half default to
    the head dim; on a GPU ``2 · features`` is a multiple of 64.

    >>> layer = LoLCATsAttention(dim=128, heads=2)
    >>> with torch.no_grad():
    ...     y = layer(torch.randn(2, 100, 128))
    >>> y.shape
    torch.Size([2, 100, 128])
    """

    def __init__(self, dim: int, heads: int, window: int = 64, features: int | None = None, bias: bool = False):
        super().__init__(dim, heads, (dim,) * 3, bias)
        self.window = window
        self.q_map, self.k_map = (HedgehogFeatureMap(heads, dim // heads, features) for _ in range(2))
        self.window_factors = nn.Parameter(torch.zeros(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._inputs(x)
        # w·window + linear under one normaliser is window + linear / w: the factor moves to q's features
        q_features = (self.q_map(q) / torch.sigmoid(self.window_factors)[:, None]).to(q.dtype)
        o = lolcats_attention(q, k, v, q_features, self.k_map(k), window=self.window)
        return self.out(o.flatten(-2))
