"""Matrix multiply, blocked: the smallest program that exercises the grid."""

from __future__ import annotations

import torch

from tilemix.tiles import Const, Matrix, Out, blocks, chunks, kernel, zeros

from ._dispatch import check_call
from ._library import tile_op

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


gemm_op = tile_op("gemm", "(Tensor a, Tensor b) -> Tensor", gemm_fwd,
                  lambda a, b: (dict(a=a, b=b), {}, None), lambda out: out["c"])


def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [K, N] → [M, N]`` with fp32 accumulation, in a's dtype
    (``torch.ops.tilemix.gemm``)."""
    check_call("gemm", a=a, b=b)
    return gemm_op(a, b)
