"""The autotuner's logic and cache on the CPU, with a fake runner and timer; a GPU test tunes one
small op end to end."""

from __future__ import annotations

import json
import multiprocessing
import re
import sys
from dataclasses import dataclass, field

import pytest
import torch

from tilemix import ops
from tilemix.codegen import schedule, tune
from tilemix.codegen.schedule import Schedule
from tilemix.ops import runtime
from tilemix.ops.examples import example_specs
from tilemix.reference.tolerance import bound, rel_err


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEMIX_CACHE", str(tmp_path))
    tune.forget_choices()
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
    assert {c.schedule.issue for c in space} == {"fit", "early", "program"}
    assert {(c.schedule.consumers, c.schedule.occupancy) for c in space} >= {(2, 2), (1, 2)}
    assert {c.schedule.stage_a for c in space} == {False, True}
    # the default is one of the 8; two other issue orders, two overlaps, occupancy 2-4 with two consumers and
    # with one, A operands staged, three block sizes
    assert len(space) == 1 + 8 - 1 + 2 + 2 + 3 + 3 + 1 + 3
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
    result = tune.tune(ops.gemm_fwd, runner, timer=fake_ms, progress=seen.append, workers=2)
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
    from tilemix.codegen.schedule import Schedule as S

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
    assert key(4000) != tune.cache_key(ops.gemm_fwd, _gemm_binding(4000), "H100", (9, 0), "sm_90")  # generic


def test_each_target_reads_its_own_tuned_configs(cache_dir, monkeypatch):
    """A config tuned for the generic kernels (sm_90: an H100 running them) is what a generic call
    uses and not what an sm_90a call does, and is checked against the generic lowering (a ring
    depth the generic target has no room for is refused)."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    specs = example_specs("gemm")
    binding = ops.gemm_fwd.bind(specs)
    generic = tune.Config(Schedule(stages=1, consumers=2, consumer_axis="blocks"))
    tune.store_config(tune.cache_key(ops.gemm_fwd, binding, "NVIDIA H100 80GB HBM3", (9, 0), "sm_90"), generic)
    tune.forget_choices()
    assert tune.config_for(ops.gemm_fwd, binding, specs, 0, "sm_90") == generic
    assert tune.config_for(ops.gemm_fwd, binding, specs, 0, "sm_90a") is None
    assert not tune.usable(ops.gemm_fwd, specs, tune.Config(Schedule(stages=4, consumers=2, consumer_axis="blocks")),
                           "sm_86")


def test_a_cache_miss_tunes_through_the_runtimes_callback_only_when_asked(monkeypatch):
    """config_for tunes nothing itself: on a miss under TILEMIX_AUTOTUNE=1 it calls the ``autotune``
    the runtime passes (once: the answer is remembered), and without the variable it never does."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    specs = example_specs("gemm")
    binding = ops.gemm_fwd.bind(specs)
    tuned = tune.Config(Schedule(stages=2, consumers=2, consumer_axis="blocks"))
    calls = []
    autotune = lambda: calls.append(1) or tuned  # noqa: E731
    assert tune.config_for(ops.gemm_fwd, binding, specs, 0, "sm_90a", autotune) is None and not calls
    tune.forget_choices()
    monkeypatch.setenv("TILEMIX_AUTOTUNE", "1")
    for _ in range(2):
        assert tune.config_for(ops.gemm_fwd, binding, specs, 0, "sm_90a", autotune) == tuned
    assert calls == [1]


def test_space_follows_the_schedule_fields(monkeypatch):
    """A knob the code generator adds to Schedule (with its choices in the field's metadata) is
    searched and round-trips through the cache without changes to the tuner."""

    @dataclass(frozen=True)
    class Wider(Schedule):
        wgmma_n: int = field(default=128, metadata={"choices": (64, 128, 256)})

    monkeypatch.setattr(schedule, "Schedule", Wider)  # the space and the describing
    monkeypatch.setattr(tune, "Schedule", Wider)  # the cache
    default = Wider(stages=3, consumers=2, consumer_axis="blocks")
    space = tune.config_space(ops.gemm_fwd, _gemm_binding(), default)
    assert {c.schedule.wgmma_n for c in space} == {64, 128, 256}
    assert sum(c.schedule.wgmma_n != 128 for c in space) == 2  # one axis at a time
    wide = next(c for c in space if c.schedule.wgmma_n == 256)
    assert "wgmma_n=256" in wide.describe()
    tune.store_config("wide", wide)
    assert tune.cached_config("wide") == wide


