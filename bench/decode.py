"""Bench rows of the decode steps (issue 24: ``<op>-step``, direction "decode"): one token for each of
B sequences against a float32 state updated in place, beside flash-linear-attention's
``fused_recurrent_*`` (and Mamba-2's ``selective_state_update`` for SSD) at T = 1 on the same inputs.
The roofline is the state's: read once and written once (the tokens' bytes are a fraction of a
percent at the bars' shapes)."""

from __future__ import annotations

import functools
import importlib

import torch

from tilemix import ops

from .mixers import _inputs as mixer_inputs
from .mixers import selective_state_update
from .model import mamba_step

__all__ = ["DECODE_CASES", "DECODE_SHAPES"]

FUSED_RECURRENT = {"linear_attention": ("fla.ops.linear_attn", "fused_recurrent_linear_attn"),
                   "retention": ("fla.ops.retention", "fused_recurrent_retention"),
                   "gla": ("fla.ops.gla", "fused_recurrent_gla"),
                   "rwkv6": ("fla.ops.rwkv6", "fused_recurrent_rwkv6"),
                   "delta_rule": ("fla.ops.delta_rule", "fused_recurrent_delta_rule"),
                   "gated_delta_rule": ("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule")}


@functools.cache
def _fused_recurrent(op: str):
    """fla's ``fused_recurrent_*`` of ``op``, imported once, when first timed (CPU tests run without fla)."""
    module, name = FUSED_RECURRENT[op]
    return getattr(importlib.import_module(module), name)


def _state_bytes(B, H, D) -> int:
    return 2 * B * H * D * D * 4  # fp32, read and written


def _fla_step(op: str, B, T, H, D, dtype, device="cuda"):
    inputs = mixer_inputs(op, B, T, H, D, dtype, device) if op != "linear_attention" else \
        {n: torch.randn(B, T, H, D, device=device, dtype=dtype) for n in ("q", "k", "v")}
    state, peer_state = (torch.zeros(B, H, D, D, device=device) for _ in range(2))
    ours_fn = getattr(ops, f"{op}_step")
    peer_inputs = {("gk" if op == "gla" and n == "g" else n): t for n, t in inputs.items()}  # fla's GLA: gk

    def ours():
        return ours_fn(**inputs, state=state)

    def peer():
        return _fused_recurrent(op)(**peer_inputs, initial_state=peer_state, output_final_state=True)[0]

    return (ours, peer, f"fla-{FUSED_RECURRENT[op][1]}", _state_bytes(B, H, D), 4 * B * T * H * D * D,
            dict(B=B, T=T, H=H, K=D, V=D))


def _ssd_step(B, T, H, D, dtype, device="cuda"):
    """SSD with N = P = D, one group; the peer is Mamba-2's ``selective_state_update`` (its state
    ``[B, H, P, N]``, dt and A broadcast over P and N as Mamba-2 passes them)."""
    x = torch.randn(B, T, H, D, device=device, dtype=dtype)
    dt = torch.rand(B, T, H, device=device) * 0.5 + 0.01
    A = -(torch.rand(H, device=device) + 0.1)
    Bm, Cm = (torch.randn(B, T, 1, D, device=device, dtype=dtype) for _ in range(2))
    D_skip = torch.randn(H, device=device)
    state, peer_state = (torch.zeros(B, H, D, D, device=device) for _ in range(2))

    def ours():
        return ops.ssd_step(x, dt, A, Bm, Cm, state, D=D_skip)

    def peer():
        return mamba_step(selective_state_update())(x, dt, A, Bm, Cm, peer_state, D=D_skip)

    return (ours, peer, "mamba_ssm-selective_state_update", _state_bytes(B, H, D), 4 * B * T * H * D * D,
            dict(B=B, T=T, H=H, N=D, P=D, G=1))


DECODE_CASES = {"ssd-step": _ssd_step, "ssd-step-h32": _ssd_step,
                **{f"{op}-step": functools.partial(_fla_step, op) for op in FUSED_RECURRENT},
                "linear_attention-step-h32": functools.partial(_fla_step, "linear_attention")}
# issue 24's decode bars: B=128 H=16 D=128 and (-h32) B=256 H=32 D=64, one token
DECODE_SHAPES = {name: (256, 1, 32, 64) if name.endswith("-h32") else (128, 1, 16, 128) for name in DECODE_CASES}
