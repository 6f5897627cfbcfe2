"""Tile programs as PyTorch custom ops (``torch.ops.tilemix.*``): a real kernel that runs the
program (interpreter on CPU, generated kernel on GPU) and a fake one that only checks the arguments
and shapes the outputs, so ``torch.compile`` traces through them without graph breaks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tilemix.tiles import Kernel

from ._dispatch import fake_run, run_kernel

__all__ = ["tile_op", "no_state"]

# to_args(*op_args) -> (program arguments, labels, final states wanted); to_result(outputs) -> op result
ToArgs = Callable[..., tuple[dict[str, Any], dict[str, str], tuple[str, ...] | None]]


def tile_op(name: str, schema: str, kernel: Kernel, to_args: ToArgs, to_result: Callable[[dict], Any],
            run: Callable[..., dict] | None = None):
    """Register ``tilemix::name`` with ``schema`` running ``kernel`` (through ``run(args, labels,
    final_states)`` when given: a ``SegmentedScan`` of it, say)."""

    def real(*args):
        program_args, labels, final = to_args(*args)
        if run is not None:
            return to_result(run(program_args, labels, final))
        return to_result(run_kernel(kernel, program_args, labels, final))

    def fake(*args):
        program_args, labels, final = to_args(*args)
        return to_result(fake_run(kernel, program_args, labels, final))

    op = torch.library.custom_op(f"tilemix::{name}", real, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def no_state(like: torch.Tensor) -> torch.Tensor:
    """The placeholder an op returns for a final state nobody asked for (ops return tensors only)."""
    return torch.empty(0, dtype=torch.float32, device=like.device)
