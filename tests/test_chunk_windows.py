"""``chunks(..., window=W)``: a loop bounded by a causal sliding window visits exactly the chunks
that hold a row some row of its block sees (no more, no fewer), in the interpreter and in the loop
bounds both targets generate; bad windows are refused by name."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tilemix.tiles import Const, Out, Seq, TensorSpec, TileError, blocks, chunks, in_seq, kernel, rowsum, window, zeros


@kernel
def keys_in_window(q: Seq["K"], k: Seq["K"], visited: Out[Seq[1]], seen: Out[Seq[1]],
                   w: Const = 17, block: Const = 64, chunk: Const = 64):
    """Per query: the key rows its block's loop visits, and how many of them it sees."""
    for i in blocks(block):
        n, m = zeros(block, 1), zeros(block, 1)
        for j in chunks(chunk, through=i, window=w):
            s = q[i] @ k[j].T * 0.0 + 1.0
            n = n + rowsum(s)
            m = m + rowsum(window(s, w))
        visited[i] = n
        seen[i] = m


@kernel
def queries_in_window(q: Seq["K"], k: Seq["K"], visited: Out[Seq[1]], seen: Out[Seq[1]],
                      w: Const = 17, block: Const = 64, chunk: Const = 64):
    """Per key: the query rows its block's loop visits, and how many of them see it."""
    for j in blocks(block):
        n, m = zeros(block, 1), zeros(block, 1)
        for i in chunks(chunk, start=j, window=w):
            st = k[j] @ q[i].T * 0.0 + 1.0
            n = n + rowsum(st)
            m = m + rowsum(in_seq(window(st, w, transposed=True)))
        visited[j] = n
        seen[j] = m


