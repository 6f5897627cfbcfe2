"""A ``tilemix bench`` result as text: the RESULTS.md section of a run and its table cells."""

from __future__ import annotations

import math

from tilemix.ops.timing import HOST_WINDOW_MS

__all__ = ["results_markdown", "number_cell", "shape_text"]


def number_cell(x: float, spec: str, unit: str = "") -> str:
    """``x`` formatted, or "—" for NaN (a peer not timed: --no-peers, fla not installed, a shape it refuses)."""
    return "—" if math.isnan(x) else f"{x:{spec}}{unit}"


def shape_text(shape: dict) -> str:
    """A record's shape as ``B=8 T=4096 ...``."""
    return " ".join(f"{k}={v}" for k, v in shape.items())


def results_markdown(result: dict) -> str:
    """A RESULTS.md section for one run: the machine, the ceilings measured in it, one row per
    record (and, for a sweep, that is every length and head dim)."""
    versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
    nan = float("nan")
    kernels = ", generic (mma.sync) kernels" if result.get("target") == "generic" else ""
    lines = [f"## {result['gpu']}, {result['date']}{kernels}", "",
             f"Command: `{result.get('command', 'tilemix bench')}`; {versions}. Ceilings of this run: copy "
             f"{result.get('copy_tbps', nan):.2f} TB/s, cuBLAS bf16 {result.get('mma_tflops', nan):.0f} TFLOP/s. "
             "Median of CUDA-event timings after warm-up; before each call L2 is flushed and the GPU spins "
             f"{HOST_WINDOW_MS:g} ms, so host time shorter than that is not counted (host µs: per call).", "",
             "| op | shape | tilemix ms | host µs | peer | peer ms | speedup | roofline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        op = r["op"] if r.get("direction", "fwd") == "fwd" else f"{r['op']} ({r['direction']})"
        lines.append(f"| {op} | {shape_text(r['shape'])} | {r['ms']:.3f} | {r.get('host_us', nan):.0f} | "
                     f"{r['peer']} | {number_cell(r['peer_ms'], '.3f')} | {number_cell(r['speedup'], '.2f', 'x')} | "
                     f"{r['roofline_fraction']:.0%} |")
    return "\n".join(lines) + "\n"
