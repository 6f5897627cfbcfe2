"""Matrix multiply, blocked: the smallest program that exercises the grid."""

from __future__ import annotations

import torch

from tilemix.tiles import Const, Matrix, Out, blocks, chunks, kernel, zeros

from ._dispatch import run_kernel

__all__ = ["gemm", "gemm_fwd"]


@kernel
def gemm_fwd(a: Matrix["M", "K"], b: Matrix["K", "N"], c: Out[Matrix["M", "N"]],
             block_m: Const = 64, block_n: Const = 256, block_k: Const = 64):
    for j in blocks(block_n, dim="N"):
        for i in blocks(block_m, dim="M"):  # innermost: neighbouring M blocks share b's loads
            acc = zeros(block_m, block_n)
            for kk in chunks(block_k, dim="K"):
                acc = acc + a[i, kk] @ b[kk, j]
            c[i, j] = acc


def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [K, N] → [M, N]`` with fp32 accumulation, in a's dtype."""
    return run_kernel(gemm_fwd, dict(a=a, b=b))["c"]
