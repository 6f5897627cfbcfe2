"""Bench cases of the mixers whose backward is derived from the forward program (issues 23 and 28),
each beside flash-linear-attention's or Mamba-2's own kernel on the same inputs.

A case returns what ``bench.CASES`` entries return: ``(ours, peer, peer name, bytes, flops, shape)``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tilemix import ops

from .based import BASED_CASES
from .calls import backward_of

__all__ = ["MIXER_CASES", "DERIVED_BACKWARD", "mamba_chunk_scan_combined", "selective_state_update", "enter_mamba_ssm"]


def _fwd_flops(B, T, H, D):
    return 4 * B * T * H * D * (64 + D)  # intra-chunk scores and mix, inter-chunk output and state


def _bwd_flops(B, T, H, D):
    return 2 * B * T * H * D * (6 * 64 + 5 * D)


def _gates(B, T, H, K, device):
    """Log forget gates as fla's tests draw them: logsigmoid(x) / 16, about -0.05 per token."""
    return F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16


def _strong_gates(op: str, B, T, H, K, device):
    """Issue 27's stress decays, past the fast form's range (so the ops take the exact one): RWKV-6's
    log decays -exp(U(-1, 2)), GLA's gates uniform in [-20, 0]."""
    if op == "rwkv6":
        return -torch.exp(torch.empty(B, T, H, K, device=device).uniform_(-1.0, 2.0))
    return -20.0 * torch.rand(B, T, H, K, device=device)


def _unit_keys(B, T, H, D, dtype, device):
    """L2-normalised keys: the delta rule's recurrence contracts only for unit keys."""
    return F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dtype)


def _inputs(op: str, B, T, H, D, dtype, device, strong=False) -> dict[str, torch.Tensor]:
    """Keyword inputs of ``op``, named as both tilemix and fla name them (``strong``: the stress decays)."""
    def seq():
        return torch.randn(B, T, H, D, device=device, dtype=dtype)
    gates = functools.partial(_strong_gates, op) if strong else _gates
    if op == "retention":
        return dict(q=seq(), k=seq(), v=seq())
    if op == "gla":
        return dict(q=seq(), k=seq(), v=seq(), g=gates(B, T, H, D, device).to(dtype))  # gates feed matmuls
    if op == "rwkv6":
        return dict(r=seq(), k=seq(), v=seq(), w=gates(B, T, H, D, device).to(dtype),
                    u=torch.randn(H, D, device=device))
    if op == "rwkv7":  # as an RWKV-7 layer makes them: a = -κ̂, b = κ̂ ⊙ η (unit κ̂, rates η in (0, 1))
        removal = _unit_keys(B, T, H, D, torch.float32, device)
        return dict(r=seq(), w=(-math.exp(-0.5) * torch.randn(B, T, H, D, device=device).sigmoid()).to(dtype),
                    k=seq(), v=seq(), a=(-removal).to(dtype), b=(removal * torch.rand_like(removal)).to(dtype))
    beta = torch.rand(B, T, H, device=device).sigmoid()
    if op == "delta_rule":
        return dict(q=seq(), k=_unit_keys(B, T, H, D, dtype, device), v=seq(), beta=beta)
    return dict(q=seq(), k=_unit_keys(B, T, H, D, dtype, device), v=seq(),
                g=F.logsigmoid(torch.randn(B, T, H, device=device)) / 16, beta=beta)


FLA_PEERS = {"retention": ("fla.ops.retention", "chunk_retention"), "gla": ("fla.ops.gla", "chunk_gla"),
             "rwkv6": ("fla.ops.rwkv6", "chunk_rwkv6"), "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule"),
             "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
             "rwkv7": ("fla.ops.rwkv7", "chunk_rwkv7")}


def _fla(op: str) -> Callable:
    module, name = FLA_PEERS[op]
    return getattr(importlib.import_module(module), name)


def _timed_pair(forward_ours, forward_peer, inputs, backward, B, T, H, D, dtype, device):
    """The forward calls, or (``backward``) calls of ``torch.autograd.grad`` of every floating
    input after one forward, as the bench's backward rows time them."""
    if not backward:
        return forward_ours, forward_peer
    leaves = tuple(t.requires_grad_() for t in inputs.values())
    do = torch.randn(B, T, H, D, device=device, dtype=dtype)
    return backward_of(forward_ours, leaves, do), backward_of(forward_peer, leaves, do)


def _exact_form(op: str) -> Callable:
    """``op`` (gla or rwkv6) always in its exact form, whatever the decays: the fast form's cost beside it."""
    def call(**inputs):
        scale = inputs["k"].shape[-1] ** -0.5
        exact = ops.gated.gla_exact_mixer if op == "gla" else ops.gated.rwkv6_exact_mixer
        return exact(**inputs, scale=scale)
    return call


def _gated_case(op: str, B, T, H, D, dtype, device="cuda", backward=False, strong=False, exact=False):
    inputs = _inputs(op, B, T, H, D, dtype, device, strong)
    ours_fn = _exact_form(op) if exact else getattr(ops, op)

    def ours():
        return ours_fn(**inputs)[0]

    def peer():
        return _fla(op)(**inputs, output_final_state=False)[0]  # chunk_rwkv7's default is True

    sequences = sum(t.numel() for t in inputs.values() if t.dim() == 4) + B * T * H * D
    nbytes = sequences * torch.finfo(dtype).bits // 8 * (7 / 4 if backward else 1)
    flops = (_bwd_flops if backward else _fwd_flops)(B, T, H, D)
    ours, peer = _timed_pair(ours, peer, inputs, backward, B, T, H, D, dtype, device)
    return ours, peer, f"fla-{FLA_PEERS[op][1]}", nbytes, flops, dict(B=B, T=T, H=H, K=D, V=D)


# gla and rwkv6 under the stress decays (their exact form), and in the exact form on fla's gates
DECAY_CASES = {f"{op}-{variant}{bwd}": functools.partial(_gated_case, op, backward=bool(bwd), **{variant: True})
               for op in ("gla", "rwkv6") for variant in ("strong", "exact") for bwd in ("", "-bwd")}
MIXER_CASES = {**{op: functools.partial(_gated_case, op) for op in FLA_PEERS},
               **{f"{op}-bwd": functools.partial(_gated_case, op, backward=True) for op in FLA_PEERS}, **BASED_CASES,
               **DECAY_CASES}
DERIVED_BACKWARD = {*(f"{op}-bwd" for op in FLA_PEERS), *(name for name in DECAY_CASES if name.endswith("-bwd")),
                    "linear_attention-bwd-derived", "ssd-bwd-derived", "based-bwd"}


@functools.cache
def mamba_chunk_scan_combined() -> Callable:
    """Mamba-2's own SSD kernel, ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``."""
    enter_mamba_ssm()
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as scan

    return scan


@functools.cache
def selective_state_update() -> Callable:
    """Mamba-2's decode step (Triton), ``mamba_ssm.ops.triton.selective_state_update``."""
    enter_mamba_ssm()
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as step

    return step


def enter_mamba_ssm() -> None:
    """Make ``mamba_ssm``'s Triton modules importable: its package ``__init__`` imports compiled CUDA
    extensions that a Triton-only install lacks, so the package is entered as a bare namespace (its
    Triton modules need none of them)."""
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("mamba_ssm is not on the path (PYTHONPATH: the unpacked source archive)")
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = package