def _rows_visited(T: int, block: int, chunk: int, lo, hi) -> np.ndarray:
    """Per row t: ``chunk`` times the number of chunks overlapping ``[lo(b), hi(b)] ∩ [0, T)`` for
    t's block b, counted chunk by chunk."""
    out = np.zeros(T)
    for t in range(T):
        b = t // block
        first, last = max(lo(b), 0), min(hi(b), T - 1)
        out[t] = chunk * sum(c * chunk <= last and (c + 1) * chunk > first for c in range(-(-T // chunk)))
    return out


@pytest.mark.parametrize("block, chunk", [(64, 64), (64, 128), (128, 64)])
@pytest.mark.parametrize("T", [1, 100, 300])
@pytest.mark.parametrize("w", [1, 17, 64, 100, 200, 1000])
def test_a_window_loop_visits_exactly_the_chunks_inside_it(T, w, block, chunk):
    x = np.ones((1, T, 2, 16), np.float32)
    t = np.arange(T)
    keys = keys_in_window(q=x, k=x, w=w, block=block, chunk=chunk)
    want = _rows_visited(T, block, chunk, lambda b: b * block - w + 1, lambda b: (b + 1) * block - 1)
    np.testing.assert_array_equal(keys["visited"][0, :, 0], want)
    np.testing.assert_array_equal(keys["seen"][0, :, 0], np.minimum(w, t + 1))
    queries = queries_in_window(q=x, k=x, w=w, block=block, chunk=chunk)
    want = _rows_visited(T, block, chunk, lambda b: b * block, lambda b: (b + 1) * block + w - 2)
    np.testing.assert_array_equal(queries["visited"][0, :, 0], want)
    np.testing.assert_array_equal(queries["seen"][0, :, 0], np.minimum(w, T - t))


def _specs(T=4096, K=64) -> dict:
    return dict(q=TensorSpec((2, T, 4, K), "bfloat16"), k=TensorSpec((2, T, 4, K), "bfloat16"))


def test_the_program_text_shows_the_window_bound():
    x = TensorSpec((1, 300, 2, 16), "float32")
    assert re.search(r", through=(%\d+), start=\1-99 ", str(keys_in_window.trace(q=x, k=x, w=100)))
    assert re.search(r", through=(%\d+)\+99, start=\1 ", str(queries_in_window.trace(q=x, k=x, w=100)))


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_the_generated_loop_bounds_are_the_window(arch):
    """The key loop starts at the window's first row's chunk, clamped at 0; the query loop stops
    after the window's last row, clamped at T."""
    from tilemix.codegen.schedule import default_source

    for program, bound in ((keys_in_window, "* 64 - 99) / 64;"), (queries_in_window, "+ 1) * 64 + 99)")):
        source = default_source(program, program.bind(dict(_specs(), w=100)), arch).source
        assert bound in source, program.name
        assert ("c_first = max(0, " in source) == (program is keys_in_window)


@pytest.mark.parametrize("arch, mma", [("sm_90a", "HGMMA"), ("sm_80", "HMMA")])
@pytest.mark.parametrize("program", [keys_in_window, queries_in_window], ids=lambda p: p.name)
def test_window_loops_compile_with_tensor_cores_and_no_local_memory(program, arch, mma):
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    from tilemix.codegen.compile import compile_cuda, resources, sass
    from tilemix.codegen.schedule import default_source

    source = default_source(program, program.bind(dict(_specs(), w=100)), arch)
    binary = compile_cuda(source.source, arch, source.name)
    code, usage = sass(binary), resources(binary)
    assert mma in code
    assert "LDL" not in code and "STL" not in code and not usage["stack"] and not usage["local"], usage


@pytest.mark.gpu
@pytest.mark.parametrize("program", [keys_in_window, queries_in_window], ids=lambda p: p.name)
@pytest.mark.parametrize("T, w", [(1, 17), (300, 17), (300, 100), (1000, 200), (4096, 512)])
def test_gpu_window_loops_match_interpreter(program, T, w, monkeypatch):
    """One grid block per CTA: the GPU's loop visits exactly the interpreter's chunks. By default a CTA
    runs two neighbouring blocks over the union of their windows (the masks keep each block's own
    rows), so there every row sees the same keys and visits at least the interpreter's chunks."""
    from tilemix.ops.runtime import run_kernel

    x = torch.ones(1, T, 2, 64, dtype=torch.bfloat16)
    cpu = run_kernel(program, dict(q=x, k=x, w=w))
    default = run_kernel(program, dict(q=x.cuda(), k=x.cuda(), w=w))
    assert torch.equal(default["seen"].cpu(), cpu["seen"])
    assert (default["visited"].cpu() >= cpu["visited"]).all()
    monkeypatch.setenv("TILEMIX_SCHEDULE", f"{program.name}:consumers=1")
    single = run_kernel(program, dict(q=x.cuda(), k=x.cuda(), w=w))
    for name in ("visited", "seen"):
        assert torch.equal(single[name].cpu(), cpu[name]), name

@kernel
def _windowed(x: Seq["K"], o: Out[Seq["K"]], w: Const = 16, through: Const = True, start: Const = False):
    for i in blocks(64):
        acc = zeros(64, x.cols)
        for j in chunks(64, through=i if through else None, start=i if start else None, window=w):
            acc = acc + x[j]
        o[i] = acc


@pytest.mark.parametrize("args, message", [
    (dict(w=0), "chunks(window=0): the window must be a positive int"),
    (dict(w=-3), "chunks(window=-3)"),
    (dict(w=2.5), "chunks(window=2.5)"),
    (dict(w=True), "chunks(window=True)"),
    (dict(through=False), "give it through=i (the keys a query block sees) or start=i"),
    (dict(start=True), "not both"),
])
def test_bad_windows_are_refused_by_name(args, message):
    with pytest.raises(TileError, match="window") as info:
        _windowed.trace(x=TensorSpec((1, 100, 1, 16), "float32"), **args)
    assert message in str(info.value)
    assert info.value.loc.line == _windowed.fn.__code__.co_firstlineno + 4  # the chunks() line
