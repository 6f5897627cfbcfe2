"""``tilemix bench``: each op beside its peer, in one process, on the GPU.

Timings are the median of CUDA-event measurements after warm-up, on random
inputs, with peers measured in the same run. The memory ceiling (a large
device-to-device copy) and the tensor-core ceiling (an 8192³ cuBLAS gemm) are
measured too; each row reports its fraction of the roofline, the larger of
bytes / bandwidth and flops / rate.
"""

from __future__ import annotations

import datetime
import functools
import json
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tilemix import ops
from tilemix.ops.examples import kernel_inputs
from tilemix.ops.timing import host_us, kernel_ms, time_ms

from .attention_decode import ATTENTION_DECODE_CASES, ATTENTION_DECODE_SHAPES
from .bidirectional import BIDIRECTIONAL_CASES
from .calls import backward_of, leaves
from .decode import DECODE_CASES, DECODE_SHAPES
from .inputs import as_simple_gla as _as_simple_gla
from .inputs import ssd_inputs as _ssd_inputs
from .lolcats import LOLCATS_CASES, LOLCATS_DERIVED_BACKWARD, LOLCATS_SHAPE
from .long_conv import LONG_CONV_CASES, LONG_CONV_SHAPES
from .mixers import DERIVED_BACKWARD, MIXER_CASES, mamba_chunk_scan_combined
from .mlstm import MLSTM_CASES, MLSTM_DERIVED_BACKWARD
from .model import MODEL_CASES, MODEL_SHAPES, MODEL_TIMING
from .plots import plot_results
from .report import number_cell, results_markdown, shape_text
from .selective_scan import DERIVED_BACKWARD as SCAN_DERIVED_BACKWARD
from .selective_scan import SELECTIVE_SCAN_CASES
from .varlen import VARLEN_CASES, VARLEN_SHAPE
from .windows import WINDOW_CASES, WINDOW_SHAPE

__all__ = ["run_bench", "default_json_path"]


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def matmul_rate(n: int = 8192) -> float:
    """Flop/s of a large bf16 cuBLAS gemm: the tensor-core ceiling of this run."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / (time_ms(lambda: a @ a) * 1e-3)


def _linear_attention_case(B, T, H, D, dtype):
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype) for _ in range(3))
    nbytes = 4 * q.numel() * q.element_size()  # read q, k, v; write o

    def ours():
        return ops.linear_attention(q, k, v)

    def peer():
        from fla.ops.linear_attn import chunk_linear_attn

        return chunk_linear_attn(q, k, v, normalize=False)

    flops = 4 * B * T * H * D * (64 + D)  # intra-chunk scores and mix, inter-chunk output and state
    return ours, peer, "fla-chunk_linear_attn", nbytes, flops, dict(B=B, T=T, H=H, K=D, V=D)


def _ssd_case(B, T, H, D, dtype, peer="fla"):
    """``peer``: "fla" (``chunk_simple_gla`` on the same recurrence) or "mamba" (Mamba-2's own kernel)."""
    x, dt, A, Bm, Cm = _ssd_inputs(B, T, H, D, dtype)
    nbytes = 2 * x.numel() * x.element_size() + 2 * Bm.numel() * Bm.element_size() + dt.numel() * 4

    def ours():
        return ops.ssd(x, dt, A, Bm, Cm)

    q, k, v, g = _as_simple_gla(x, dt, A, Bm, Cm)

    def fla():
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla(q, k, v, g=g, scale=1.0)

    def mamba():
        return mamba_chunk_scan_combined()(x, dt, A, Bm, Cm, chunk_size=64)

    flops = 4 * B * T * H * D * (64 + D)
    return ours, fla if peer == "fla" else mamba, SSD_PEERS[peer], nbytes, flops, dict(B=B, T=T, H=H, N=D, P=D, G=1)


SSD_PEERS = {"fla": "fla-chunk_simple_gla", "mamba": "mamba_ssm-mamba_chunk_scan_combined"}


SDPA_PEERS = {"CUDNN_ATTENTION": "sdpa-cudnn", "FLASH_ATTENTION": "sdpa-flash2"}  # peer names per SDPA backend


def _attention_case(B, T, H, D, dtype, causal=True, backend="CUDNN_ATTENTION", kv_group=1):
    """``kv_group`` > 1: grouped-query attention, k and v with ``H // kv_group`` heads."""
    q = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, T, H // kv_group, D, device="cuda", dtype=dtype) for _ in range(2))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read q, k, v; write o
    flops = 4 * B * H * T * T * D / (2 if causal else 1)

    def ours():
        return ops.attention(q, k, v, causal=causal)

    def peer():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                                    enable_gqa=kv_group > 1)

    name = SDPA_PEERS[backend]
    return ours, peer, name, nbytes, flops, _attention_shape(B, T, H, D, causal, kv_group)


