"""The ``tilemix`` command line, as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tilemix.bench.cli import main
from tilemix.tiles import Out, Seq, State, chunks, kernel, rowsum


@kernel
def read_state(x: Seq["K"], y: Out[Seq["K"]], s: State["K", "N"] = None):
    """A program with a dim (N) that only its state sizes: ``tilemix show test_cli:read_state``."""
    for c in chunks(64):
        y[c] = x[c] + rowsum(x[c] @ s)


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
    cpu = next(line for line in out.splitlines() if "│ cpu " in line)
    hopper = next(line for line in out.splitlines() if "│ sm_90a " in line)
    assert "any size" in cpu and "1 or multiples of 16" in hopper, out  # what the verifier holds each to
    assert "head dims in multiples of 64" in out


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


def test_show_a_program_of_the_checkout_by_its_path(capsys, monkeypatch):
    """From the root of the checkout tilemix runs from, ``ops.gated:gla_fwd`` is the package's own
    module (``tilemix.ops.gated``): imported as ``ops``, its ops would register a second time."""
    from tilemix import ops

    root = Path(__file__).resolve().parents[1]
    if Path(ops.__file__).resolve().parent.parent != root:
        pytest.skip("tilemix is installed from elsewhere, not this checkout")
    monkeypatch.chdir(root)
    assert main(["show", "ops.gated:gla_fwd", "--ir"]) == 0
    assert "gla_fwd" in capsys.readouterr().out


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
    assert set(inputs) == {"q", "k", "v", "g", "scale"} and inputs["g"].shape == (1, 70, 2, 16)
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


def test_demo_prints_each_row_as_it_goes_and_times_a_warm_call(capsys, monkeypatch):
    """Each row appears once measured (not all at the end, after seconds of silence), and its ms column
    times a second call: the first traces (on a GPU, compiles) and is not counted."""
    import time

    from tilemix.bench import demo

    calls, printed, results = [], [], []
    gemm, linear_attention = demo.CASES[0], demo.CASES[2]

    def slow_first_call(**kwargs):
        printed.append(capsys.readouterr().out)
        calls.append(kwargs)
        if len(calls) % 2:  # a dtype's first call: as slow as tracing or compiling
            time.sleep(0.5)
            results.append(linear_attention.run(**kwargs))
        return results[-1]

    monkeypatch.setattr(demo, "CASES", [gemm, demo.Case(linear_attention.op, linear_attention.shape,
                                                        linear_attention.make, slow_first_call, linear_attention.ref)])
    assert demo.run_demo() == 0
    assert all("gemm  " in printed[0] and dtype in printed[0] for dtype in ("float32", "bfloat16", "float16"))
    assert len(calls) == 6  # a first call and a timed one per dtype
    rows = "".join(printed) + capsys.readouterr().out
    timed = [float(line.split()[-1]) for line in rows.splitlines() if line.startswith("linear_attention")]
    assert len(timed) == 3 and max(timed) < 250, rows


def test_version(capsys):
    from tilemix import ops, tiles

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"tilemix {tiles.__version__}"
    assert ops.__version__ == tiles.__version__ and tiles.__version__.count(".") >= 1


def test_show_into_a_closed_pipe_is_quiet():
    """``tilemix show ... | head``: the reader leaving early is no error worth a traceback."""
    shown = subprocess.Popen([sys.executable, "-m", "tilemix.bench.cli", "show", "gemm"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shown.stdout.close()  # before it writes: every write meets a closed pipe
    err = shown.stderr.read().decode()
    assert shown.wait() == 141 and err == "", err


def test_show_without_the_codegen_extra_names_it(capsys, monkeypatch):
    """--sass/--resources without NVRTC or cuobjdump: a message naming the extra, not a traceback."""
    from tilemix.codegen import compile as codegen

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # `from cuda.bindings import nvrtc` fails
    codegen._nvrtc.cache_clear()
    monkeypatch.setattr(codegen, "_MEMORY", {})
    try:
        for flag in ("--sass", "--resources"):
            assert main(["show", "gemm", flag]) == 1
            assert "pip install 'tilemix[codegen]'" in capsys.readouterr().err
    finally:
        codegen._nvrtc.cache_clear()
    monkeypatch.setattr(codegen.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "nvidia", None)
    with pytest.raises(codegen.MissingTool, match=r"cuobjdump not found: pip install 'tilemix\[codegen\]'"):
        codegen.sass(codegen.Compiled(b"", "sm_90a", "", ""))


def test_show_resources_counts_the_stack_as_local_memory(capsys, monkeypatch):
    """A kernel that spills (normalized_la_fwd: its stack frame, LDL/STL in the SASS) shows that local memory."""
    pytest.importorskip("cuda.bindings")
    monkeypatch.chdir(Path(__file__).parent)
    assert main(["show", "test_user_mixers:normalized_la_fwd", "--resources"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"(\d+) B local memory \((\d+) B stack\)", out)
    assert found and int(found[1]) == int(found[2]) > 0, out


def test_show_honours_dim_for_the_ops(capsys):
    """--dim resizes any named dim of a built-in op (B, T, H too); a dim it does not have is an error."""
    assert main(["show", "linear_attention", "--ir", "--dim", "K=64"]) == 0
    assert "[K=64, V=128;" in capsys.readouterr().out
    assert main(["show", "gemm", "--ir", "--dim", "X=64"]) == 2
    assert "gemm_fwd has no dim X; its dims are K, M, N" in capsys.readouterr().err


def test_show_sizes_a_dim_only_a_state_has(capsys, monkeypatch):
    """A dim only a State sizes takes --dim (default 128) instead of crashing in default_schedule."""
    pytest.importorskip("cuda.bindings")
    monkeypatch.chdir(Path(__file__).parent)
    assert main(["show", "test_cli:read_state", "--ir", "--dim", "N=64"]) == 0
    assert "[K=128, N=64;" in capsys.readouterr().out
    assert main(["show", "test_cli:read_state", "--dim", "N=64"]) == 0
    assert "tm::matmul" in capsys.readouterr().out


def test_plot_of_a_missing_or_foreign_file_says_so(capsys, tmp_path):
    assert main(["plot", str(tmp_path / "missing.json"), str(tmp_path)]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["plot", str(tmp_path / "list.json"), str(tmp_path)]) == 2
    assert "not a `tilemix bench --json` result" in capsys.readouterr().err


def test_bench_checks_names_before_the_gpu(capsys):
    assert main(["bench", "nosuchop"]) == 2
    err = capsys.readouterr().err
    assert "unknown op(s) ['nosuchop']" in err and "'ssd-bwd'" in err


def test_show_ir_reports_what_the_lowering_rejects(capsys, monkeypatch):
    """For a GPU arch, ``show --ir`` prints the verified IR and then lowers it as a launch does, so a program
    that verifies but does not lower gets the error, naming its line, that ``show`` and a run give."""
    from tilemix.codegen import specialise
    from tilemix.tiles import TileError

    def reject(kernel, binding, schedule, arch):
        raise TileError(f"{arch} code generator: this is not lowered", kernel.loc)

    monkeypatch.setattr(specialise, "kernel_source", reject)
    for flags in ([], ["--ir"], ["--ir", "--arch", "sm_80"]):
        assert main(["show", "linear_attention", *flags]) == 2
        err = capsys.readouterr().err
        assert "code generator: this is not lowered" in err and "linear_attention.py:" in err, err
    assert main(["show", "linear_attention", "--ir", "--arch", "cpu"]) == 0  # the interpreter lowers nothing
