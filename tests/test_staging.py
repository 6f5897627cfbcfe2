"""A register tile read by an elementwise op and then only by matmuls (from shared memory) is staged
before that op, which may then write over its registers (codegen/staging.py), on both targets."""

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


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["auto", "generic"])
def test_staged_early_matches_the_interpreter(target):
    g = torch.Generator().manual_seed(0)
    x, q = (0.5 * torch.randn(2, 130, 3, 64, generator=g, dtype=torch.float64) for _ in range(2))
    expected = ops.run(read_then_multiplied, x=x, q=q)["y"]
    cuda = {n: t.cuda().to(torch.bfloat16) for n, t in dict(x=x, q=q).items()}
    with ops.use_target(target):
        got = ops.run(read_then_multiplied, **cuda)["y"]
    assert rel_err(got.float().cpu(), expected.numpy()) <= bound(torch.bfloat16)
