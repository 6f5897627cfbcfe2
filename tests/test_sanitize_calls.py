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
