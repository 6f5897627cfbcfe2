"""PNG plots of a ``tilemix bench`` result (matplotlib, an optional dependency: ``pip install
tilemix[plot]``): time against sequence length per op and head dim, beside the peer, and each row's
fraction of its roofline; for a ``--grid`` run, each op's speedup over its peer as a heat map over
batch x heads and sequence length."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from .report import results_markdown

__all__ = ["plot_results", "main"]


def _series(records: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Sweep records grouped by (op and direction, head dim), ordered by sequence length."""
    groups = defaultdict(list)
    for r in records:
        shape, direction = r["shape"], r.get("direction", "fwd")
        op = r["op"] if direction == "fwd" else f"{r['op']}-{direction}"
        groups[(op, shape.get("D", shape.get("K", shape.get("N"))))].append(r)
    return {k: sorted(v, key=lambda r: r["shape"].get("T", 0)) for k, v in groups.items()}


def _grids(records: list[dict]) -> dict[tuple[str, str, int], dict[tuple[int, int], float]]:
    """Grid records' speedups by (op and direction, peer, head dim), keyed (B·H, T)."""
    grids = defaultdict(dict)
    for r in records:
        if r.get("grid"):
            shape, direction = r["shape"], r.get("direction", "fwd")
            op = r["op"] if direction == "fwd" else f"{r['op']}-{direction}"
            dim = shape.get("D", shape.get("K", shape.get("N")))
            grids[(op, r["peer"], dim)][(shape["B"] * shape["H"], shape["T"])] = r["speedup"]
    return dict(grids)


def _heat_map(plt, cells: dict[tuple[int, int], float], title: str, path: Path) -> Path:
    """Speedup over the peer on a log colour scale centred on 1 (red: slower, blue: faster); grid
    points not measured stay blank."""
    import numpy as np
    from matplotlib.colors import LogNorm

    heads, lengths = sorted({bh for bh, _ in cells}), sorted({t for _, t in cells})
    values = np.full((len(heads), len(lengths)), np.nan)
    for (bh, t), x in cells.items():
        values[heads.index(bh), lengths.index(t)] = x
    fig, ax = plt.subplots(figsize=(7, 5))
    image = ax.imshow(values, cmap="RdBu", norm=LogNorm(vmin=0.25, vmax=4), origin="lower", aspect="auto")
    for i, j in zip(*np.nonzero(np.isfinite(values))):
        ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set(xticks=range(len(lengths)), xticklabels=[f"{t // 1024}k" for t in lengths], yticks=range(len(heads)),
           yticklabels=heads, xlabel="sequence length T", ylabel="batch x heads")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="speedup over the peer")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_results(result: dict, out_dir: str | Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install 'tilemix[plot]'") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    caption = f"{result['gpu']}, {result['date']}, torch {result['versions'].get('torch', '?')}"
    written = [_heat_map(plt, cells, f"{op} vs {peer}, head dim {dim}\n{caption}", out / f"{op}-{peer}-d{dim}-grid.png")
               for (op, peer, dim), cells in sorted(_grids(result["records"]).items())]
    records = [r for r in result["records"] if not r.get("grid")]
    series = {k: v for k, v in _series(records).items() if len(v) > 1 and "T" in v[0]["shape"]}
    for (op, dim), rows in sorted(series.items()):
        T = [r["shape"]["T"] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(T, [r["ms"] for r in rows], "o-", label="tilemix")
        ax.plot(T, [r["peer_ms"] for r in rows], "s--", label=rows[0]["peer"])
        ax.plot(T, [r["ms"] * r["roofline_fraction"] for r in rows], ":", color="gray", label="roofline")
        ax.set(xscale="log", yscale="log", xlabel="sequence length T (B·H·T constant)", ylabel="ms")
        ax.set_title(f"{op}, head dim {dim}\n{caption}", fontsize=9)
        ax.legend()
        path = out / f"{op}-d{dim}-time.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    if series:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (op, dim), rows in sorted(series.items()):
            ax.plot([r["shape"]["T"] for r in rows], [r["roofline_fraction"] for r in rows], "o-", label=f"{op} d{dim}")
        ax.set(xscale="log", ylim=(0, 1.05), xlabel="sequence length T", ylabel="fraction of roofline")
        ax.set_title(f"roofline fraction\n{caption}", fontsize=9)
        ax.legend(fontsize=7)
        path = out / "roofline.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _read_result(json_path: str) -> dict:
    """A ``tilemix bench --json`` result; a ValueError saying what is wrong with the file otherwise."""
    try:
        result = json.loads(Path(json_path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{json_path}: no such file (expected a JSON file `tilemix bench --json` wrote)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{json_path}: cannot be read as JSON: {e}") from None
    if not isinstance(result, dict) or not {"gpu", "date", "versions", "records"} <= result.keys():
        raise ValueError(f"{json_path}: not a `tilemix bench --json` result (one has gpu, date, versions, records)")
    return result


def main(json_path: str, out_dir: str, md: bool = False) -> int:
    try:
        result = _read_result(json_path)
    except ValueError as e:
        print(f"tilemix plot: {e}", file=sys.stderr)
        return 2
    if md:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "results.md").write_text(results_markdown(result))
        print(f"wrote {Path(out_dir) / 'results.md'}")
    try:
        written = plot_results(result, out_dir)
    except RuntimeError as e:
        print(f"tilemix plot: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0
