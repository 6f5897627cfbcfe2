"""A register tile read by an elementwise op and then only by matmuls (from shared memory) is staged
before that op, which may then write over its registers; one only matmuls read is staged where it is
made, unless a wgmma group is in flight there (codegen/staging.py), on both targets. With
``Schedule.stage_a`` an A operand counts as well (read from shared memory then); the default schedule
takes it where the kernel spills less."""

from __future__ import annotations

import re

import pytest
import torch

from tilemix import ops
from tilemix.ops.attention import attention_bwd_dkdv
from tilemix.ops.examples import kernel_specs
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import Out, Seq, chunks, exp, kernel

pytest.importorskip("cuda.bindings", reason="lowering needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from dataclasses import replace  # noqa: E402

from tilemix.codegen.compile import MissingTool, compile_cuda, resources  # noqa: E402
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


@kernel
def made_for_a_matmul_as_a(x: Seq["D"], k: Seq["D"], y: Out[Seq["D"]]):
    for c in chunks(64):
        a = exp(x[c])  # the matmul's A, read by it alone
        y[c] = a @ k[c]


def _consumer_loop(program, arch: str, **schedule) -> list[str]:
    binding = program.bind(kernel_specs(program, size=64))
    chosen = replace(default_schedule(program, binding, arch), **schedule)
    source = kernel_source(program, binding, chosen, arch).source
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


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_stage_a_reads_an_a_operand_from_shared_memory(arch):
    """By default the A operand stays in registers (``*_rs``); with ``stage_a`` it is staged where
    ``exp`` makes it, before the matmul, which reads both operands from shared memory (``*_ss``)."""
    kept = "\n".join(_consumer_loop(made_for_a_matmul_as_a, arch))
    assert "matmul_rs" in kept or "matmul_sync_rs" in kept
    lines = _consumer_loop(made_for_a_matmul_as_a, arch, stage_a=True)
    _, stage = _exp_and_its_staging(lines)
    matmul = next(i for i, line in enumerate(lines) if "matmul" in line)
    assert stage < matmul and "_ss" in lines[matmul] and not any("_rs" in line for line in lines)


def _local_bytes(program, binding, schedule, arch: str) -> int:
    source = kernel_source(program, binding, schedule, arch)
    return resources(compile_cuda(source.source, arch, source.name))["local_memory"]


def test_default_stages_a_operands_where_the_kernel_spills_less():
    """gla's forward at D = 128 spills less with ``stage_a`` (on a ring one stage shorter: none), so the
    default takes it; attention's dk/dv does not spill, so it keeps its A operands in registers."""
    gla = ops.gla_fwd.bind(kernel_specs(ops.gla_fwd, size=128))
    dkdv = attention_bwd_dkdv.bind(kernel_specs(attention_bwd_dkdv, size=128))
    try:
        staged = default_schedule(ops.gla_fwd, gla, "sm_90a")
        kept = default_schedule(attention_bwd_dkdv, dkdv, "sm_90a")
        unstaged = replace(staged, stage_a=False, stages=staged.stages + 1)
        spills = [_local_bytes(ops.gla_fwd, gla, s, "sm_90a") for s in (staged, unstaged)]
        kept_spills = _local_bytes(attention_bwd_dkdv, dkdv, kept, "sm_90a")
    except MissingTool:
        pytest.skip("needs NVRTC to compile")
    assert staged.stage_a and spills[0] == 0 < spills[1]
    assert not kept.stage_a and kept_spills == 0


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["auto", "generic"])
@pytest.mark.parametrize("program", [read_then_multiplied, made_for_a_later_matmul, made_for_a_matmul_as_a],
                         ids=lambda p: p.name)
def test_staged_early_matches_the_interpreter(target, program, monkeypatch):
    monkeypatch.setenv("TILEMIX_SCHEDULE", f"{program.name}:stage_a=true")
    g = torch.Generator().manual_seed(0)
    inputs = {n: 0.5 * torch.randn(2, 130, 3, 64, generator=g, dtype=torch.float64)
              for n, spec in program.specs.items() if not spec.output}
    expected = ops.run(program, **inputs)["y"]
    cuda = {n: t.cuda().to(torch.bfloat16) for n, t in inputs.items()}
    with ops.use_target(target):
        got = ops.run(program, **cuda)["y"]
    assert rel_err(got.float().cpu(), expected.numpy()) <= bound(torch.bfloat16)
