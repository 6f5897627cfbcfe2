"""Example shapes for each program: what ``tilemix show`` traces (and what
CI compiles), without any data."""

from __future__ import annotations

from tilemix.tiles import TensorSpec

from .attention import key_chunk

__all__ = ["example_specs", "example_inputs", "kernel_specs", "kernel_inputs"]


def example_specs(op: str, dtype: str = "bfloat16", B: int = 2, T: int = 4096, H: int = 16,
                  D: int = 128) -> dict:
    """Program arguments (``TensorSpec``s and scalars) for ``op`` at the
    benchmark shape: ``[B, T, H, D]`` sequences, ``D x D`` state."""
    seq = TensorSpec((B, T, H, D), dtype)
    if op == "gemm":
        return dict(a=TensorSpec((4096, 4096), dtype), b=TensorSpec((4096, 4096), dtype))
    if op == "attention":
        return dict(q=seq, k=seq, v=seq, scale=D ** -0.5, is_causal=True, **key_chunk(seq, seq))
    if op == "linear_attention":
        return dict(q=seq, k=seq, v=seq, scale=D ** -0.5)
    if op == "ssd":
        return dict(x=seq, dt=TensorSpec((B, T, H), "float32"), A=TensorSpec((H,), "float32"),
                    B=TensorSpec((B, T, 1, D), dtype), C=TensorSpec((B, T, 1, D), dtype),
                    D=TensorSpec((H,), "float32"))
    raise ValueError(f"unknown op {op!r}")


def example_inputs(op: str, device: str = "cuda", dtype: str = "bfloat16", B: int = 8, T: int = 4096,
                   H: int = 16, D: int = 128, seed: int = 0) -> dict:
    """Random program arguments for ``op`` at the benchmark shape, with values in their valid ranges
    (positive dt, negative A), for tuning and timing."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    dt16 = getattr(torch, dtype)

    def randn(*shape, dtype=dt16):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    if op == "gemm":
        return dict(a=randn(4096, 4096), b=randn(4096, 4096))
    if op == "attention":
        q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
        return dict(q=q, k=k, v=v, scale=D ** -0.5, is_causal=True, **key_chunk(q, v))
    if op == "linear_attention":
        return dict(q=randn(B, T, H, D), k=randn(B, T, H, D), v=randn(B, T, H, D), scale=D ** -0.5)
    if op == "ssd":
        dt = torch.rand(B, T, H, device=device, generator=g) * 0.5 + 0.01
        A = -(torch.rand(H, device=device, generator=g) + 0.1)
        return dict(x=randn(B, T, H, D), dt=dt, A=A, B=randn(B, T, 1, D), C=randn(B, T, 1, D),
                    D=randn(H, dtype=torch.float32))
    raise ValueError(f"unknown op {op!r}")


def kernel_specs(kernel, sizes: dict[str, int] | None = None, dtype: str = "bfloat16", B: int = 2, T: int = 4096,
                 H: int = 16, G: int = 1, size: int = 128) -> dict:
    """Program arguments for any ``@kernel`` (a user's mixer, for ``tilemix show``): sequences
    ``[B, T, H, ...]``, group tensors ``[B, T, G, ...]``, each named dim ``sizes.get(name, size)``;
    matmul operands in ``dtype``, per-token and per-head vectors in float32; scalars 1.0 and
    constants at their defaults; states omitted (they start from zeros)."""
    sizes = sizes or {}
    dim = lambda d: () if d == 1 else (sizes.get(d, size),)  # noqa: E731
    args = {}
    for name, spec in kernel.specs.items():
        if spec.output or spec.kind == "state":
            continue
        if spec.kind == "const":
            if name not in kernel.defaults:
                raise ValueError(f"{kernel.name}: Const parameter {name!r} has no default to show the program with")
            args[name] = kernel.defaults[name]
        elif spec.kind == "scalar":
            args[name] = 1.0
        elif spec.kind == "matrix":
            args[name] = TensorSpec(tuple(sizes.get(d, size) for d in spec.dims), dtype)
        else:
            lead = {"seq": (B, T, H), "group_seq": (B, T, G), "head": (H,)}[spec.kind]
            shape = lead + dim(spec.dims[0])
            args[name] = TensorSpec(shape, dtype if spec.is_tile_operand else "float32")
    return args


def kernel_inputs(kernel, sizes: dict[str, int] | None = None, device: str = "cuda", dtype: str = "bfloat16",
                  B: int = 8, T: int = 4096, H: int = 16, size: int = 128, seed: int = 0) -> dict:
    """Random arguments for any ``@kernel`` (a user's mixer, for ``tilemix tune module:kernel``),
    shaped as ``kernel_specs`` says: small values (standard normal x 0.1), so that decays and
    exponentials of a program the tuner knows nothing about stay finite."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    args = kernel_specs(kernel, sizes, dtype, B=B, T=T, H=H, size=size)
    return {name: 0.1 * torch.randn(spec.shape, device=device, generator=g).to(getattr(torch, spec.dtype))
            if isinstance(spec, TensorSpec) else spec for name, spec in args.items()}