def _attention_shape(B, T, H, D, causal, kv_group) -> dict:
    """A row's shape; grouped-query rows also carry ``H_kv`` and ``gqa: True``."""
    grouped = dict(H_kv=H // kv_group, gqa=True) if kv_group > 1 else {}
    return dict(B=B, T=T, H=H, **grouped, D=D, causal=causal)


def _gemm_case(B, T, H, D, dtype, n=4096):
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    return (lambda: ops.gemm(a, b)), (lambda: torch.matmul(a, b)), "cublas", 3 * a.numel() * 2, 2 * n ** 3, \
        dict(M=n, N=n, K=n)


# -- backward rows: after one forward (graph retained), the time of torch.autograd.grad(out, inputs, dout) --
def _linear_attention_bwd_case(B, T, H, D, dtype, device="cuda", backward="hand-written"):
    q, k, v = leaves(*(torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3)))
    do = torch.randn(B, T, H, D, device=device, dtype=dtype)
    nbytes = 7 * q.numel() * q.element_size()  # read q, k, v, do; write dq, dk, dv
    ours = backward_of(lambda: ops.linear_attention(q, k, v, backward=backward)[0], (q, k, v), do)

    def forward():
        from fla.ops.linear_attn import chunk_linear_attn

        return chunk_linear_attn(q, k, v, normalize=False)[0]

    # per 64-token chunk: dq 2 C²D + 2 CD² (as the forward), dk/dv 8 C²D + 6 CD² (C = 64, recompute included)
    flops = 2 * B * T * H * D * (6 * 64 + 5 * D)
    return ours, backward_of(forward, (q, k, v), do), "fla-chunk_linear_attn", nbytes, flops, \
        dict(B=B, T=T, H=H, K=D, V=D)


def _ssd_bwd_case(B, T, H, D, dtype, device="cuda", backward="hand-written", peer="fla"):
    x, dt, A, Bm, Cm = _ssd_inputs(B, T, H, D, dtype, device)
    dy = torch.randn(B, T, H, D, device=device, dtype=dtype)
    # read x, dy, B, C, dt; write dx, dB, dC, ddt
    nbytes = 3 * x.numel() * x.element_size() + 4 * Bm.numel() * Bm.element_size() + 2 * dt.numel() * 4
    inputs = leaves(x, dt, A, Bm, Cm)
    ours = backward_of(lambda: ops.ssd(*inputs, backward=backward)[0], inputs, dy)
    if peer == "mamba":  # Mamba-2's own kernel on the same inputs (dt positive, no dt_bias / softplus)
        theirs = backward_of(lambda: mamba_chunk_scan_combined()(*inputs, chunk_size=64), inputs, dy)
    else:
        gla_inputs = leaves(*_as_simple_gla(x, dt, A, Bm, Cm))  # fla's simple GLA on the same recurrence

        def forward():
            from fla.ops.simple_gla import chunk_simple_gla

            return chunk_simple_gla(*gla_inputs[:3], g=gla_inputs[3], scale=1.0)[0]
        theirs = backward_of(forward, gla_inputs, dy)
    flops = 2 * B * T * H * D * (6 * 64 + 5 * D)  # as linear attention's, plus the decay terms
    return ours, theirs, SSD_PEERS[peer], nbytes, flops, dict(B=B, T=T, H=H, N=D, P=D, G=1)


