"""``tilemix demo``: run every op and check it against the float64 reference.

The ops run through the NumPy interpreter — the same tile programs the GPU
backends compile — and, on a GPU, as generated kernels too (sm_90a on an H100,
the generic mma.sync kernels on sm_8x or with TILEMIX_TARGET=generic); a row per
op, dtype and device, printed as it is measured, shows how close each comes to
the exact answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console

from tilemix import ops, reference
from tilemix.reference.tolerance import bound, rel_err

__all__ = ["run_demo"]

@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[np.random.Generator, torch.dtype], dict]  # -> keyword arguments
    run: Callable  # the tilemix op
    ref: Callable  # the float64 reference


def _seq(rng, dtype, *shape):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)


def _ssd_args(rng, dtype, B=2, T=300, H=4, G=2, N=64, P=64):
    return dict(x=_seq(rng, dtype, B, T, H, P),
                dt=torch.from_numpy(rng.uniform(0.01, 0.5, (B, T, H)).astype(np.float32)),
                A=torch.from_numpy(-rng.uniform(0.1, 4.0, H).astype(np.float32)),
                B=_seq(rng, dtype, B, T, G, N), C=_seq(rng, dtype, B, T, G, N),
                D=torch.from_numpy(rng.standard_normal(H).astype(np.float32)),
                initial_state=torch.from_numpy(rng.standard_normal((B, H, N, P)).astype(np.float32)),
                output_final_state=True)


CASES = [
    Case("gemm", "M=500 N=384 K=320",
         lambda rng, dt: dict(a=_seq(rng, dt, 500, 320), b=_seq(rng, dt, 320, 384)), ops.gemm, reference.gemm),
    Case("attention", "B=2 T=300 H=4 D=64 causal",
         lambda rng, dt: dict(q=_seq(rng, dt, 2, 300, 4, 64), k=_seq(rng, dt, 2, 300, 4, 64),
                              v=_seq(rng, dt, 2, 300, 4, 64), causal=True), ops.attention, reference.attention),
    Case("linear_attention", "B=2 T=300 H=4 K=V=64",
         lambda rng, dt: dict(q=_seq(rng, dt, 2, 300, 4, 64), k=_seq(rng, dt, 2, 300, 4, 64),
                              v=_seq(rng, dt, 2, 300, 4, 64),
                              initial_state=torch.from_numpy(rng.standard_normal((2, 4, 64, 64)).astype(np.float32)),
                              output_final_state=True),
         ops.linear_attention, reference.linear_attention),
    Case("ssd", "B=2 T=300 H=4 G=2 N=P=64", _ssd_args, ops.ssd, reference.ssd),
]


def _outputs(result) -> list:
    return [r for r in (result if isinstance(result, tuple) else (result,)) if r is not None]


def _on(device: str, args: dict) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def _gpu_arch() -> str | None:
    """The arch the ops compile for on this GPU (sm_90a, or a generic sm_8x / forced sm_90), None
    without a GPU tilemix generates code for."""
    from tilemix.ops.runtime import select_arch

    if not torch.cuda.is_available():
        return None
    try:
        return select_arch(torch.cuda.get_device_capability())
    except ValueError:
        return None


def _devices(console: Console) -> list[str]:
    if not torch.cuda.is_available():
        console.print("No CUDA GPU: running the NumPy interpreter (the tile programs' reference semantics).")
        return ["cpu"]
    name, arch = torch.cuda.get_device_name(), _gpu_arch()
    if arch is None:
        console.print(f"{name}: no code generator for this GPU; running the NumPy interpreter only.")
        return ["cpu"]
    kind = "sm_90a" if arch == "sm_90a" else f"generic {arch} (mma.sync)"
    console.print(f"{name}: the NumPy interpreter, then the generated {kind} kernels (bf16/fp16).")
    return ["cpu", "cuda"]


COLUMNS = (("op", 16), ("shape", 26), ("device", 11), ("dtype", 8), ("max rel. error", 14), ("bound", 5),
           ("ok", 3), ("ms", 8))


def _line(cells) -> str:
    """One row of the table, each cell padded to its column (numbers to the right)."""
    return "  ".join(cell.rjust(width) if name in ("max rel. error", "bound", "ms") else cell.ljust(width)
                     for cell, (name, width) in zip(cells, COLUMNS))


def _timed_ms(case: Case, args: dict, device: str) -> tuple[list, float]:
    """The op's outputs and its time in ms, after a first call that traces (and on a GPU compiles) it."""
    case.run(**args)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    got = _outputs(case.run(**args))
    if device == "cuda":
        torch.cuda.synchronize()
    return got, (time.perf_counter() - start) * 1e3


def run_demo(seed: int = 0, dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> int:
    """Print a row per op, dtype and device as each is measured; return 0 when every op is within its
    dtype's bound."""
    console = Console(width=max(Console().width, 110), highlight=False)  # rows unwrapped when piped
    devices, arch = _devices(console), _gpu_arch()
    console.print(_line(name for name, _ in COLUMNS), style="bold")
    failures = rows = 0
    rng = np.random.default_rng(seed)
    for case in CASES:
        for dtype in dtypes:
            args = case.make(rng, dtype)
            expected = _outputs(case.ref(**args))
            for device in devices:
                if device == "cuda" and dtype == torch.float32:
                    continue  # the tensor cores take 16-bit operands
                got, ms = _timed_ms(case, _on(device, args), device)
                error = max(rel_err(g.cpu(), e) for g, e in zip(got, expected))
                ok = error <= bound(dtype)
                failures, rows = failures + (not ok), rows + 1
                cells = (case.op, case.shape, "interpreter" if device == "cpu" else arch,
                         str(dtype).replace("torch.", ""), f"{error:.2e}", f"{bound(dtype):.0e}", "yes" if ok else "NO",
                         f"{ms:.1f}")
                console.print(_line(cells), style=None if ok else "red")
    console.print(f"{rows - failures} of {rows} within their dtype's bound; ms: a second call (the first traces, "
                  "and on a GPU compiles)")
    return 1 if failures else 0
