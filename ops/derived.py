"""Gradients of a tile program from its derived backward (``tilemix.tiles.autodiff``) on torch
tensors: what ``mixer``'s autograd and the shipped ops' ``backward="derived"`` run. CPU tensors
run the derived programs on the interpreter; CUDA tensors run them as GPU kernels (``derived_cuda``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from tilemix.tiles import Kernel
from tilemix.tiles.autodiff import derive_backward
from tilemix.tiles.types import DType

from .derived_cuda import derived_gradients_cuda
from .runtime import check_devices

__all__ = ["derived_gradients"]


def derived_gradients(kernel: Kernel, args: dict[str, Any], output_grads: dict[str, torch.Tensor],
                      wrt: Iterable[str]) -> dict[str, torch.Tensor]:
    """The gradients of ``kernel``'s inputs named in ``wrt`` (tensor inputs given in ``args``),
    given ``output_grads``: gradients by output or state name (a missing one is zero; a
    state's is the gradient of the final state). ``args``: the forward call's, by parameter name.
    Each gradient comes in its input's shape and dtype: a ``Head`` one summed over the batch, a
    ``GroupSeq`` one over each group's heads, a ``State``'s the initial state's."""
    tensors = {n: v for n, v in args.items() if isinstance(v, torch.Tensor)}
    device = check_devices({**tensors, **output_grads}, {})
    if device.type == "cuda":
        return derived_gradients_cuda(kernel, args, output_grads, wrt)
    if device.type != "cpu":
        raise RuntimeError(f"{kernel.name}: no backend for {device} tensors")
    binding = kernel.bind(args)
    work = torch.float64 if binding.compute_dtype is DType.f64 else torch.float32  # the interpreter's precision

    def as_array(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(work).numpy()

    inputs = {n: (as_array(v) if isinstance(v, torch.Tensor) else v) for n, v in args.items()}
    backward = derive_backward(kernel, binding, output_grads, wrt)
    grads = backward.run(binding, inputs, {n: as_array(g) for n, g in output_grads.items()})
    # copies (never a view of an incoming gradient), in each input's dtype
    return {n: torch.from_numpy(np.array(g)).to(tensors[n].dtype) for n, g in grads.items()}