def _attention_bwd_case(B, T, H, D, dtype, causal=True, backend="CUDNN_ATTENTION", device="cuda", kv_group=1):
    q, do = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(B, T, H // kv_group, D, device=device, dtype=dtype) for _ in range(2))
    q, k, v = leaves(q, k, v)
    nbytes = 4 * (q.numel() + k.numel()) * q.element_size()  # read q, k, v, o, do; write dq, dk, dv
    flops = 2.5 * 4 * B * H * T * T * D / (2 if causal else 1)  # 5 matmuls (scores recomputed) vs the forward's 2
    ours = backward_of(lambda: ops.attention(q, k, v, causal=causal), (q, k, v), do)

    def forward():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):  # the forward picks the backend, and so its backward
            out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                                   is_causal=causal, enable_gqa=kv_group > 1)
        return out.transpose(1, 2)

    name = SDPA_PEERS[backend]
    return ours, backward_of(forward, (q, k, v), do), name, nbytes, flops, _attention_shape(B, T, H, D, causal,
                                                                                            kv_group)


def _gemm_bwd_case(B, T, H, D, dtype, n=4096, device="cuda"):
    a, b = leaves(*(torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)))
    dc = torch.randn(n, n, device=device, dtype=dtype)
    return (backward_of(lambda: ops.gemm(a, b), (a, b), dc), backward_of(lambda: torch.matmul(a, b), (a, b), dc),
            "cublas", 5 * a.numel() * a.element_size(), 4 * n ** 3, dict(M=n, N=n, K=n))


def program_case(kernel):
    """The bench case of any ``@kernel`` (``tilemix bench module:kernel``): the program alone (no
    peer) through ``ops.run`` on random inputs (``kernel_inputs``, each named dim D); its bytes
    are its inputs and outputs, its flops unknown (0: the roofline is the memory one)."""

    def case(B, T, H, D, dtype, device="cuda"):
        inputs = kernel_inputs(kernel, device=device, dtype=str(dtype).removeprefix("torch."), B=B, T=T, H=H, size=D)

        def ours():
            return ops.run(kernel, **inputs)

        tensors = [*(t for t in inputs.values() if isinstance(t, torch.Tensor)), *ours().values()]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return ours, None, "-", nbytes, 0, dict(B=B, T=T, H=H, D=D)

    return case


CASES = {"linear_attention": _linear_attention_case, "ssd": _ssd_case, "attention": _attention_case,
         "attention-noncausal": functools.partial(_attention_case, causal=False),
         "attention-flash2": functools.partial(_attention_case, backend="FLASH_ATTENTION"),
         "attention-noncausal-flash2": functools.partial(_attention_case, causal=False, backend="FLASH_ATTENTION"),
         "gemm": _gemm_case,
         "gemm-8192": functools.partial(_gemm_case, n=8192),
         # backward rows (direction "bwd"): peers' backward after their own forward
         "linear_attention-bwd": _linear_attention_bwd_case, "ssd-bwd": _ssd_bwd_case,
         "attention-bwd": _attention_bwd_case,
         "attention-bwd-flash2": functools.partial(_attention_bwd_case, backend="FLASH_ATTENTION"),
         # grouped-query rows (issue 24's bar: H = 32, H_kv = 8)
         "attention-gqa": functools.partial(_attention_case, kv_group=4),
         "attention-gqa-bwd": functools.partial(_attention_bwd_case, kv_group=4),
         "gemm-bwd": _gemm_bwd_case,
         # Mamba-2's own kernel as the SSD peer, and the backward derived from the forward program
         "ssd-mamba": functools.partial(_ssd_case, peer="mamba"),
         "ssd-bwd-mamba": functools.partial(_ssd_bwd_case, peer="mamba"),
         "ssd-bwd-derived": functools.partial(_ssd_bwd_case, backward="derived", peer="mamba"),
         "linear_attention-bwd-derived": functools.partial(_linear_attention_bwd_case, backward="derived"),
         **MIXER_CASES, **BIDIRECTIONAL_CASES, **SELECTIVE_SCAN_CASES, **WINDOW_CASES, **MLSTM_CASES,
         **LONG_CONV_CASES, **DECODE_CASES, **LOLCATS_CASES, **VARLEN_CASES, **MODEL_CASES,
         **ATTENTION_DECODE_CASES}


