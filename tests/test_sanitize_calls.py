"""The calls ``python -m tilemix.bench.sanitize`` launches under compute-sanitizer, run on the CPU
interpreter in float32: each group's ops take the arguments it passes (a call that fails here would
cut a GPU run short). The tail group, the slowest here, runs on the GPU only."""

from __future__ import annotations

import pytest
import torch

from tilemix.bench import sanitize


@pytest.mark.parametrize("group", [g for g in (*sanitize.CALLS, "segmented") if g != "tail"])
def test_group_runs_on_the_interpreter(group):
    generator = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator).to(dtype)

    sanitize.CALLS.get(group, sanitize._segmented_calls)(rnd, "auto")
