"""The compile cache: atomic entries, checked on read, rebuilt when damaged, and in memory only
(with a warning) when the cache dir cannot be written. Needs NVRTC (the test extra), not a GPU."""

from __future__ import annotations

import multiprocessing
import warnings

import pytest

pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from tilemix.codegen import compile as cc  # noqa: E402

SOURCE = 'extern "C" __global__ void tilemix_probe(float* x) { x[threadIdx.x] += 1.0f; }\n'


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEMIX_CACHE", str(tmp_path / "cache"))
    cc._MEMORY.clear()
    yield tmp_path / "cache"
    cc._MEMORY.clear()


def _entries(cache):
    return sorted(cache.glob("*.cubin"))


def test_entry_written_once_and_reused(cache):
    first = cc.compile_cuda(SOURCE, "sm_90a", "tilemix_probe")
    (entry,) = _entries(cache)
    cc._MEMORY.clear()
    again = cc.compile_cuda(SOURCE, "sm_90a", "tilemix_probe")
    assert again.cubin == first.cubin and _entries(cache) == [entry]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip a byte"])
def test_damaged_entry_is_rebuilt(cache, damage):
    good = cc.compile_cuda(SOURCE, "sm_90a", "tilemix_probe").cubin
    (entry,) = _entries(cache)
    blob = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00garbage" * 10)
    else:
        entry.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    cc._MEMORY.clear()
    assert cc.compile_cuda(SOURCE, "sm_90a", "tilemix_probe").cubin == good
    assert entry.read_bytes() == blob  # rewritten whole


def test_unwritable_cache_dir_falls_back_to_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TILEMIX_CACHE", str(blocker / "cache"))  # cannot be created, even by root
    cc._MEMORY.clear()
    with pytest.warns(UserWarning, match="not writable; compiled kernels stay in memory"):
        first = cc.compile_cuda(SOURCE, "sm_90a", "tilemix_probe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is served from memory: no second warning
        assert cc.compile_cuda(SOURCE, "sm_90a", "tilemix_probe").cubin == first.cubin
    cc._MEMORY.clear()


def _compile_in_child(cache_dir: str) -> bytes:
    import os

    os.environ["TILEMIX_CACHE"] = cache_dir
    from tilemix.codegen.compile import compile_cuda

    return compile_cuda(SOURCE, "sm_90a", "tilemix_probe").cubin


def test_concurrent_processes_share_one_entry(tmp_path):
    """Processes compiling the same kernel at once all get a whole cubin; the entry is valid."""
    cache_dir = str(tmp_path / "shared")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        cubins = pool.map(_compile_in_child, [cache_dir] * 8)
    assert len(set(cubins)) == 1
    (entry,) = (tmp_path / "shared").glob("*.cubin")
    assert entry.read_bytes().endswith(cubins[0])


def test_compile_error_shows_the_generated_line(cache):
    bad = SOURCE + 'extern "C" __global__ void broken() { undeclared_thing(); }\n'
    with pytest.raises(cc.CompileError, match=r"generated line 2: extern \"C\" __global__ void broken"):
        cc.compile_cuda(bad, "sm_90a", "broken")