def test_a_larger_block_takes_a_shallower_ring_where_the_default_has_no_room():
    binding = _gemm_binding()
    default = Schedule(stages=3, consumers=2, consumer_axis="blocks")
    fits = lambda c: not c.consts or c.schedule.stages == 1  # noqa: E731 - big blocks fit one stage only
    space = tune.config_space(ops.gemm_fwd, binding, default, fits)
    sized = [c for c in space if c.consts]
    assert len(sized) == 3 and all(c.schedule == Schedule(stages=1, consumers=2, consumer_axis="blocks") for c in sized)
    none_fit = tune.config_space(ops.gemm_fwd, binding, default, lambda c: not c.consts)
    assert all(c.schedule == default for c in none_fit if c.consts)  # kept, and rejected when prepared


def test_scan_space_varies_the_split_and_keeps_consumers_on_whole_column_blocks():
    specs = example_specs("linear_attention")
    binding = ops.linear_attention_fwd.bind(specs)
    space = tune.config_space(ops.linear_attention_fwd, binding, Schedule(split=(("V", 64),), consumers=2))
    assert (("V", 128),) in {c.schedule.split for c in space}
    assert all(tune.legal(c.schedule, binding) for c in space)
    assert not any(c.schedule.split == (("V", 128),) and c.schedule.consumers == 2 for c in space)
    narrow = ops.linear_attention_fwd.bind({**specs, **{n: type(specs[n])((2, 4096, 16, 64), specs[n].dtype)
                                                         for n in ("q", "k", "v")}})
    small = tune.config_space(ops.linear_attention_fwd, narrow, Schedule())  # D = 64: no split, one block
    assert {c.schedule.consumers for c in small} == {1}


def test_a_stale_cached_config_falls_back_to_the_default():
    specs = example_specs("gemm")
    fits = tune.Config(Schedule(stages=3, consumers=2, consumer_axis="blocks"))
    assert tune.usable(ops.gemm_fwd, specs, fits)
    assert not tune.usable(ops.gemm_fwd, specs, tune.Config(Schedule(stages=5, consumers=2, consumer_axis="blocks")))
    assert not tune.usable(ops.gemm_fwd, specs, tune.Config(fits.schedule, (("block_q", 64),)))  # no such Const


def test_cache_file_from_another_schedule_version_is_ignored(cache_dir):
    tune.store_config("k", tune.Config(Schedule()))
    path = cache_dir / "tuned" / "k.json"
    data = json.loads(path.read_text())
    data["schedule"]["persistent"] = True  # a field this Schedule does not have
    path.write_text(json.dumps(data))
    assert tune.cached_config("k") is None
    data["schedule"].pop("persistent")
    data["schedule"].pop("consumer_axis")  # a missing field keeps its default
    path.write_text(json.dumps(data))
    assert tune.cached_config("k") == tune.Config(Schedule())
    data["schedule"]["stages"] = "2"
    path.write_text(json.dumps(data))
    assert tune.cached_config("k") is None


def test_a_candidate_that_raises_is_rejected_not_the_tune():
    binding = _gemm_binding()
    default = Schedule(stages=2, consumers=2, consumer_axis="blocks")

    class Crashing(FakeRunner):
        def check(self, config):
            if config.schedule.stages == 3 and config.schedule.consumers == 1:
                raise RuntimeError("CUDA_ERROR_LAUNCH_FAILED\nmore")
            return super().check(config)

    result = tune.tune(ops.gemm_fwd, Crashing(binding, default), timer=fake_ms, workers=2)
    crashed = [e for c, e in result.rejected.items() if c.schedule.stages == 3]
    assert crashed == ["RuntimeError: CUDA_ERROR_LAUNCH_FAILED"]
    assert result.best.schedule.stages == 3 and result.best.schedule.consumers == 2


