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
