"""Example shapes for each program: what ``tilemix show`` traces (and what
CI compiles), without any data."""

from __future__ import annotations

from tilemix.codegen.schedule import call_consts
from tilemix.tiles import TensorSpec

from . import PROGRAMS

__all__ = ["example_specs", "example_inputs", "kernel_specs", "kernel_inputs"]


def example_specs(op: str, dtype: str = "bfloat16", B: int = 2, T: int = 4096, H: int = 16,
                  D: int = 128, sizes: dict[str, int] | None = None) -> dict:
    """Program arguments (``TensorSpec``s and scalars) for ``op`` at the
    benchmark shape: ``[B, T, H, D]`` sequences, ``D x D`` state, 4096² gemm; ``sizes`` resizes any
    named dim of the program (``tilemix show gemm --dim K=512``)."""
    if op not in PROGRAMS:
        raise ValueError(f"unknown op {op!r}")
    gemm = dict(M=4096, N=4096, K=4096) if op == "gemm" else {}
    args = kernel_specs(PROGRAMS[op], {**gemm, **(sizes or {})}, dtype, B=B, T=T, H=H, size=D)
    if op in ("attention", "linear_attention"):
        args["scale"] = args["q"].shape[-1] ** -0.5
    if op == "attention":
        args["is_causal"] = True
    return _declared(op, args)


def _declared(op: str, args: dict) -> dict:
    """``args`` with the Const values ``op``'s program declares for their shapes (attention's key
    chunk), as the op adds them: ``tilemix tune`` then tunes, and caches under, what the op runs."""
    return {**args, **call_consts(PROGRAMS[op], args)}


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
        return _declared(op, dict(q=q, k=k, v=v, scale=D ** -0.5, is_causal=True))
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
    ``[B, T, H, ...]``, group tensors ``[B, T, G, ...]``, each named dim ``sizes.get(name, size)`` (B, T,
    H and G too); matmul operands in ``dtype``, per-token and per-head vectors in float32; scalars 1.0
    and constants at their defaults (left to the binding, so a target's own defaults still apply).
    States start from zeros (omitted) unless a dim of theirs is sized by no other input: then a
    float32 state of that size is passed. A name in ``sizes`` the program does not have is a ValueError."""
    dims = {"B": B, "T": T, "H": H, "G": G, **(sizes or {})}
    inputs = {name: spec for name, spec in kernel.specs.items() if not spec.output}
    named = {d for spec in kernel.specs.values() for d in spec.layout if isinstance(d, str)}
    unknown = sorted(set(sizes or {}) - named)
    if unknown:
        raise ValueError(f"{kernel.name} has no dim {', '.join(unknown)}; its dims are {', '.join(sorted(named))}")
    sized = {d for spec in inputs.values() if spec.kind != "state" for d in spec.layout}
    # a sequence dim only outputs run along is sized by the call (tiles.params)
    args = {spec.length: dims.get(spec.length, size) for spec in kernel.specs.values()
            if spec.output and spec.kind in ("seq", "group_seq") and spec.length not in sized}
    for name, spec in inputs.items():
        if spec.kind == "const":
            if name not in kernel.defaults:
                raise ValueError(f"{kernel.name}: Const parameter {name!r} has no default to show the program with")
        elif spec.kind == "scalar":
            args[name] = 1.0
        elif spec.kind != "state" or any(isinstance(d, str) and d not in sized for d in spec.dims):
            shape = tuple(dims.get(d, size) if isinstance(d, str) else d for d in spec.layout)
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
