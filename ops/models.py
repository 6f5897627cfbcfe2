"""A hybrid language model on the tilemix layers: Mamba-2 blocks mixed with attention (grouped-query
as an option) and linear attention, for training (``forward``) and greedy generation (``generate``).

Decoding carries each layer's cache (``ops.layers``): the Mamba-2 layers' SSD state and convolution
tail, the linear-attention layers' state, the attention layers' keys and values. A decode step runs
the scans' decode steps (``ops/decode.py``: one token, the state read and written once, in place) and
attention's cached queries in torch. No positional encoding: the Mamba-2
layers' convolution and scan carry position, as in Jamba-style hybrids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LinearAttention, Mamba2Mixer, MultiHeadAttention

__all__ = ["HybridLM", "HybridBlock", "MLP", "LAYER_KINDS"]

LAYER_KINDS = ("mamba", "attention", "linear_attention")
MLP_KINDS = ("swiglu", "gelu")


class MLP(nn.Module):
    """The feed-forward half of a block: SwiGLU (``down(silu(gate) * up)``) or GELU (``down(gelu(up))``)."""

    def __init__(self, dim: int, hidden: int, kind: str = "swiglu", bias: bool = False):
        super().__init__()
        if kind not in MLP_KINDS:
            raise ValueError(f"mlp: unknown kind {kind!r}; expected one of {MLP_KINDS}")
        self.kind = kind
        self.up = nn.Linear(dim, 2 * hidden if kind == "swiglu" else hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))


class HybridBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` (RMSNorm)."""

    def __init__(self, mixer: nn.Module, dim: int, mlp: MLP, eps: float):
        super().__init__()
        self.mixer_norm, self.mixer = nn.RMSNorm(dim, eps=eps), mixer
        self.mlp_norm, self.mlp = nn.RMSNorm(dim, eps=eps), mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def extend(self, x: torch.Tensor, cache=None):
        """``x`` continuing the sequence the mixer's ``cache`` ends (None: a new one)."""
        y, cache = self.mixer.extend(self.mixer_norm(x), cache)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache


class HybridLM(nn.Module):
    """A causal language model: token embedding, blocks whose mixers are named by ``layers``
    ("mamba": ``Mamba2Mixer``, "attention": ``MultiHeadAttention``, "linear_attention":
    ``LinearAttention``), a final RMSNorm and an LM head (tied to the embedding unless
    ``tie_embeddings=False``).

    Mamba-2 layers have ``expand · dim / head_dim`` heads of ``head_dim`` and a state of ``state_dim``;
    attention layers ``heads`` query heads and ``kv_heads`` key/value heads (default ``heads``;
    fewer: grouped-query attention); linear attention ``heads`` heads with ``feature_map``. The MLP is
    ``mlp`` ("swiglu" or "gelu") of ``mlp_hidden`` units (default ``8/3 · dim`` for SwiGLU, ``4 · dim``
    for GELU, rounded up to a multiple of 16).

    >>> model = HybridLM(vocab_size=100, dim=64, layers=("mamba", "attention"), heads=2, head_dim=32,
    ...                  state_dim=16)
    >>> tokens = torch.randint(0, 100, (2, 10))
    >>> logits, loss = model(tokens, targets=tokens)
    >>> logits.shape
    torch.Size([2, 10, 100])
    >>> model.generate(tokens, max_new_tokens=3).shape
    torch.Size([2, 13])
    """

    def __init__(self, vocab_size: int, dim: int, layers: Sequence[str] = ("mamba", "attention"), *,
                 heads: int = 4, kv_heads: int | None = None, head_dim: int = 64, state_dim: int = 64,
                 expand: int = 2, conv_kernel: int = 4, feature_map: str = "elu+1", mlp: str = "swiglu",
                 mlp_hidden: int | None = None, tie_embeddings: bool = True, eps: float = 1e-6):
        super().__init__()
        if isinstance(layers, str) or not layers or any(kind not in LAYER_KINDS for kind in layers):
            raise ValueError(f"layers: expected a non-empty sequence of {LAYER_KINDS}, got {layers!r}")
        if (expand * dim) % head_dim:
            raise ValueError(f"head_dim: {head_dim} does not divide the Mamba-2 layers' inner width "
                             f"expand · dim = {expand * dim}")
        if mlp_hidden is None:
            mlp_hidden = -(-(8 * dim // 3 if mlp == "swiglu" else 4 * dim) // 16) * 16
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's: small logits from the tied head at the start
        self.blocks = nn.ModuleList(
            HybridBlock(self._mixer(kind, dim, heads, kv_heads, head_dim, state_dim, expand, conv_kernel,
                                    feature_map), dim, MLP(dim, mlp_hidden, mlp), eps)
            for kind in layers)
        self.layers = tuple(layers)
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _mixer(kind, dim, heads, kv_heads, head_dim, state_dim, expand, conv_kernel, feature_map) -> nn.Module:
        if kind == "mamba":
            return Mamba2Mixer(dim, expand * dim // head_dim, head_dim, state_dim, conv_kernel)
        if kind == "attention":
            return MultiHeadAttention(dim, heads, causal=True, kv_heads=kv_heads)
        return LinearAttention(dim, heads, feature_map=feature_map)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits ``[B, T, vocab]`` for tokens ``[B, T]`` (int64); with ``targets`` ``[B, T]`` (int64) also the
        mean cross-entropy over the targets other than -100: ``(logits, loss)``."""
        _check_tokens("tokens", tokens)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        _check_tokens("targets", targets)
        if targets.shape != tokens.shape:
            raise ValueError(f"targets: expected shape {list(tokens.shape)} (as tokens), got {list(targets.shape)}")
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def extend(self, tokens: torch.Tensor, caches: list | None = None):
        """``tokens`` ``[B, T]`` continuing the sequence that ``caches`` (one per block; None: a new
        sequence) ends: the last position's logits ``[B, vocab]`` and the caches after it."""
        x = self.embed(tokens)
        caches = list(caches) if caches is not None else [None] * len(self.blocks)
        for i, block in enumerate(self.blocks):
            x, caches[i] = block.extend(x, caches[i])
        return self.head(self.norm(x[:, -1])), caches

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, prefill_chunk: int | None = None) -> torch.Tensor:
        """Greedy continuation of ``prompt`` ``[B, T]``: ``[B, T + max_new_tokens]``. The prompt runs
        as one chunk (or chunks of ``prefill_chunk`` tokens), then one token per step, each layer
        carrying its cache."""
        _check_tokens("prompt", prompt)
        if prompt.shape[1] == 0:
            raise ValueError("prompt: expected at least one token per sequence, got shape "
                             f"{list(prompt.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        step = prompt.shape[1] if prefill_chunk is None else prefill_chunk
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"prefill_chunk: expected an int >= 1 or None, got {prefill_chunk!r}")
        caches = None
        for start in range(0, prompt.shape[1], step):
            logits, caches = self.extend(prompt[:, start:start + step], caches)
        out = [prompt]
        for i in range(max_new_tokens):
            out.append(logits.argmax(-1, keepdim=True))
            if i + 1 < max_new_tokens:
                logits, caches = self.extend(out[-1], caches)
        return torch.cat(out, 1)


def _check_tokens(name: str, tokens) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
        is_tensor = isinstance(tokens, torch.Tensor)
        what = f"a {tokens.dim()}-d {tokens.dtype} tensor" if is_tensor else type(tokens).__name__
        raise ValueError(f"{name}: expected token ids, an int64 tensor [B, T], got {what}")
