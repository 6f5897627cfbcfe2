"""A register tile read by an elementwise op and then only by matmuls (from shared memory) is staged
before that op, which may then write over its registers; one only matmuls read is staged where it is
made, unless a wgmma group is in flight there (codegen/staging.py), on both targets."""

from __future__ import annotations

import re

import pytest
import torch

from tilemix import ops
from tilemix.ops.examples import kernel_specs
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import Out, Seq, chunks, exp, kernel

pytest.importorskip("cuda.bindings", reason="lowering needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from tilemix.codegen.schedule import default_schedule  # noqa: E402
from tilemix.codegen.specialise import kernel_source  # noqa: E402


@kernel
def read_then_multiplied(x: Seq["D"], q: Seq["D"], y: Out[Seq["D"]]):
    for c in chunks(64):
        t = exp(x[c])
        u = t * 2.0  # t's last read in registers
        y[c] = q[c] @ t + u  # t is B: read from shared memory


@kernel
def multiplied_then_read(x: Seq["D"], q: Seq["D"], y: Out[Seq["D"]]):
    for c in chunks(64):
        t = exp(x[c])
        y[c] = (q[c] @ t) * t  # read in registers after the matmul: staged there


@kernel
def made_for_a_later_matmul(x: Seq["D"], q: Seq["D"], k: Seq["D"], y: Out[Seq["D"]]):
    for c in chunks(64):
        t = exp(x[c])  # read by the last matmul alone, as B
        y[c] = exp(q[c] @ k[c].T) @ t


def _consumer_loop(program, arch: str) -> list[str]:
    binding = program.bind(kernel_specs(program, size=64))
    source = kernel_source(program, binding, default_schedule(program, binding, arch), arch).source
    loop = source[source.rindex("for (int c = 0; c < n_iter; ++c)"):]
    return [line.strip() for line in loop.splitlines()]


def _exp_and_its_staging(lines: list[str]) -> tuple[str, int]:
    """The register tile ``exp`` writes, and the line storing it to a staging buffer."""
    t = re.search(r"map1\((v\d+), .*f_exp", "\n".join(lines)).group(1)
    return t, next(i for i, line in enumerate(lines)
                   if line.startswith("tm::store_shared<true>((smem") and line.endswith(f"{t});"))


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_a_tile_is_staged_at_its_last_register_reader(arch):
    lines = _consumer_loop(read_then_multiplied, arch)
    t, stage = _exp_and_its_staging(lines)
    scale = next(i for i, line in enumerate(lines) if line.startswith(f"tm::map2({t}, "))
    matmul = next(i for i, line in enumerate(lines) if "matmul" in line)
    assert stage < scale < matmul  # staged, then the product written over t's registers


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_a_tile_read_in_registers_after_its_matmul_is_staged_at_the_matmul(arch):
    lines = _consumer_loop(multiplied_then_read, arch)
    _, stage = _exp_and_its_staging(lines)
    matmul = next(i for i, line in enumerate(lines) if "matmul" in line)
    assert stage == matmul - 3 - (arch == "sm_90a")  # barrier, store, (proxy fence,) barrier, matmul


def test_a_tile_only_matmuls_read_is_staged_where_it_is_made():
    """sm_80 keeps program order: t is staged before q·kᵀ, its registers free for the scores."""
    lines = _consumer_loop(made_for_a_later_matmul, "sm_80")
    _, stage = _exp_and_its_staging(lines)
    assert stage < next(i for i, line in enumerate(lines) if "matmul" in line)


def test_a_tile_made_beside_a_wgmma_group_is_staged_at_its_matmul():
    """sm_90a issues q·kᵀ first; with its group in flight where t is made, t is staged at s·t, after
    the wait (staged beside in-flight accumulators, ptxas spilled more)."""
    lines = _consumer_loop(made_for_a_later_matmul, "sm_90a")
    _, stage = _exp_and_its_staging(lines)
    wait = next(i for i, line in enumerate(lines) if line.startswith("tm::wgmma_wait"))
    matmuls = [i for i, line in enumerate(lines) if "matmul" in line]
    assert matmuls[0] < wait < stage < matmuls[1]


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["auto", "generic"])
@pytest.mark.parametrize("program", [read_then_multiplied, made_for_a_later_matmul], ids=lambda p: p.name)
def test_staged_early_matches_the_interpreter(target, program):
    g = torch.Generator().manual_seed(0)
    inputs = {n: 0.5 * torch.randn(2, 130, 3, 64, generator=g, dtype=torch.float64)
              for n, spec in program.specs.items() if not spec.output}
    expected = ops.run(program, **inputs)["y"]
    cuda = {n: t.cuda().to(torch.bfloat16) for n, t in inputs.items()}
    with ops.use_target(target):
        got = ops.run(program, **cuda)["y"]
    assert rel_err(got.float().cpu(), expected.numpy()) <= bound(torch.bfloat16)
