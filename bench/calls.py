"""The timed calls of the bench's backward rows."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["backward_of", "leaves"]


def backward_of(forward: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...],
                 dout: torch.Tensor) -> Callable[[], object]:
    """A call that runs ``forward()`` the first time only (in the warm-up: an op that cannot do it
    fails inside the bench's try) and then ``torch.autograd.grad(out, inputs, dout)`` each time,
    the graph retained."""
    out = None

    def backward():
        nonlocal out
        if out is None:
            out = forward()
        return torch.autograd.grad(out, inputs, dout, retain_graph=True)

    return backward


def leaves(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.detach().contiguous().requires_grad_() for t in tensors)
