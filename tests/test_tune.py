"""The autotuner's logic and cache on the CPU, with a fake runner and timer; a GPU test tunes one
small op end to end."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

from tilemix import ops
from tilemix.codegen import tune
from tilemix.codegen.hopper import Schedule
from tilemix.ops.examples import example_specs
from tilemix.reference.tolerance import bound, rel_err


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEMIX_CACHE", str(tmp_path))
    tune._LOOKUPS.clear()
    return tmp_path


def _gemm_binding(M=4096):
    specs = example_specs("gemm")
    specs["a"] = type(specs["a"])((M, 4096), specs["a"].dtype)
    return ops.gemm_fwd.bind(specs)


def test_space_starts_with_the_default_and_varies_every_knob():
    binding = _gemm_binding()
    default = Schedule(stages=3, consumers=2, consumer_axis="blocks")
    space = tune.config_space(ops.gemm_fwd, binding, default)
    assert space[0] == tune.Config(default) and len(space) == len(set(space))
    assert {c.schedule.stages for c in space} == {1, 2, 3, 4}
    assert {c.schedule.consumers for c in space} == {1, 2}
    consts = {k: {dict(c.consts)[k] for c in space if k in dict(c.consts)} for k in ("block_m", "block_n", "block_k")}
    assert consts == {"block_m": {128}, "block_n": {128}, "block_k": {128}}  # the alternatives to 64, 256, 64
    assert len(space) == 1 + 8 - 1 + 3  # the default schedule is one of the 8
    attention = ops.attention_fwd.bind(example_specs("attention"))  # is_causal is a flag, not a size
    assert all("is_causal" not in dict(c.consts) for c in tune.config_space(ops.attention_fwd, attention, default))


class FakeRunner:
    """Configs rejected at compile time, one fast but wrong, the rest timed by a fake clock."""

    def __init__(self, binding, default):
        self.binding, self.default, self.key = binding, default, "fake-key"
        self.launched = []

    def prepare(self, config):
        return "needs 300 KiB of shared memory" if config.schedule.stages == 4 else None

    def check(self, config):
        return "o differs from the interpreter" if config.schedule.stages == 1 else None

    def launch(self, config):
        self.launched.append(config)
        return config


def fake_ms(config):
    """Stage 1 would be fastest (but is wrong); then two consumers and stage 3 win."""
    return {1: 0.1, 2: 1.0, 3: 0.8}[config.schedule.stages] / config.schedule.consumers


def test_fast_wrong_kernels_never_win_and_the_winner_is_cached():
    binding = _gemm_binding()
    default = Schedule(stages=2, consumers=2, consumer_axis="blocks")
    runner = FakeRunner(binding, default)
    seen = []
    result = tune.tune(ops.gemm_fwd, {}, timer=fake_ms, runner=runner, progress=seen.append, workers=2)
    assert result.best.schedule.stages == 3 and result.best.schedule.consumers == 2
    assert all(c.schedule.stages not in (1, 4) for c in runner.launched)  # never timed
    assert {c.schedule.stages for c in result.rejected} == {1, 4}
    assert result.default == tune.Config(default) and result.times[result.best] <= result.times[result.default]
    assert len(seen) == len(result.times) + len(result.rejected)
    assert tune.cached_config("fake-key") == result.best


def test_damaged_cache_file_is_ignored_then_rewritten(cache_dir):
    config = tune.Config(Schedule(stages=3, split=(("V", 64),), consumers=1), (("block_n", 128),))
    tune.store_config("k", config)
    assert tune.cached_config("k") == config
    path = cache_dir / "tuned" / "k.json"
    for damage in ("", "{not json", json.dumps({"schedule": {"stages": 2}})):
        path.write_text(damage)
        assert tune.cached_config("k") is None
    tune.store_config("k", config)
    assert tune.cached_config("k") == config


def _store_many(args):
    cache, n = args
    import os

    os.environ["TILEMIX_CACHE"] = cache
    from tilemix.codegen import tune as t
    from tilemix.codegen.hopper import Schedule as S

    for i in range(50):
        t.store_config("shared", t.Config(S(stages=1 + (n + i) % 4)))
        assert t.cached_config("shared") is not None  # never a partial file
    return True


def test_concurrent_writers_leave_a_whole_file(cache_dir):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert all(pool.map(_store_many, [(str(cache_dir), n) for n in range(4)]))
    assert tune.cached_config("shared").schedule.stages in (1, 2, 3, 4)


def test_cache_key_buckets_runtime_sizes():
    key = lambda M: tune.cache_key(ops.gemm_fwd, _gemm_binding(M), "H100", (9, 0))  # noqa: E731
    assert key(3000) == key(4000) != key(5000)
    assert key(4000) != tune.cache_key(ops.gemm_fwd, _gemm_binding(4000), "H100", (8, 0))


@pytest.mark.gpu
def test_gpu_tunes_linear_attention_end_to_end():
    q, k, v = (torch.randn(2, 1024, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    args = dict(q=q, k=k, v=v, scale=0.125, s=None)
    result = tune.tune(ops.linear_attention_fwd, args)
    assert result.best in result.times and result.times[result.best] <= result.times[result.default]
    tuned, _ = ops.linear_attention(q, k, v)  # now runs the cached config
    cpu, _ = ops.linear_attention(q.cpu(), k.cpu(), v.cpu())
    assert rel_err(tuned.cpu(), cpu.double().numpy()) <= bound(torch.bfloat16)
