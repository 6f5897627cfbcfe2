"""The verifier: whole-program checks on a traced program, for one target.

Op-level typing already ran while tracing; it runs again here so an IR
built or rewritten by other means is held to the same rules. Each error
names the user's line.
"""

from __future__ import annotations

from .errors import TileError
from .ir import Loop, Op, Program
from .rules import ShapeError, infer
from .targets import Target, get_target
from .types import DType

__all__ = ["verify"]

def _describe(op: Op) -> str:
    if op.name == "load":
        return f"the tile loaded from {op.attrs['param']}"
    return f"the result of {op.name}"


def _check_types(op: Op) -> None:
    try:
        expected = infer(op.name, tuple(v.type for v in op.operands), op.attrs)
    except ShapeError as e:
        raise TileError(str(e), op.loc) from None
    if expected is not None and expected != op.result.type:
        raise TileError(f"{op.name} is typed {op.result.type} but its operands give {expected}", op.loc)


def _check_dims(op: Op, target: Target) -> None:
    """Tensor-core targets build tiles from fragments; the interpreter takes any size."""
    t = op.result.type
    if t.dtype is DType.index or target.fragment is None:
        return
    for d in t.shape:
        if d != 1 and d % target.fragment:
            raise TileError(f"{_describe(op)} is {t.rows}x{t.cols}: dimension {d} is not a multiple of "
                            f"{target.fragment} (tensor-core tiles on {target.name} are built from "
                            f"{target.fragment}x{target.fragment} fragments)", op.loc)


def _check_loop(loop: Loop, target: Target) -> None:
    for init, update in zip(loop.init, loop.update):
        if init.type.shape != update.type.shape:
            raise TileError(f"carried tile changes shape: {init.type} before the loop, {update.type} after it",
                            loop.loc)
    if loop.kind == "chunks" and target.carried_bytes is not None:
        total = sum(v.type.rows * v.type.cols * 4 for v in loop.carried)
        if total > target.carried_bytes:
            parts = ", ".join(f"{v.type.rows}x{v.type.cols}" for v in loop.carried)
            raise TileError(f"loop-carried state of {total // 1024} KiB ({parts} fp32) exceeds the "
                            f"{target.name} budget of {target.carried_bytes // 1024} KiB per program instance; "
                            "split the value dimension or use smaller head dims", loop.loc)


def verify(program: Program, target: str | Target = "cpu") -> Program:
    """Raise ``TileError`` if ``program`` cannot run on ``target``; return it otherwise. A GPU
    target also checks what its code generator lowers (``Target.lowering_checks``)."""
    target = get_target(target)

    def fail(message: str, op: Op | None):
        raise TileError(f"{target.name} code generator: {message}", op.loc if op is not None else program.loc)

    written = set()
    for op in program.walk():
        if isinstance(op, Loop):
            _check_loop(op, target)
            continue
        if op.result is not None:
            _check_types(op)
            _check_dims(op, target)
        if op.name == "matmul" and op.attrs["operand_dtype"] not in target.mma_dtypes:
            allowed = " or ".join(map(str, target.mma_dtypes))
            raise TileError(f"unsupported dtype: {target.name} matmuls take {allowed} operands, "
                            f"this program computes in {op.attrs['operand_dtype']}", op.loc)
        if op.name == "store":
            written.add(op.attrs["param"])
    for param in program.params:
        if param.spec.output and param.name not in written:
            raise TileError(f"output {param.name!r} is never written", program.loc)
    for check in target.lowering_checks:
        check(program, fail)
    return program
