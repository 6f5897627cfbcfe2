"""Bench rows of the hybrid language model (issue 24): ``model-generate`` (greedy generation: a
1024-token prompt, then 256 tokens one step at a time, for 32 sequences) and ``model-train`` (one
training step, forward and backward, B=8 T=4096), of ``ops.models.HybridLM`` with d_model 1024, 8
blocks of which 2 attention, vocab 32k.

The peer is the same model, same weights, with its mixers' kernels swapped (``peer_mixers``):
attention through torch's SDPA, Mamba-2's scan through mamba_ssm's ``mamba_chunk_scan_combined``
(Triton, chunk 256 as Mamba-2 runs it) and its decode step through ``selective_state_update``, each
in mamba_ssm's state layout ``[B, H, P, N]``. Everything else (projections, convolution, norms, MLP,
the KV cache) is the same code on both sides."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F

from tilemix.ops import layers
from tilemix.ops.models import HybridLM

from .mixers import mamba_chunk_scan_combined, selective_state_update

__all__ = ["MODEL_CASES", "MODEL_SHAPES", "MODEL_TIMING", "build_model", "mamba_step", "peer_mixers"]

MODEL = dict(vocab_size=32768, dim=1024, head_dim=64, state_dim=128)
BLOCKS = ("mamba",) * 3 + ("attention",) + ("mamba",) * 3 + ("attention",)
NEW_TOKENS = 256
MAMBA_CHUNK = 256  # Mamba-2's default chunk size
MODEL_SHAPES = {"model-generate": (32, 1024, 16, 64), "model-train": (8, 4096, 16, 64)}  # B, T, heads, head dim
# a whole model call takes 0.1-2 s: a few repetitions, not the kernel rows' 40
MODEL_TIMING = {name: dict(warmup=2, reps=5) for name in MODEL_SHAPES}


def build_model(heads: int, head_dim: int, dtype=torch.bfloat16, device="cuda", **overrides) -> HybridLM:
    """The bars' model (``MODEL`` and ``BLOCKS``, grouped-query attention with 4 key/value heads),
    seeded, in ``dtype``; ``overrides`` replace ``MODEL``'s entries (the CPU tests' tiny model)."""
    torch.manual_seed(0)
    config = {**MODEL, "head_dim": head_dim, **overrides}
    model = HybridLM(layers=BLOCKS, heads=heads, kv_heads=max(1, heads // 4), **config)
    return model.to(device=device, dtype=dtype)


def _sdpa(q, k, v, causal=False, scale=None):
    """``ops.attention``'s call, through torch's SDPA (``[B, T, H, D]`` in and out); causal aligned to
    the end as ops.attention does when queries are fewer than keys (a decode step against a cache),
    where SDPA's ``is_causal`` aligns to the start."""
    Tq, Tk = q.shape[1], k.shape[1]
    mask = None
    if causal and Tq != Tk:
        positions = torch.arange(Tk, device=q.device)
        mask = positions <= positions[Tk - Tq:, None]  # key j visible to query i
    o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                       is_causal=causal and mask is None, scale=scale,
                                       enable_gqa=k.shape[2] != q.shape[2])
    return o.transpose(1, 2)


def _mamba_scan(scan: Callable):
    """``ops.ssd``'s call through Mamba-2's chunked scan; the state in mamba_ssm's layout."""
    def ssd(x, dt, A, B, C, D=None, initial_state=None, output_final_state=False):
        out = scan(x, dt, A, B, C, chunk_size=MAMBA_CHUNK, D=D, initial_states=initial_state,
                   return_final_states=output_final_state)
        return out if output_final_state else (out, None)

    return ssd


def mamba_step(state_update: Callable):
    """``ops.ssd_step``'s call (one token, the state updated in place) through Mamba-2's decode step,
    dt, A, D and a zero dt_bias broadcast over the head's P x N as Mamba-2 passes them (its 2.3.2
    reads ``dt_bias.stride()`` whenever dt and A are broadcast: None fails)."""
    def ssd_step(x, dt, A, B, C, state, D=None):
        batch, _, heads, p = x.shape
        n = B.shape[-1]
        y = state_update(state, x[:, 0], dt[:, 0, :, None].expand(batch, heads, p),
                         A[:, None, None].expand(heads, p, n), B[:, 0], C[:, 0],
                         D=None if D is None else D[:, None].expand(heads, p),
                         dt_bias=dt.new_zeros(()).expand(heads, p))
        return y[:, None]

    return ssd_step


@contextlib.contextmanager
def peer_mixers(scan: Callable, state_update: Callable) -> Iterator[None]:
    """The model's mixers on the peers' kernels while inside: SDPA for attention, ``scan`` (mamba_ssm's
    ``mamba_chunk_scan_combined`` signature) and ``state_update`` (``selective_state_update``'s) for
    Mamba-2's scan and decode step."""
    with mock.patch.object(layers, "attention", _sdpa), mock.patch.object(layers, "ssd", _mamba_scan(scan)), \
            mock.patch.object(layers, "ssd_step", mamba_step(state_update)):
        yield


def _peer(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with peer_mixers(mamba_chunk_scan_combined(), selective_state_update()):
            return fn()

    return call


def _parameter_bytes(model: HybridLM) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _generate_case(B, T, H, D, dtype, device="cuda"):
    """Roofline: each decode step reads every weight once (the prefill's FLOPs beside them)."""
    model = build_model(H, D, dtype, device)
    prompt = torch.randint(0, MODEL["vocab_size"], (B, T), device=device)

    def ours():
        return model.generate(prompt, NEW_TOKENS)

    params = sum(p.numel() for p in model.parameters())
    shape = dict(B=B, T=T, H=H, D=D, new_tokens=NEW_TOKENS, dim=MODEL["dim"], blocks=len(BLOCKS), attention=2)
    return (ours, _peer(ours), "torch-sdpa+mamba_ssm", NEW_TOKENS * _parameter_bytes(model),
            2 * params * B * (T + NEW_TOKENS), shape)


def _train_case(B, T, H, D, dtype, device="cuda"):
    """A training step: loss, then gradients of every parameter (no optimizer); roofline the FLOPs
    of 6 · parameters per token."""
    model = build_model(H, D, dtype, device)
    tokens = torch.randint(0, MODEL["vocab_size"], (B, T + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def ours():
        model.zero_grad(set_to_none=True)
        _, loss = model(inputs, targets=targets)
        loss.backward()
        return loss

    params = sum(p.numel() for p in model.parameters())
    shape = dict(B=B, T=T, H=H, D=D, dim=MODEL["dim"], blocks=len(BLOCKS), attention=2)
    return ours, _peer(ours), "torch-sdpa+mamba_ssm", 3 * _parameter_bytes(model), 6 * params * B * T, shape


MODEL_CASES = {"model-generate": _generate_case, "model-train": _train_case}
