"""What the GPU code generators lower: the program shapes and op shapes they take, as checks the
verifier of a GPU target runs and the lowering runs again (one definition, so a program that
verifies for sm_90a or sm_80 does not then fail in the code generator for these reasons).

Each check reports through ``fail(message, op)`` (``op`` None: the program's own line); the
verifier and the lowering prefix the message with the target. Limits that depend on a schedule
(shared memory, registers, column splits) are the lowering's alone."""

from __future__ import annotations

from collections.abc import Callable

from .ir import Loop, Op, Program, Value

__all__ = ["PANEL", "MMA_MN", "MMA_K", "check_lowerable", "check_op", "grid_loops", "vector_product"]

PANEL = 64  # columns of a 128-byte swizzled shared-memory panel: loaded and stored tiles' widths
MMA_MN, MMA_K = 64, 16  # tensor-core matmuls take M and N in multiples of MMA_MN, K of MMA_K
GRID_SETUP = ("full", "scalar_param", "read_param", "load_state")  # ops allowed beside a grid loop

Fail = Callable[[str, "Op | None"], None]


def vector_product(mm: Op) -> bool:
    """Whether matmul ``mm`` has a vector side (a column result, ``a @ x``, or a row one, ``x @ b``):
    then it is lowered as elementwise products and a reduction, not on the tensor cores."""
    return (mm.result.type.cols == 1 and not mm.attrs["ta"]) or mm.result.type.rows == 1


def grid_loops(body: list[Op]) -> tuple[list[Loop], list[Op]]:
    """The nested blocks() loops a body starts with (beside setup ops only), and the body inside them."""
    found = []
    while True:
        loops = [op for op in body if isinstance(op, Loop)]
        if len(loops) == 1 and loops[0].kind == "blocks" and all(op is loops[0] or op.name in GRID_SETUP
                                                                  for op in body):
            found.append(loops[0])
            body = loops[0].body
            continue
        return found, body


def check_structure(program: Program, fail: Fail) -> None:
    """Nested blocks() grid loops around chunks() loops one after another, none nested in another."""
    _, body = grid_loops(program.body)
    loops = [op for op in body if isinstance(op, Loop)]
    if any(op.kind != "chunks" for op in loops):
        fail("this version lowers nested blocks() loops around chunks() loops, one after another", None)
    for loop in loops:
        if any(isinstance(op, Loop) for op in loop.body):
            fail("loops nested in a chunks() loop are not lowered yet", loop)


def check_op(op: Op, program: Program, loaded: set[Value], fail: Fail) -> None:
    """The op shapes the op emitters take: loaded and stored tiles in whole panels (saved chunk
    states aside), per-token vectors of ``Seq[1]`` parameters, tensor-core matmul shapes with the
    operands read from shared memory (B, and A with ``ta``) there already (``loaded``) or staged in
    whole 64x64 panels, transposes of vectors only."""
    if op.name in ("load", "store") and program.param(op.attrs["param"]).spec.kind == "chunk_state":
        return  # a saved chunk state: fp32 straight to and from registers, any shape
    if op.name == "load":
        t, param = op.result.type, op.attrs["param"]
        if t.cols > 1 and t.cols % PANEL:
            fail(f"tiles loaded from {param} are {t.cols} wide; "
                 f"feature dims must be multiples of {PANEL} (128-byte shared-memory panels)", op)
        if t.cols == 1 and program.param(param).spec.kind != "seq":
            fail("vector loads are implemented for Seq[1] parameters", op)
    elif op.name == "store":
        t = op.operands[0].type
        if not (t.cols == 1 and program.param(op.attrs["param"]).spec.kind == "seq") and t.cols % PANEL:
            fail(f"stored tiles are {t.cols} wide; stores need multiples of {PANEL} columns", op)
    elif op.name == "matmul" and not vector_product(op):
        a = op.operands[0]
        m, n, k = op.result.type.rows, op.result.type.cols, a.type.rows if op.attrs["ta"] else a.type.cols
        if m % MMA_MN or n % MMA_MN or k % MMA_K:
            fail(f"matmuls take M and N in multiples of {MMA_MN} and K of {MMA_K}; "
                 f"this one is {m}x{k} @ {k}x{n}", op)
        for v in (op.operands[1], a if op.attrs["ta"] else None):
            if v is not None and v not in loaded and (v.type.rows % PANEL or v.type.cols % PANEL):
                fail(f"a {v.type.rows}x{v.type.cols} register tile used as a shared matmul operand needs rows "
                     f"and columns that are multiples of {PANEL}", op)
    elif op.name == "transpose":
        t = op.operands[0].type
        if t.rows != 1 and t.cols != 1:
            fail(f"a {t.rows}x{t.cols} tile is transposed only as a matmul operand (a.T @ b); "
                 "standalone transposes are lowered for row and column vectors", op)


def check_lowerable(program: Program, fail: Fail) -> None:
    """Every check above, over the whole program."""
    check_structure(program, fail)
    loaded = {op.result for op in program.walk()  # tiles in shared memory (a chunk state's are registers)
              if op.name == "load" and program.param(op.attrs["param"]).spec.kind != "chunk_state"}
    for op in program.walk():
        if not isinstance(op, Loop):
            check_op(op, program, loaded, fail)
