"""The ``tilemix`` command line, as a user runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tilemix.bench.cli import main


def test_demo_passes_every_bound(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for op in ("gemm", "attention", "linear_att", "ssd"):
        assert op in out
    assert "NO" not in out


def test_list_names_ops_and_targets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "linear_attention_fwd" in out and "sm_90a" in out and "128 KiB" in out


def test_show_ir(capsys):
    assert main(["show", "ssd", "--ir"]) == 0
    assert "segsum" in capsys.readouterr().out


def test_show_generic_target(capsys):
    """--arch sm_8x, or --target generic (sm_90: what an H100 runs when the generic target is forced),
    shows the mma.sync kernel; --target hopper is sm_90a only."""
    pytest.importorskip("cuda.bindings")
    assert main(["show", "attention", "--arch", "sm_80"]) == 0
    assert "tm::matmul_sync" in capsys.readouterr().out
    assert main(["show", "gemm", "--target", "generic", "--sass", "--resources"]) == 0
    out = capsys.readouterr().out
    assert "(sm_90)" in out and "HMMA" in out and "HGMMA" not in out
    assert main(["show", "gemm", "--arch", "sm_86", "--target", "hopper"]) == 2
    assert "sm_90a" in capsys.readouterr().err


def test_show_a_users_own_program(capsys, monkeypatch):
    """module:kernel shows any @kernel (imported from the current directory), each named dim at
    --dim NAME=SIZE or 128; anything else is an error naming what was expected."""
    pytest.importorskip("cuda.bindings")
    monkeypatch.chdir(Path(__file__).parent)
    assert main(["show", "test_user_mixers:gla_fwd", "--ir", "--dim", "K=64"]) == 0
    assert "K=64, V=128" in capsys.readouterr().out
    assert main(["show", "test_user_mixers:anticausal_la_fwd", "--resources"]) == 0
    assert "tilemix_anticausal_la_fwd (sm_90a)" in capsys.readouterr().out
    for ref, words in (("test_user_mixers:MIXERS", "is a dict, not a @kernel"), ("no_such_module:x", "cannot load"),
                       ("linear_attn", "unknown op 'linear_attn'")):
        assert main(["show", ref]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.parametrize("op", ["gemm", "attention", "linear_attention", "ssd"])
def test_show_cuda_sass_and_resources(op, capsys):
    pytest.importorskip("cuda.bindings")
    assert main(["show", op]) == 0
    assert "tm::matmul" in capsys.readouterr().out
    assert main(["show", op, "--sass", "--resources"]) == 0
    out = capsys.readouterr().out
    assert "HGMMA" in out and "registers/thread" in out


def test_show_applies_schedule_overrides(capsys, monkeypatch):
    """``show`` prints the kernel a launch would run: $TILEMIX_SCHEDULE's fields apply (linear attention's
    chunk in program order waits three times, in the default order twice); a bad value is an error."""
    pytest.importorskip("cuda.bindings")
    waits = {}
    for issue in ("fit", "program"):
        monkeypatch.setenv("TILEMIX_SCHEDULE", f"linear_attention_fwd:issue={issue}")
        assert main(["show", "linear_attention"]) == 0
        loop = capsys.readouterr().out.split("for (int c = 0; c < n_iter")[-1]
        waits[issue] = loop.count("wgmma_wait")
    assert waits == {"fit": 2, "program": 3}, waits
    monkeypatch.setenv("TILEMIX_SCHEDULE", "linear_attention_fwd:issue=sideways")
    assert main(["show", "linear_attention"]) == 2
    assert "'fit', 'early', 'program'" in capsys.readouterr().err


def test_tune_rejects_unknown_ops(capsys):
    assert main(["tune", "not_an_op"]) == 2
    out = capsys.readouterr().out
    assert "unknown op(s) ['not_an_op']" in out and "'ssd-bwd'" in out


def test_tune_and_bench_load_a_users_program_before_asking_for_a_gpu(capsys):
    assert main(["tune", "no_such_module:x"]) == 2
    assert "cannot load 'no_such_module:x'" in capsys.readouterr().out
    assert main(["bench", "test_user_mixers:MIXERS"]) == 2
    assert "is a dict, not a @kernel" in capsys.readouterr().err


def test_random_inputs_for_a_users_program():
    """What `tilemix tune module:kernel` tunes on: inputs the program takes, each named dim sized."""
    from test_user_mixers import gla_fwd

    from tilemix import ops
    from tilemix.ops.examples import kernel_inputs

    inputs = kernel_inputs(gla_fwd, device="cpu", dtype="float32", B=1, T=70, H=2, size=16)
    assert set(inputs) == {"q", "k", "v", "g"} and inputs["g"].shape == (1, 70, 2, 16)
    assert ops.run(gla_fwd, **inputs)["o"].isfinite().all()


@pytest.mark.gpu
def test_gpu_tune_a_users_program(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TILEMIX_CACHE", str(tmp_path))
    assert main(["tune", "test_user_mixers:anticausal_la_fwd", "--shape", "2,1024,4,64"]) == 0
    assert "anticausal_la_fwd" in capsys.readouterr().out  # its row, named by the program


@pytest.mark.gpu
def test_gpu_bench_a_users_program(tmp_path):
    import json

    path = tmp_path / "run.json"
    assert main(["bench", "test_user_mixers:anticausal_la_fwd", "--json", str(path)]) == 0
    (record,) = json.loads(path.read_text())["records"]
    assert record["op"] == "anticausal_la_fwd" and record["ms"] > 0 and record["peer_ms"] != record["peer_ms"]


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["hopper", "generic"])
def test_gpu_tune_one_op(target, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TILEMIX_CACHE", str(tmp_path))
    assert main(["tune", "linear_attention", "--shape", "2,1024,4,64", "--target", target]) == 0
    out = capsys.readouterr().out
    assert "tuned config" in out and ("sm_90a kernels" if target == "hopper" else "sm_90 kernels") in out


@pytest.mark.gpu
def test_gpu_tune_a_backward(capsys, tmp_path, monkeypatch):
    """``<op>-bwd`` tunes each program the op's backward launches, a row each, named by the program."""
    monkeypatch.setenv("TILEMIX_CACHE", str(tmp_path))
    assert main(["tune", "linear_attention-bwd", "--shape", "2,1024,4,64"]) == 0
    cells = [line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    rows = [cell for cell in cells if cell]  # a row whose config wraps goes on with an empty first cell
    assert rows == ["linear_attention_bwd_dq", "linear_attention_bwd_total", "linear_attention_bwd_dv",
                    "linear_attention_bwd_dk"], rows
