"""The CUDA-only host paths, run on the CPU with the device stubbed: ``run_kernel``'s CUDA branch
up to the launch (fake CUDA tensors: shapes, strides and dtypes without memory), and
``prepare_launch`` plus a ``Launch`` with cupy, the tensor-map encoder and the stream replaced by
recorders (the lowering and NVRTC compile are real). What they catch is what ``pytest -m gpu``
would meet first: a renamed name, a parameter kind the launch does not pack, arguments passed the
old way."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tilemix import ops
from tilemix.codegen import launch, schedule
from tilemix.codegen.source import ParamKind
from tilemix.ops import runtime

la = ops.linear_attention_fwd


def _cuda_like(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    """A tensor that reports a CUDA device, its shape, strides and dtype, and has no memory."""
    with FakeTensorMode():
        return torch.empty(*shape, device="cuda", dtype=dtype)


def test_call_signature_reads_the_sm_count_the_launch_schedule_reads(monkeypatch):
    """A call's signature includes the SM count that ``schedule.launch_schedule`` sees, so a change
    of it (tests patch ``schedule.sm_count``) prepares the call again instead of reusing a launch
    chosen for another count."""
    q = _cuda_like(1, 256, 2, 64)
    args = dict(q=q, k=q, v=q, scale=0.5)
    monkeypatch.setattr(schedule, "sm_count", lambda device: 132)
    first = runtime.call_signature(la, args)
    assert first is not None and first == runtime.call_signature(la, args)
    monkeypatch.setattr(schedule, "sm_count", lambda device: 2)
    assert runtime.call_signature(la, args) != first
