"""A state whose columns do not split (the program contracts them) but whose rows its ops keep apart
is cut along its rows: each consumer (or CTA) holds a row block of the state, reads and writes its
rows of the initial and final states and of the saved chunk states (codegen/schedule.py,
``wide_rows``; codegen/op_emitters.py, ``_state_block0``)."""

from __future__ import annotations

import pytest
import torch

from tilemix import ops
from tilemix.ops.examples import kernel_specs
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import Out, Seq, State, chunks, kernel

pytest.importorskip("cuda.bindings", reason="lowering needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from tilemix.codegen.schedule import SPLIT_WIDTH, default_schedule  # noqa: E402
from tilemix.codegen.specialise import kernel_source  # noqa: E402


@kernel
def keys_read_back(k: Seq["K"], v: Seq["V"], y: Out[Seq["K"]], s: State["K", "V"] = None):
    for c in chunks(64):
        y[c] = v[c] @ s.T  # contracts V, the state's columns; K stays apart
        s = s + k[c].T @ v[c]


_LAYER = ops.mixer(keys_read_back, "tilemix_test::keys_read_back", final_states=("s",))


def _binding(K=128, V=64):
    return keys_read_back.bind(kernel_specs(keys_read_back, sizes={"K": K, "V": V}))


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_the_state_rows_split_where_its_columns_are_contracted(arch):
    binding = _binding()
    schedule = default_schedule(keys_read_back, binding, arch)
    assert dict(schedule.split) == {"K": SPLIT_WIDTH}
    source = kernel_source(keys_read_back, binding, schedule, arch).source
    assert f"final_s + ((long)b * H + h) * {128 * 64} + (colcta * {schedule.consumers} + wg) * 64 * 64" in source


def test_narrow_rows_do_not_split():
    assert dict(default_schedule(keys_read_back, _binding(K=64), "sm_90a").split) == {}


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["auto", "generic"])
def test_row_blocks_match_the_interpreter_forward_and_backward(target):
    g = torch.Generator().manual_seed(0)
    k = 0.3 * torch.randn(2, 200, 3, 128, generator=g, dtype=torch.float64)
    v = 0.3 * torch.randn(2, 200, 3, 64, generator=g, dtype=torch.float64)
    s0 = 0.3 * torch.randn(2, 3, 128, 64, generator=g, dtype=torch.float64)
    dy, ds = torch.randn(2, 200, 3, 128, generator=g), torch.randn(2, 3, 128, 64, generator=g)
    results = []
    for device, seqs, state in (("cpu", torch.float64, torch.float64), ("cuda", torch.bfloat16, torch.float32)):
        inputs = [t.detach().to(device, dtype).requires_grad_() for t, dtype in ((k, seqs), (v, seqs), (s0, state))]
        with ops.use_target(target):
            y, s = _LAYER(k=inputs[0], v=inputs[1], s=inputs[2])
            ((y.float() * dy.to(device)).sum() + (s.float() * ds.to(device)).sum()).backward()
        results.append([y, s, *(t.grad for t in inputs)])
    for name, expected, got in zip(("y", "s", "dk", "dv", "ds0"), *results):
        assert rel_err(got.float().cpu(), expected.detach().numpy()) <= bound(torch.bfloat16), name
