"""The benchmark suite's shapes and plots (no GPU: plots from a synthetic result)."""

from __future__ import annotations

import pytest

from tilemix.bench.bench import SHAPE, sweep_rows
from tilemix.bench.plots import plot_results


def test_sweep_holds_tokens_constant():
    rows = sweep_rows()
    assert {r[0] for r in rows} == {"linear_attention", "ssd", "attention"}
    assert {r[2] for r in rows} == {1024, 2048, 4096, 8192, 16384, 32768, 65536}
    assert {r[4] for r in rows} == {64, 128}
    assert all(B * T * H == SHAPE[0] * SHAPE[1] * SHAPE[2] for _, B, T, H, _ in rows)


def test_plots_from_a_result(tmp_path):
    pytest.importorskip("matplotlib")
    records = [dict(op="linear_attention", shape=dict(B=8 * 4096 // T, T=T, H=16, K=128, V=128), ms=0.2 * T / 4096,
                    peer="fla-chunk_linear_attn", peer_ms=0.5 * T / 4096, roofline_fraction=0.9)
               for T in (1024, 4096, 16384)]
    result = dict(gpu="H100", date="2026-11-24", versions=dict(torch="2.11"), records=records)
    written = plot_results(result, tmp_path)
    assert {p.name for p in written} == {"linear_attention-d128-time.png", "roofline.png"}
    assert all(p.stat().st_size > 1000 for p in written)


def test_markdown_and_json_path_from_a_result(tmp_path, capsys):
    import json

    from tilemix.bench.bench import default_json_path, results_markdown
    from tilemix.bench.plots import main

    records = [dict(op="ssd", shape=dict(B=8, T=4096, H=16), ms=0.3, host_us=90.0, peer="fla-chunk_simple_gla",
                    peer_ms=0.5, speedup=0.5 / 0.3, roofline_fraction=0.31)]
    result = dict(gpu="NVIDIA H100 80GB HBM3", date="2026-11-24", versions=dict(torch="2.11"), copy_tbps=3.0,
                  mma_tflops=790.0, command="tilemix bench ssd", records=records)
    assert default_json_path(result).name == "h100-2026-11-24.json"
    assert default_json_path(result).parent.name == "results"
    text = results_markdown(result)
    assert "| ssd | B=8 T=4096 H=16 | 0.300 | 90 | fla-chunk_simple_gla | 0.500 | 1.67x | 31% |" in text
    assert "copy 3.00 TB/s" in text and "790 TFLOP/s" in text
    path = tmp_path / "run.json"
    path.write_text(json.dumps(result))
    main(str(path), str(tmp_path / "out"), md=True)  # no sweep series: the table only (no matplotlib needed)
    assert (tmp_path / "out" / "results.md").read_text() == text


def test_generic_runs_have_their_own_json_and_heading():
    """tilemix bench --target generic: records and result carry target "generic"; the default JSON
    path and the markdown heading say so (a Hopper run of the same day is not overwritten)."""
    from tilemix.bench.bench import default_json_path, results_markdown

    records = [dict(op="gemm", target="generic", arch="sm_90", shape=dict(M=4096), ms=0.5, peer="cublas",
                    peer_ms=0.2, speedup=0.4, roofline_fraction=0.3)]
    result = dict(gpu="NVIDIA H100 80GB HBM3", date="2026-11-30", target="generic", records=records)
    assert default_json_path(result).name == "h100-2026-11-30-generic.json"
    assert "generic (mma.sync) kernels" in results_markdown(result).splitlines()[0]
    assert default_json_path(dict(result, target="sm_90a")).name == "h100-2026-11-30.json"
