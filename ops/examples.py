"""Example shapes for each program: what ``tilemix show`` traces (and what
CI compiles), without any data."""

from __future__ import annotations

from tilemix.tiles import TensorSpec

__all__ = ["example_specs"]


def example_specs(op: str, dtype: str = "bfloat16", B: int = 2, T: int = 4096, H: int = 16,
                  D: int = 128) -> dict:
    """Program arguments (``TensorSpec``s and scalars) for ``op`` at the
    benchmark shape: ``[B, T, H, D]`` sequences, ``D x D`` state."""
    seq = TensorSpec((B, T, H, D), dtype)
    if op == "gemm":
        return dict(a=TensorSpec((4096, 4096), dtype), b=TensorSpec((4096, 4096), dtype))
    if op == "attention":
        return dict(q=seq, k=seq, v=seq, scale=D ** -0.5, is_causal=True)
    if op == "linear_attention":
        return dict(q=seq, k=seq, v=seq, scale=D ** -0.5)
    if op == "ssd":
        return dict(x=seq, dt=TensorSpec((B, T, H), "float32"), A=TensorSpec((H,), "float32"),
                    B=TensorSpec((B, T, 1, D), dtype), C=TensorSpec((B, T, 1, D), dtype),
                    D=TensorSpec((H,), "float32"))
    raise ValueError(f"unknown op {op!r}")
