"""Test hooks: GPU tests are skipped without CUDA; hypothesis profiles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", deadline=None, max_examples=100, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.register_profile("stress", deadline=None, max_examples=1000)  # pytest --hypothesis-profile=stress
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_call_cache():
    """Each test starts with no remembered CUDA call signatures (``run_kernel``'s prepared launches,
    segment counts), so the schedules, SM counts and plans a test patches in are the ones its calls
    use."""
    from tilemix.ops import runtime

    runtime.forget_calls()