def direction(name: str) -> str:
    """"bwd" for a backward row (a case named <op>-bwd[-...]), "decode" for a decode step's
    (<op>-step[-...]), a whole model's "generate" or "train", else "fwd"."""
    parts = name.split("-")
    for word in ("generate", "train"):
        if word in parts:
            return word
    return "bwd" if "bwd" in parts else "decode" if "step" in parts else "fwd"


SHAPE = (8, 4096, 16, 128)  # B, T, H, D of the Hopper issue's bars
ATTENTION_SHAPE = (4, 4096, 16, 128)
SWEEP_OPS = ("linear_attention", "ssd", "attention")
SWEEP_T = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
SWEEP_D = (64, 128, 256)  # the head dims every op lowers (attention backward: sm_90a only at 256)


def sweep_rows(lengths=SWEEP_T, head_dims=SWEEP_D, names=SWEEP_OPS) -> list[tuple[str, int, int, int, int]]:
    """(case, B, T, H, D) over sequence lengths with batch x heads x length held at 8·16·4096 (H = 16
    while B >= 1, then fewer heads), for each head dim; ``names``: the cases (default: the forward
    scans and attention; backward cases such as ``ssd-bwd`` sweep the same way)."""
    tokens = SHAPE[0] * SHAPE[1] * SHAPE[2]
    rows = []
    for D in head_dims:  # a run cut short has every op at the first head dims
        for name in names:
            for T in lengths:
                H = min(16, tokens // T)
                rows.append((name, max(1, tokens // (T * H)), T, H, D))
    return rows


KERNELS_SHOWN = 8  # --kernels: the longest kernels printed under a row (its record keeps all)
GRID_OPS = ("linear_attention", "ssd", "ssd-mamba")  # issue 25's grid: the scans beside fla and mamba_ssm
GRID_BH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GRID_T = (1024, 4096, 16384, 32768, 65536, 131072)
GRID_D = (64, 128)
GRID_MAX_ELEMENTS = 1 << 30  # per [B, T, H, D] tensor (2 GiB in bf16): larger grid points are skipped


def grid_rows(names=GRID_OPS, head_dims=GRID_D) -> list[tuple[str, int, int, int, int]]:
    """(case, B, T, H, D) over batch x heads in GRID_BH (H = min(16, B·H)) and lengths in GRID_T, for
    each head dim, as memory allows: the shapes a fixed-tokens sweep never visits (few heads, long
    sequences), where a schedule's cliffs hide."""
    rows = []
    for D in head_dims:
        for name in names:
            for BH in GRID_BH:
                H = min(16, BH)
                rows += [(name, BH // H, T, H, D) for T in GRID_T if BH * T * D <= GRID_MAX_ELEMENTS]
    return rows


GQA_SHAPE = (4, 4096, 32, 128)
RWKV_SHAPE = (8, 4096, 32, 64)  # issue 28's RWKV bars: 32 heads of 64
MLSTM_WIDE_SHAPE = (8, 4096, 8, 256)  # issue 28's second mLSTM bar: 8 heads of 256
BASED_SHAPE = (8, 4096, 16, 64)  # issue 29's bar: values 64 (q and k: Based's 16 features)


def default_rows(names: list[str] | None) -> list[tuple[str, int, int, int, int]]:
    def shape(name):
        if name in DECODE_SHAPES:
            return DECODE_SHAPES[name]
        if name in ATTENTION_DECODE_SHAPES:
            return ATTENTION_DECODE_SHAPES[name]
        if name in MODEL_SHAPES:
            return MODEL_SHAPES[name]
        if "gqa" in name.split("-"):
            return GQA_SHAPE
        if name.startswith("rwkv"):
            return RWKV_SHAPE
        if name in WINDOW_CASES:
            return WINDOW_SHAPE
        if name.startswith("mlstm") and "d256" in name.split("-"):
            return MLSTM_WIDE_SHAPE
        if name.startswith("based"):
            return BASED_SHAPE
        if name in LONG_CONV_SHAPES:
            return LONG_CONV_SHAPES[name]
        if name in LOLCATS_CASES:
            return LOLCATS_SHAPE
        if "varlen" in name.split("-"):
            return VARLEN_SHAPE
        return ATTENTION_SHAPE if name.startswith("attention") else SHAPE

    return [(name, *shape(name)) for name in names or list(CASES)]


def run_bench(names: list[str] | None = None, json_path: str | None = None, sweep: bool = False,
              plot_dir: str | None = None, head_dims: tuple[int, ...] = (), md_path: str | None = None,
              target: str | None = None, peers: bool = True, programs: dict | None = None,
              grid: bool = False, kernels: bool = False) -> int:
    """``target``: the backend our ops run on ("hopper", "generic": the mma.sync kernels, also on an
    H100; None: automatic / $TILEMIX_TARGET). Records carry it: "sm_90a" or "generic", and the arch.
    ``peers=False`` times our ops only (peer_ms NaN). ``programs``: name -> ``@kernel`` of programs
    to time beside the ops (``module:kernel``, a user's own; no peer). ``grid``: ``grid_rows`` (records
    carry ``grid: True``). ``kernels``: also each row's kernels and their ms per call (``kernel_ms``),
    printed under the row and kept in its record."""
    from tilemix.ops.runtime import call_with_target, select_arch

    console = Console(width=max(Console().width, 150))  # the 140-wide table uncropped when piped
    if not torch.cuda.is_available():
        console.print("tilemix bench needs a CUDA GPU.")
        return 1
    gpu = torch.cuda.get_device_name()
    arch = select_arch(torch.cuda.get_device_capability(), target)
    label = "sm_90a" if arch == "sm_90a" else "generic"
    bandwidth = copy_bandwidth()
    table = Table(title=f"tilemix bench on {gpu}, {label} kernels ({arch}) (copy {bandwidth / 1e12:.2f} TB/s)",
                  width=140)
    for column in ("op", "shape", "ms", "host µs", "peer", "peer ms", "speedup", "TFLOP/s", "roofline"):
        table.add_column(column)
    records = []
    mma_rate = matmul_rate()
    result = dict(gpu=gpu, date=datetime.date.today().isoformat(), copy_tbps=bandwidth / 1e12,
                  mma_tflops=mma_rate / 1e12, versions=_versions(), command=" ".join(["tilemix", *sys.argv[1:]]),
                  target=label, records=records)
    json_file = (default_json_path(result) if json_path == "auto" else Path(json_path)) if json_path else None
    if grid:
        rows = grid_rows(names=names or GRID_OPS, head_dims=head_dims or GRID_D)
    elif sweep:
        rows = sweep_rows(head_dims=head_dims or SWEEP_D, names=names or SWEEP_OPS)
    else:
        rows = default_rows(names)
    for name, B, T, H, D in rows:
        program = (programs or {}).get(name)
        case = CASES[name] if program is None else program_case(program)
        ours, peer, peer_name, nbytes, flops, shape = case(B, T, H, D, torch.bfloat16)
        if target is not None:
            ours = functools.partial(call_with_target, target, ours)
        op = name.split("-")[0] if program is None else program.name
        started = time.perf_counter()
        try:
            timing = MODEL_TIMING.get(name, {})
            ms, host = time_ms(ours, **timing), host_us(ours, calls=timing.get("reps", 50))
        except Exception as e:  # an op the code generator does not lower yet
            console.print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        peer_ms, ours_s = float("nan"), time.perf_counter() - started
        try:
            if peers and peer is not None:
                peer(), torch.cuda.synchronize()  # autotunes on the first call
                peer_ms = time_ms(peer, **timing)
        except ImportError:  # fla not installed
            pass
        except Exception as e:  # a peer that refuses this shape, its backward or this Triton (fla #640)
            console.print(f"{name} peer {peer_name}: {type(e).__name__}: {str(e).splitlines()[0]}")
        roofline_ms = max(nbytes / bandwidth, flops / mma_rate) * 1e3
        launched = kernel_ms(ours) if kernels else []
        records.append(dict(op=op, direction=direction(name), target=label, arch=arch, shape=shape, dtype="bf16", ms=ms,
                            peer=peer_name, peer_ms=peer_ms, speedup=peer_ms / ms, tflops=flops / ms / 1e9,
                            gbps=nbytes / ms / 1e6, roofline_fraction=roofline_ms / ms, host_us=host,
                            **_backward_field(name), **({"grid": True} if grid else {}),
                            **({"varlen": True} if "varlen" in name.split("-") else {}),
                            **({"kernels": [[n, round(t, 4)] for n, t in launched]} if kernels else {})))
        cells = (name, shape_text(shape), f"{ms:.3f}", f"{host:.0f}", peer_name,
                 number_cell(peer_ms, ".3f"), number_cell(peer_ms / ms, ".2f", "x"), f"{flops / ms / 1e9:.0f}",
                 f"{roofline_ms / ms:.0%}")
        table.add_row(*cells)
        console.print(" | ".join(cells), highlight=False)  # as measured: a run cut short still says something
        for kernel_name, kernel_time in launched[:KERNELS_SHOWN]:
            console.print(f"    {kernel_time:8.3f} ms  {kernel_name[:110]}", highlight=False, markup=False)
        # first calls compile (ours) and autotune (peers): where a device call's minutes go
        console.print(f"  {name}: ours {ours_s:.0f} s, peer {time.perf_counter() - started - ours_s:.0f} s",
                      highlight=False)
        if json_file:  # rewritten after every row: a run cut short leaves its records
            json_file.parent.mkdir(parents=True, exist_ok=True)
            json_file.write_text(json.dumps(result, indent=2))
    console.print(table)
    if json_file:
        console.print(f"wrote {json_file}")
    if md_path:
        Path(md_path).write_text(results_markdown(result))
        console.print(f"wrote {md_path}")
    if plot_dir:
        try:
            for path in plot_results(result, plot_dir):
                console.print(f"wrote {path}")
        except RuntimeError as e:  # no matplotlib here: the JSON is written, plot it elsewhere
            console.print(f"no plots: {e}; later: tilemix plot <json> {plot_dir}")
            return 1
    return 0


def _backward_field(name: str) -> dict:
    """A backward row's ``backward``: "derived" (from the forward program) or "hand-written"."""
    if direction(name) != "bwd":
        return {}
    derived = DERIVED_BACKWARD | SCAN_DERIVED_BACKWARD | MLSTM_DERIVED_BACKWARD | LOLCATS_DERIVED_BACKWARD
    return dict(backward="derived" if name in derived else "hand-written")


def default_json_path(result: dict) -> Path:
    """bench/results/<gpu>-<date>.json, the GPU as its model ("NVIDIA H100 80GB HBM3" -> h100);
    <gpu>-<date>-generic.json for a run of the generic kernels."""
    words = [w for w in result["gpu"].lower().replace("nvidia", "").split() if w]
    suffix = "-generic" if result.get("target") == "generic" else ""
    return Path(__file__).resolve().parent / "results" / f"{words[0] if words else 'gpu'}-{result['date']}{suffix}.json"


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = dict(torch=torch.__version__, cuda=str(torch.version.cuda), python=platform.python_version())
    for package in ("tilemix", "triton", "flash-linear-attention", "cupy-cuda13x"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found
