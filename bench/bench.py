"""``tilemix bench``: each op beside its peer, in one process, on the GPU.

Timings are the median of CUDA-event measurements after warm-up, on random
inputs, with peers measured in the same run. The memory ceiling (a large
device-to-device copy) is measured too, so each row reports its fraction of
the HBM roofline.
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tilemix import ops

__all__ = ["run_bench"]


def time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def _linear_attention_case(B, T, H, D, dtype):
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype) for _ in range(3))
    nbytes = 4 * q.numel() * q.element_size()  # read q, k, v; write o

    def ours():
        return ops.linear_attention(q, k, v)

    def peer():
        from fla.ops.linear_attn import chunk_linear_attn

        return chunk_linear_attn(q, k, v, normalize=False)

    return ours, peer, "fla-chunk_linear_attn", nbytes


def _ssd_case(B, T, H, D, dtype):
    x = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
    dt = torch.rand(B, T, H, device="cuda") * 0.5 + 0.01
    A = -(torch.rand(H, device="cuda") * 4 + 0.1)
    Bm, Cm = (torch.randn(B, T, 1, D, device="cuda", dtype=dtype) for _ in range(2))
    nbytes = 2 * x.numel() * x.element_size() + 2 * Bm.numel() * Bm.element_size() + dt.numel() * 4

    def ours():
        return ops.ssd(x, dt, A, Bm, Cm)

    # the same recurrence as fla's simple GLA: q = C, k = B (per head), v = x * dt, g = dt * A
    k = Bm.expand(B, T, H, D).contiguous()
    q = Cm.expand(B, T, H, D).contiguous()
    v = (x * dt[..., None]).to(dtype)
    g = (dt * A).contiguous()

    def peer():
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla(q, k, v, g=g, scale=1.0)

    return ours, peer, "fla-chunk_simple_gla", nbytes


CASES = {"linear_attention": _linear_attention_case, "ssd": _ssd_case}


def run_bench(names: list[str] | None = None, B: int = 8, T: int = 4096, H: int = 16, D: int = 128,
              json_path: str | None = None) -> int:
    console = Console()
    if not torch.cuda.is_available():
        console.print("tilemix bench needs a CUDA GPU.")
        return 1
    gpu = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    table = Table(title=f"tilemix bench on {gpu} (copy {bandwidth / 1e12:.2f} TB/s)")
    for column in ("op", "shape", "ms", "peer", "peer ms", "speedup", "HBM roofline"):
        table.add_column(column)
    records = []
    for name in names or list(CASES):
        ours, peer, peer_name, nbytes = CASES[name](B, T, H, D, torch.bfloat16)
        ms = time_ms(ours)
        try:
            peer(), torch.cuda.synchronize()  # autotunes on the first call
            peer_ms = time_ms(peer)
        except ImportError:
            peer_ms = float("nan")
        roofline_ms = nbytes / bandwidth * 1e3
        records.append(dict(op=name, direction="fwd", target="sm_90a", shape=dict(B=B, T=T, H=H, D=D),
                            dtype="bf16", ms=ms, peer=peer_name, peer_ms=peer_ms, speedup=peer_ms / ms,
                            gbps=nbytes / ms / 1e6, roofline_fraction=roofline_ms / ms))
        table.add_row(name, f"B={B} T={T} H={H} D={D}", f"{ms:.3f}", peer_name, f"{peer_ms:.3f}",
                      f"{peer_ms / ms:.2f}x", f"{roofline_ms / ms:.0%}")
    console.print(table)
    if json_path:
        result = dict(gpu=gpu, date=datetime.date.today().isoformat(),
                      versions=dict(torch=torch.__version__, python=platform.python_version()),
                      command="tilemix bench", records=records)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0
