"""Matrix multiply, blocked: the smallest program that exercises the grid. Its gradients are two
more tile programs, with one operand transposed (``a @ bᵀ`` and ``aᵀ @ b``)."""

from __future__ import annotations

import torch

from tilemix.tiles import Const, Matrix, Out, blocks, chunks, kernel, zeros

from ._library import tile_op
from .fastpath import fast_path
from .runtime import call_with_target, check_call, current_target, use_target

__all__ = ["gemm", "gemm_fwd", "gemm_nt", "gemm_tn"]


# mma.sync (generic target): a warp holds 16 rows of each 64-row block across all of a tile's
# columns, so square 128x128 blocks reuse fragments better than 64x256 (bench/history/NOTES-2026-11.md, "Generic
# target"); measured on sm_90 only.
@kernel(target_consts={"sm_90": dict(block_m=128, block_n=128)})
def gemm_fwd(a: Matrix["M", "K"], b: Matrix["K", "N"], c: Out[Matrix["M", "N"]],
             block_m: Const = 64, block_n: Const = 256, block_k: Const = 64):
    for j in blocks(block_n, dim="N"):
        for i in blocks(block_m, dim="M"):  # innermost: neighbouring M blocks share b's loads
            acc = zeros(block_m, block_n)
            for kk in chunks(block_k, dim="K"):
                acc = acc + a[i, kk] @ b[kk, j]
            c[i, j] = acc


@kernel
def gemm_nt(a: Matrix["M", "K"], b: Matrix["N", "K"], c: Out[Matrix["M", "N"]],
            block_m: Const = 64, block_n: Const = 256, block_k: Const = 64):
    """``a @ bᵀ`` (the gradient of gemm's a: ``dc @ bᵀ``)."""
    for j in blocks(block_n, dim="N"):
        for i in blocks(block_m, dim="M"):
            acc = zeros(block_m, block_n)
            for kk in chunks(block_k, dim="K"):
                acc = acc + a[i, kk] @ b[j, kk].T
            c[i, j] = acc


@kernel
def gemm_tn(a: Matrix["K", "M"], b: Matrix["K", "N"], c: Out[Matrix["M", "N"]],
            block_m: Const = 64, block_n: Const = 256, block_k: Const = 64):
    """``aᵀ @ b`` (the gradient of gemm's b: ``aᵀ @ dc``)."""
    for j in blocks(block_n, dim="N"):
        for i in blocks(block_m, dim="M"):
            acc = zeros(block_m, block_n)
            for kk in chunks(block_k, dim="K"):
                acc = acc + a[kk, i].T @ b[kk, j]
            c[i, j] = acc


gemm_op = tile_op("gemm", "(Tensor a, Tensor b) -> Tensor", gemm_fwd,
                  lambda a, b: (dict(a=a, b=b), {}, None), lambda out: out["c"])

# the backward programs as custom ops too, so a compiled training step (AOT autograd traces the
# backward with fake tensors) sees them as ops, not as Python that runs a kernel
gemm_nt_op = tile_op("gemm_nt", "(Tensor a, Tensor b) -> Tensor", gemm_nt,
                     lambda a, b: (dict(a=a, b=b), {}, None), lambda out: out["c"])
gemm_tn_op = tile_op("gemm_tn", "(Tensor a, Tensor b) -> Tensor", gemm_tn,
                     lambda a, b: (dict(a=a, b=b), {}, None), lambda out: out["c"])


def _gemm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.target = current_target()  # the backward programs run on the forward's target


def _gemm_backward(ctx, dc):
    a, b = ctx.saved_tensors
    dc = dc.contiguous()
    with use_target(ctx.target):
        da = gemm_nt_op(dc, b) if ctx.needs_input_grad[0] else None
        db = gemm_tn_op(a, dc) if ctx.needs_input_grad[1] else None
    return da, db


gemm_op.register_autograd(_gemm_backward, setup_context=_gemm_setup)


@fast_path
def gemm(a: torch.Tensor, b: torch.Tensor, *, target: str | None = None) -> torch.Tensor:
    """``a [M, K] @ b [K, N] → [M, N]`` with fp32 accumulation, in a's dtype
    (``torch.ops.tilemix.gemm``; differentiable: the backward runs ``gemm_nt`` and ``gemm_tn``).
    ``target``: "auto" (default: $TILEMIX_TARGET, else by the GPU), "hopper" or "generic" (the mma.sync
    kernels, also on an H100)."""
    check_call("gemm", differentiable=True, target=target, a=a, b=b)
    return call_with_target(target, gemm_op, a, b)