@pytest.mark.gpu
def test_gpu_tunes_segments_and_calls_use_them():
    q, k, v = (torch.randn(1, 4096, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    args = dict(q=q, k=k, v=v, scale=0.125, s=None)
    scan = ops.SEGMENTED["linear_attention"]
    result = runtime.tune_segments(scan, args)
    assert set(result.times) | set(result.rejected) == {1, 2, 4, 8, 16} and not result.rejected
    assert scan.default_segments(args) == result.best
    out, _ = ops.linear_attention(q, k, v, scale=0.125)
    cpu, _ = ops.linear_attention(q.cpu(), k.cpu(), v.cpu(), scale=0.125)
    assert rel_err(out.cpu(), cpu.double().numpy()) <= bound(torch.bfloat16)


@pytest.mark.gpu
def test_gpu_tunes_linear_attention_end_to_end():
    q, k, v = (torch.randn(2, 1024, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    args = dict(q=q, k=k, v=v, scale=0.125, s=None)
    result = runtime.tune(ops.linear_attention_fwd, args)
    assert result.best in result.times and result.times[result.best] <= result.times[result.default]
    tuned, _ = ops.linear_attention(q, k, v)  # now runs the cached config
    cpu, _ = ops.linear_attention(q.cpu(), k.cpu(), v.cpu())
    assert rel_err(tuned.cpu(), cpu.double().numpy()) <= bound(torch.bfloat16)


def test_segment_counts_are_checked_timed_and_cached(monkeypatch):
    """On CPU tensors (float64 interpreter) with a fake timer: every count T allows is checked
    against the sequential scan and timed; the fastest is cached and then looked up by shape."""
    monkeypatch.setattr(tune, "_segments_key", lambda scan, binding, device, arch: "la-segments")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1024, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    args = dict(q=q, k=k, v=v, scale=0.25, s=None)
    scan = ops.SEGMENTED["linear_attention"]
    assert schedule.segment_choices(1024) == [1, 2, 4]  # segments of at least 256 tokens
    fake_ms = iter([3.0, 1.0, 2.0])
    result = runtime.tune_segments(scan, args, arch="sm_90a", timer=lambda fn: (fn(), next(fake_ms))[1])
    assert result.default == 1 and result.times == {1: 3.0, 2: 1.0, 4: 2.0} and result.best == 2
    assert tune.tuned_segments(scan, scan.kernel.bind(args), None, "sm_90a") == 2


def test_a_damaged_segments_file_means_the_heuristic(cache_dir, monkeypatch):
    monkeypatch.setattr(tune, "_segments_key", lambda scan, binding, device, arch: "bad-segments")
    (cache_dir / "tuned").mkdir()
    (cache_dir / "tuned" / "bad-segments.json").write_text("{\"segments\": -3}")
    scan = ops.SEGMENTED["ssd"]
    binding = scan.kernel.bind(example_specs("ssd"))
    assert tune.tuned_segments(scan, binding, None, "sm_90a") is None


def test_kernels_trace_in_parallel_threads():
    """The tuner traces candidates in a thread pool: each thread has its own builder stack (a shared
    one made concurrent traces rebind each other's tiles: spurious TileErrors or wrong programs)."""
    from concurrent.futures import ThreadPoolExecutor

    names = ["gemm", "attention", "linear_attention", "ssd"]
    bindings = {name: ops.PROGRAMS[name].bind(example_specs(name)) for name in names}

    def trace(name):
        kernel = ops.PROGRAMS[name]
        kernel._programs.clear()
        text, ids = str(kernel.trace(bindings[name])), {}
        return name, re.sub(r"%\d+", lambda m: ids.setdefault(m.group(), f"%{len(ids)}"), text)  # ids are global

    serial = dict(trace(name) for name in names)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: with a shared stack this fails every run
    try:
        with ThreadPoolExecutor(8) as pool:
            for name, program in pool.map(trace, names * 8):
                assert program == serial[name]
    finally:
        sys.setswitchinterval(previous)


def test_schedule_override_from_the_environment(monkeypatch):
    """$TILEMIX_SCHEDULE replaces fields of a program's default schedule (an experiment without a
    code change, e.g. the SSD backward's heads axis); other programs keep theirs; text that is not
    PROGRAM:FIELD=VALUE is an error naming what was expected."""
    from dataclasses import replace

    monkeypatch.setattr(schedule, "sm_count", lambda device: 132)
    binding = ops.linear_attention_fwd.bind(example_specs("linear_attention"))
    gemm = ops.gemm_fwd.bind(example_specs("gemm"))
    default = schedule.launch_schedule(ops.linear_attention_fwd, binding, 0)
    gemm_default = schedule.launch_schedule(ops.gemm_fwd, gemm, 0)
    monkeypatch.setenv("TILEMIX_SCHEDULE", "linear_attention_fwd:stages=3,consumers=1,share_staging=true")
    assert schedule.launch_schedule(ops.linear_attention_fwd, binding, 0) == replace(
        default, stages=3, consumers=1, share_staging=True)
    assert schedule.launch_schedule(ops.gemm_fwd, gemm, 0) == gemm_default
    monkeypatch.setenv("TILEMIX_SCHEDULE", "linear_attention_fwd:split=V/64+K/64")
    assert schedule.launch_schedule(ops.linear_attention_fwd, binding, 0).split == (("V", 64), ("K", 64))
    monkeypatch.setenv("TILEMIX_SCHEDULE", "linear_atention_fwd:stages=3")  # a typo: said, not ignored
    with pytest.warns(UserWarning, match="no @kernel program defined so far: \\['linear_atention_fwd'\\]"):
        assert schedule.launch_schedule(ops.linear_attention_fwd, binding, 0) == default
    for text, words in (("linear_attention_fwd:stages=three", "stages is a whole number"),
                        ("linear_attention_fwd:ring=2", "FIELD one of"), ("linear_attention_fwd", "PROGRAM:FIELD")):
        monkeypatch.setenv("TILEMIX_SCHEDULE", text)
        with pytest.raises(ValueError, match=words):
            schedule.launch_schedule(ops.linear_attention_fwd, binding, 0)


@pytest.mark.parametrize("D", [128, 256])
def test_tune_examples_pass_the_block_shapes_the_op_runs(D):
    """``tilemix tune attention`` tunes ``example_inputs``; the op at head dim 256 passes 64-key chunks,
    so the examples must too, or the tuned config is cached under a key the op never looks up."""
    from tilemix.ops.examples import example_inputs
    from tilemix.ops.runtime import capture_calls

    args = example_inputs("attention", device="cpu", dtype="float32", B=1, T=64, H=1, D=D)
    with capture_calls() as calls:
        ops.attention(args["q"], args["k"], args["v"], causal=True)
    (kernel, launched), = calls
    binding = kernel.bind(launched)
    assert kernel.bind(args).values["chunk"] == binding.values["chunk"] == (128 if D == 128 else 64)


def test_two_ctas_per_sm_halve_the_shared_memory_a_cta_may_use():
    """A schedule whose ring fits one CTA per SM but not two is refused by name."""
    from dataclasses import replace

    from tilemix.codegen.knobs import smem_limit
    from tilemix.codegen.specialise import kernel_source
    from tilemix.tiles.errors import ResourceError

    binding = ops.attention_fwd.bind(example_specs("attention"))
    default = schedule.default_schedule(ops.attention_fwd, binding, "sm_90a")
    source = kernel_source(ops.attention_fwd, binding, default, "sm_90a")
    assert smem_limit("sm_90a", 2) < source.smem_bytes <= smem_limit("sm_90a")
    with pytest.raises(ResourceError, match=r"occupancy=2\); an sm_90a CTA has at most 113 KiB"):
        kernel_source(ops.attention_fwd, binding, replace(default, occupancy=2), "sm_90a")
