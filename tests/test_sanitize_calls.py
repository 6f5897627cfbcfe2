"""The calls ``python -m tilemix.bench.sanitize`` launches under compute-sanitizer, run on the CPU
interpreter in float32: each group's ops take the arguments it passes (a call that fails here would
cut a GPU run short). The tail group, the slowest here, runs on the GPU only."""

from __future__ import annotations

import time

import pytest
import torch

from tilemix.bench import sanitize


@pytest.mark.parametrize("group", [g for g in (*sanitize.CALLS, "segmented") if g != "tail"])
def test_group_runs_on_the_interpreter(group):
    generator = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator).to(dtype)

    sanitize.CALLS.get(group, sanitize._segmented_calls)(rnd, "auto")


def test_a_tool_out_of_time_reports_what_ran(tmp_path, monkeypatch, capsys):
    """A tool that runs past ``--timeout`` is killed with the program it checks; the table shows the
    groups whose kernels ran to the end and the reports so far, and the run fails (never clean)."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text("#!/bin/sh\necho 'launched: tail auto bfloat16'\n"
                    "echo '========= Invalid __global__ read of size 4 bytes'\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sanitize.shutil, "which", lambda name: str(fake) if name == "compute-sanitizer" else None)
    started = time.monotonic()
    assert sanitize.main(["--tool", "memcheck", "--timeout", "1"]) == 1
    assert time.monotonic() - started < 30
    out = " ".join(capsys.readouterr().out.split())
    assert "timed out after 1 s; ran: tail auto bfloat16" in out and "1 reports so far" in out


# programs only the GPU runs: the CPU scans every sequence in one segment, so the segment programs
# (forward states, the backward's) run under the segmented group on the GPU alone
SEGMENT_PROGRAMS = {"linear_attention_bwd_dk_states", "linear_attention_bwd_dq_states", "ssd_states",
                    "ssd_bwd_dx_states"}
# token-level programs no op launches as written: the delta rules run prepare + scan, their decode
# steps the one-token form (``*_fwd_step``, checked below)
NOT_LAUNCHED = {"delta_rule_fwd", "gated_delta_rule_fwd"}


def _shipped_programs() -> dict[str, object]:
    """Every program ``tilemix.ops`` defines at module level, and every decode step's, by name."""
    import importlib
    import pkgutil

    from tilemix import ops
    from tilemix.ops.decode import STEPS
    from tilemix.tiles import Kernel

    found = {step.kernel.name: step.kernel for step in STEPS.values()}
    for module in pkgutil.iter_modules(ops.__path__):
        for value in vars(importlib.import_module(f"tilemix.ops.{module.name}")).values():
            if isinstance(value, Kernel):
                found[value.name] = value
    return found


def test_the_groups_launch_every_shipped_program():
    """compute-sanitizer checks what its groups launch: a program no group runs (a new op, a path
    taken only without gradients) would never be checked. On the interpreter, each group's calls
    reach every program the ops define, but the GPU-only segment programs."""
    from tilemix.ops.runtime import capture_calls

    generator = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator).to(dtype)

    launched = set()
    for group in (*sanitize.CALLS, "segmented"):
        with capture_calls() as calls:
            sanitize.CALLS.get(group, sanitize._segmented_calls)(rnd, "auto")
        launched |= {kernel.name for kernel, _ in calls}
    shipped = set(_shipped_programs())
    assert SEGMENT_PROGRAMS | NOT_LAUNCHED <= shipped  # the exceptions name real programs
    assert shipped - launched == SEGMENT_PROGRAMS | NOT_LAUNCHED
