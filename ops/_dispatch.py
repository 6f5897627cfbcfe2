"""Running a tile program on torch tensors: CPU tensors go to the interpreter."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tilemix.tiles import Kernel

__all__ = ["run_kernel"]


def _check_devices(tensors: dict[str, torch.Tensor], labels: dict[str, str]) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{labels.get(name, name)} is on {device} but {labels.get(first_name, first_name)} "
                             f"is on {first}; all tensors must be on one device")
    return first


def run_kernel(kernel: Kernel, args: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Run ``kernel`` on ``args`` (torch tensors, numbers, None for absent
    optionals). Returns its outputs and final states as torch tensors on the
    inputs' device: outputs in the inputs' dtype, states in float32."""
    labels = labels or {}
    tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    device = _check_devices(tensors, labels)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        raise NotImplementedError(f"tilemix.{kernel.name}: gradients are not implemented yet; "
                                  "call it under torch.no_grad() or on tensors that do not require grad")
    binding = kernel.bind(args, labels)
    if device.type != "cpu":
        raise NotImplementedError(f"tilemix.{kernel.name}: no GPU backend is built yet for {device}; "
                                  "pass CPU tensors to run the interpreter")
    inputs = {k: (v.detach().to(torch.float32).numpy() if isinstance(v, torch.Tensor) else v)
              for k, v in args.items()}
    results = kernel.run(binding, inputs)
    out = {}
    for name, array in results.items():
        param = binding.param(name)
        dtype = torch.float32 if param.spec.kind == "state" else tensors[_first_tile_operand(binding)].dtype
        out[name] = torch.from_numpy(np.array(array, dtype=np.float32)).to(dtype)
    return out


def _first_tile_operand(binding) -> str:
    return next(p.name for p in binding.params if p.present and p.spec.is_tile_operand and not p.spec.output)
