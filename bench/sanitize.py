"""Every generated kernel under compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

    python -m tilemix.bench.sanitize            # on a GPU machine with CUDA's compute-sanitizer

runs this module's ``--launch`` mode once per tool: it launches each op's kernels once on shapes
with masked tails (T not a multiple of the chunk, gemm dims off the tile grid), in both dtypes,
causal and not, with and without states, and the scans at one and two
consumers per CTA. Prints the kernels checked and the errors each tool
reported; exits non-zero on any error. Host-side API errors are not counted (cuda-bindings probes
the driver for optional entry points, which memcheck would report).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
SUMMARY = re.compile(r"(?:ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: (\d+) hazard)")


def launch_all() -> list[str]:
    """Launch every op's kernels once on tail shapes; the names of the kernels launched."""
    import torch

    from tilemix import ops
    from tilemix.codegen import launch

    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        def rnd(*shape, dtype=dtype):
            return torch.randn(*shape, device="cuda", generator=g).to(dtype)

        B, T, H, D = 2, 100, 3, 64
        q, k, v = rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, 128)
        ops.linear_attention(q, k, v, initial_state=torch.randn(B, H, D, 128, device="cuda"), output_final_state=True)
        ops.linear_attention(q, k, v)
        for causal in (True, False):
            ops.attention(q, k, v, causal=causal)
        dt = torch.rand(B, T, H, device="cuda") * 0.5
        A = -torch.rand(H, device="cuda") - 0.1
        ops.ssd(v, dt, A, rnd(B, T, 1, D), rnd(B, T, 1, D), D=torch.randn(H, device="cuda"),
                initial_state=torch.randn(B, H, D, 128, device="cuda"), output_final_state=True)
        ops.gemm(rnd(200, 72), rnd(72, 136))
        # enough batch x heads that the scans keep their two-consumer CTAs (few run one per CTA)
        B, H = 4, 32
        v = rnd(B, T, H, 128)
        state = torch.randn(B, H, D, 128, device="cuda")
        ops.linear_attention(rnd(B, T, H, D), rnd(B, T, H, D), v, initial_state=state, output_final_state=True)
        ops.ssd(v, torch.rand(B, T, H, device="cuda") * 0.5, -torch.rand(H, device="cuda") - 0.1,
                rnd(B, T, 1, D), rnd(B, T, 1, D), output_final_state=True)
    torch.cuda.synchronize()
    # one kernel per specialisation (dtype, consts, optional arguments, schedule): tell them apart by source
    return sorted({f"{plan.source.name} {hashlib.sha256(plan.source.source.encode()).hexdigest()[:8]}"
                   for plan in launch._PLANS.values()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", action="store_true", help="only launch the kernels (what each tool runs)")
    args = parser.parse_args(argv)
    if args.launch:
        for name in launch_all():
            print("kernel:", name)
        return 0
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    sanitizer = shutil.which("compute-sanitizer") or shutil.which(os.path.join(home, "bin", "compute-sanitizer"))
    if not sanitizer:
        print("compute-sanitizer not found (CUDA toolkit's bin/ on PATH?)", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    table = Table(title="compute-sanitizer on every generated kernel")
    for column in ("tool", "kernels", "errors"):
        table.add_column(column)
    failed = False
    for tool in TOOLS:
        command = [sanitizer, "--tool", tool, "--report-api-errors", "no", sys.executable, "-m",
                   "tilemix.bench.sanitize", "--launch"]
        run = subprocess.run(command, capture_output=True, text=True)
        kernels = [line for line in run.stdout.splitlines() if line.startswith("kernel:")]
        found = [int(a or b) for a, b in SUMMARY.findall(run.stdout + run.stderr)]
        errors = sum(found) if found else None
        failed |= run.returncode != 0 or errors != 0
        table.add_row(tool, str(len(kernels)), "no summary (see below)" if errors is None else str(errors))
        if run.returncode != 0 or errors:
            print(run.stdout[-4000:], run.stderr[-4000:], sep="\n")
    Console().print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
