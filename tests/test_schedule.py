"""The schedule module's parts that are not the launch's choices (tested in test_hopper/test_tune):
choices declared beside a program, the environment variables' table, one definition per constant."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from tilemix.codegen import env, schedule
from tilemix.ops import custom_op
from tilemix.ops.attention import attention_fwd, attention_fwd_lse, key_chunk
from tilemix.ops.runtime import capture_calls
from tilemix.ops.ssd_backward import ssd_bwd_dc, ssd_bwd_dx
from tilemix.tiles import Const, Out, Seq, chunks, kernel

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = [p for folder in ("tiles", "codegen", "ops", "reference", "bench") for p in (ROOT / folder).rglob("*.py")]


@kernel
def _doubled(x: Seq["D"], y: Out[Seq["D"]], width: Const = 1):
    for c in chunks(64):
        y[c] = x[c] * 2


def test_declared_consts_reach_the_call_unless_it_passes_them():
    """A program's module declares Const values by argument shape; an op of the program adds them
    where the call passes none (on the CPU too), and keeps those it passes."""
    schedule.declare(_doubled, consts=lambda args: dict(width=args["x"].shape[-1]))
    op = custom_op(_doubled, "test_schedule::doubled")
    with capture_calls() as calls:
        assert torch.equal(op(torch.ones(1, 64, 1, 16)), torch.full((1, 64, 1, 16), 2.0))
        op(torch.ones(1, 64, 1, 16), 3)
    assert [args["width"] for _, args in calls] == [16, 3]
    assert schedule.call_consts(_doubled, dict(x=torch.ones(1, 64, 1, 32))) == dict(width=32)
    assert schedule.call_consts(_doubled, dict(x=torch.ones(1, 64, 1, 32), width=3)) == {}


@pytest.mark.parametrize("D, chunk", [(128, None), (256, 64)])
def test_attention_declares_its_key_chunk(D, chunk):
    x = torch.zeros(1, 64, 1, D)
    for program in (attention_fwd, attention_fwd_lse):
        assert schedule.call_consts(program, dict(q=x, v=x)) == key_chunk(dict(q=x, v=x))
        assert schedule.call_consts(program, dict(q=x, v=x)).get("chunk") == chunk


def test_ssd_backward_declares_its_head_split(monkeypatch):
    """P in 64-wide blocks on a GPU, none on the CPU; $TILEMIX_SSD_BWD_SPLIT sets the width (0: none);
    a width that does not cut P into whole blocks, or is all of it, means no split."""
    monkeypatch.delenv("TILEMIX_SSD_BWD_SPLIT", raising=False)
    for program in (ssd_bwd_dc, ssd_bwd_dx):
        assert schedule.head_split_width(program, {"P": 256}, gpu=True) == 64
        assert schedule.head_split_width(program, {"P": 256}, gpu=False) == 256
        assert schedule.head_split_width(program, {"P": 64}, gpu=True) == 64
        assert schedule.head_split_width(program, {"P": 96}, gpu=True) == 96
    monkeypatch.setenv("TILEMIX_SSD_BWD_SPLIT", "32")
    assert schedule.head_split_width(ssd_bwd_dx, {"P": 128}, gpu=False) == 32
    monkeypatch.setenv("TILEMIX_SSD_BWD_SPLIT", "0")
    assert schedule.head_split_width(ssd_bwd_dx, {"P": 128}, gpu=True) == 128
    with pytest.raises(ValueError, match="declares no head_split"):
        schedule.head_split_width(attention_fwd, {"P": 128}, gpu=True)


def test_the_env_table_lists_every_variable_the_source_names():
    """Every ``TILEMIX_*`` name in the package's source is in ``env.VARIABLES``, each with a meaning,
    default and example, and only ``env.py`` reads them from the environment."""
    documented = {v.name for v in env.VARIABLES}
    named, readers = set(), []
    for path in PACKAGE:
        text = path.read_text()
        named |= set(re.findall(r"\bTILEMIX_[A-Z0-9_]+", text))
        if path.name != "env.py":
            readers += [f"{path.name}: {line.strip()}" for line in text.splitlines() if _reads_variable(line)]
    assert named <= documented, sorted(named - documented)
    assert documented <= named, sorted(documented - named)  # no variable nothing reads
    assert not readers, readers
    assert all(v.meaning and v.default and v.example for v in env.VARIABLES)
    table = env.markdown()
    assert all(f"`{name}`" in table for name in documented)


def _reads_variable(line: str) -> bool:
    """Whether ``line`` reads a ``TILEMIX_*`` variable from the environment (setting or deleting one,
    as a tool that launches kernels under it may, is no read)."""
    if re.search(r"(environ\.get|getenv)\(\s*[\"']TILEMIX_", line):
        return True
    return bool(re.search(r"environ\[[\"']TILEMIX_\w+[\"']\]", line)) and not re.search(
        r"^\s*del |environ\[[^\]]+\]\s*=(?!=)", line)


def test_env_refuses_an_undocumented_name_and_finds_the_cache(monkeypatch, tmp_path):
    with pytest.raises(KeyError, match="TILEMIX_TYPO"):
        env.read("TILEMIX_TYPO")
    monkeypatch.setenv("TILEMIX_CACHE", str(tmp_path))
    assert env.cache_root() == tmp_path
    monkeypatch.delenv("TILEMIX_CACHE")
    assert env.cache_root() == Path.home() / ".cache" / "tilemix"


def test_env_reads_what_os_environ_holds(monkeypatch):
    """``read`` looks in os.environ's own dict (no KeyError raised for an unset name): each write and
    delete through os.environ shows, a non-ASCII value included."""
    for value in ("generic", "é/ü", ""):
        monkeypatch.setenv("TILEMIX_TARGET", value)
        assert env.read("TILEMIX_TARGET") == os.environ.get("TILEMIX_TARGET") == value
    monkeypatch.delenv("TILEMIX_TARGET")
    assert env.read("TILEMIX_TARGET") is None


@pytest.mark.parametrize("pattern", [
    r"^\s*(HOPPER_)?PANEL = ", r"^\s*SPLIT_WIDTH = ", r"^\s*MAX_STAGES = ", r"^\s*TUNED_MAX_STAGES = ",
    r"\.cache\"\) / \"tilemix|\.cache\" / \"tilemix", r"gradients are not implemented",
])
def test_each_constant_is_defined_once(pattern):
    """One place for each shared constant, the cache root and the gradient refusal."""
    where = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert len(where) == 1, where


def test_the_tuner_searches_one_stage_past_the_default_bound():
    assert schedule.knob_choices()["stages"] == tuple(range(1, schedule.TUNED_MAX_STAGES + 1))
    assert schedule.TUNED_MAX_STAGES > schedule.MAX_STAGES


def test_states_sharing_a_column_dim_split_it_once():
    """Two states with the same column dim (two chunks() loops, one state each) cut it into one set of
    blocks: a split listed per state multiplied the grid into column blocks past the tensor's end."""
    from test_user_mixers import MIXERS, _specs

    from tilemix.codegen.knobs import column_blocks
    from tilemix.codegen.schedule import default_schedule, schedule_overrides

    program = MIXERS["two_halves_la"]
    binding = program.bind(_specs("two_halves_la", B=2, T=300, H=3, D=128))
    for arch in ("sm_90a", "sm_80"):
        chosen = default_schedule(program, binding, arch)
        assert chosen.split == (("V", 64),) and column_blocks(chosen.split, binding.static) == 2
    with pytest.raises(ValueError, match="names a dim twice"):
        schedule_overrides("two_halves_la_fwd:split=V/64+V/64")
