"""The lowering pipeline and the public base its targets (``hopper``, ``generic``) extend.

``lower`` runs the passes in order, each reading the frozen plans before it:

1. ``structure.analyze_structure``  -> ``KernelPlan``    grid loops, per-CTA body, chunk loop, loads
2. ``liveness.plan_liveness``        -> ``Liveness``      readers, last readers, accumulating adds
3. ``issue_order.plan_issue``        -> ``IssuePlan``     each chunk loop's issue order, overlap, reloads
4. ``layout.plan_shared_memory``     -> ``SharedLayout``  ring, store panels, staging, scans, exchanges
5. ``Lowering.kernel``               -> ``KernelSource``  producer and consumer code, the kernel frame

A target is a ``Lowering`` subclass: data (matmul entry points, whether matmuls are asynchronous,
store buffers, ...), entries of the op -> emitter table (``emitters``) it lowers otherwise, and
the parts of the kernel only it has (its loads, its chunk loop, the kernel's frame)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from tilemix.tiles.errors import ResourceError
from tilemix.tiles.ir import Loop, Op, Program

from .emit import Emitter, ctype
from .issue_order import IssuePlan, plan_issue
from .knobs import Schedule
from .layout import SharedLayout, plan_shared_memory
from .liveness import Liveness, plan_liveness
from .op_emitters import BINARY, MAPS, OP_EMITTERS, emit_matmul
from .source import KernelSource, ParamKind
from .structure import KernelPlan, analyze_structure, packed_offsets, packed_start, sequence_dims

__all__ = ["Lowering", "lower", "plans"]

_IN_PLACE = (*MAPS, "where", "cast", "pow", "causal", "window", "in_seq")  # may reuse an operand's registers


def plans(lowering: type[Lowering], program: Program, schedule: Schedule, full_dims: dict[str, int],
          target: str) -> tuple[KernelPlan, Liveness, Mapping[Loop, IssuePlan], SharedLayout]:
    """Passes 1-4 for the target ``lowering`` (``target``: its name in errors); pass 3 once per
    chunk loop."""
    plan = analyze_structure(program, schedule, full_dims, target, lowering.consumer_heads)
    live = plan_liveness(plan, MAPS)
    issues = MappingProxyType({loop: plan_issue(plan, live, loop, asynchronous=lowering.asynchronous,
                                                registers=lowering.consumer_registers(schedule),
                                                views=frozenset(BINARY), in_place=frozenset(_IN_PLACE))
                               for loop in plan.loops})
    layout = plan_shared_memory(plan, live, issues, lowering.store_buffers)
    return plan, live, issues, layout


def lower(lowering: type[Lowering], program: Program, schedule: Schedule, full_dims: dict[str, int],
          target: str, **options) -> KernelSource:
    """``program`` lowered by the target ``lowering``: the plans, then its code (``options``: what
    its constructor takes beside them, ``varlen`` say)."""
    return lowering(*plans(lowering, program, schedule, full_dims, target), **options).kernel()


class Lowering(Emitter):
    """The consumer walk every target shares; a target sets the data below, overrides entries of
    ``emitters`` and implements ``wait_prologue``, ``lower_loop`` and ``kernel``."""

    matmul_ss: str  # matmul entry points, A from shared memory or registers (same template arguments)
    matmul_rs: str
    asynchronous: bool  # matmuls are groups, waited for where their results are read
    consumer_heads: bool  # lowers consumer_axis="heads"
    store_buffers: int  # shared panel buffers a consumer alternates between for wide tile stores
    emitters = OP_EMITTERS

    def __init__(self, *plans, varlen: bool = False):
        """``varlen``: the kernel runs a packed batch, each (sequence, head) a program instance whose
        first token and length it reads from the ``cu_seqlens`` offsets (``ops/varlen.py``)."""
        super().__init__(*plans)
        self.varlen = varlen
        if varlen:
            self.check_varlen()

    def check_varlen(self):
        """Packed sequences lower programs whose loops walk the sequences: chunks() and blocks() over
        T or a second sequence (``Seq.along``, packed by offsets of its own: keys, say), a grid over
        the longest sequence's blocks (``T_max``, ``S_max``), no ChunkState."""
        plan = self.plan
        sequences = ("T", *sequence_dims(self.program))
        if plan.matrix or any(loop.dim not in sequences for loop in (*plan.loops, *plan.grid_loops)) \
                or any(p.spec.kind == "chunk_state" for p in self.program.params):
            self.fail("packed sequences (cu_seqlens) lower programs whose chunks() and blocks() loops walk the "
                      "sequences (T, Seq.along), without ChunkState")

    def token_base(self, length: str = "T") -> str:
        """The row of ``[B·length]`` tokens where this instance's sequence starts: its batch row's, or in
        a packed batch its offset. ``length``: the sequence dim of the tensor addressed (``Seq.along``)."""
        return f"(long){packed_start(length)}" if self.varlen else f"(long)b * {length}"

    def tile_at(self, name: str, idx: list[str], rows: int, cols: int, consumer: str = "wg",
                out: bool = False) -> tuple[str, str, str, str]:
        """Global address of the tile of parameter ``name`` at block indices ``idx`` (16-bit
        elements), its row stride, and the rows and columns left in the tensor from there."""
        base = f"{'out' if out else 'ptr'}_{name}"
        spec = self.program.param(name).spec
        if spec.kind == "matrix":
            rdim, cdim = spec.dims
            row0, col0 = f"{idx[0]} * {rows}", f"{idx[1]} * {cols}"
            return (f"{base} + (long)({row0}) * {cdim} + {col0}", f"(long){cdim}", f"{rdim} - {row0}",
                    f"{cdim} - ({col0})")
        heads, head = ("G", "h / (H / G)") if spec.kind == "group_seq" else ("H", "h")
        dim = [d for d in spec.dims if isinstance(d, str)][-1]
        width = self.plan.full_dims[dim]
        row0 = f"{idx[0]} * {rows}"
        col0 = self.plan.col0(name, consumer)
        return (f"{base} + (({self.token_base(spec.length)} + {row0}) * {heads} + {head}) * {width} + {col0}",
                f"(long){heads} * {width}", f"{spec.length} - {row0}", str(cols))

    @classmethod
    def consumer_registers(cls, schedule: Schedule) -> int:
        """Registers a consumer thread has for the issue order's estimates (0: not asked)."""
        return 0

    def kernel(self) -> KernelSource:
        raise NotImplementedError

    def wait_prologue(self, ind: int):
        """Wait for the tiles loaded before the chunk loop (at the first read of one)."""
        raise NotImplementedError

    def lower_loop(self, loop: Loop, ind: int):
        raise NotImplementedError

    # -- the consumer walk -----------------------------------------------------------
    def lower_ops(self, ops: list[Op], ind: int):
        for op in ops:
            if isinstance(op, Loop) and op.kind == "blocks":
                self.lower_ops(op.body, ind)  # a grid loop: its index comes from blockIdx
            elif isinstance(op, Loop):
                self.lower_loop(op, ind)
            else:
                self.lower_op(op, ind)

    def lower_op(self, op: Op, ind: int):
        """One op through its table entry: its result declared, or written in place over an operand
        it reads last, after waiting for the groups writing its operands."""
        if op in self.live.absorbed:
            return  # emitted by the add it accumulates into
        for v in self.reloads.get(op, ()):
            self.reg_of.pop(v, None)  # its copy dies before this reader: read the stage afresh
        for v in self.early_staging.get(op, ()):
            self.shared(v, ind)  # its last register read: later matmuls read the staged tile
            self.staged_early.add(v)
        if op in self.live.accumulate:
            self.lower_accumulate(op, ind)
            return
        decl = f"{ctype(op.result.type)} {{}};" if op.result is not None else ""
        if op.result is not None and op.name != "matmul" and op.name in _IN_PLACE:
            donor = next((x for x in op.operands if self.reuses(x, op)), None)
            if donor is not None:  # write in place: no new registers
                self.names[op.result] = self.names[donor]
                decl = ""
        if op.name != "matmul":
            self.wait_for(op.operands, ind)
        out = self.name(op.result) if op.result is not None else None
        emitter = self.emitters.get(op.name)
        if emitter is None:
            self.fail(f"op {op.name!r} is not lowered yet", op)
        emitter(self, op, decl.format(out), out, ind)

    def lower_accumulate(self, add: Op, ind: int):
        """``x + a @ b``: the matmul accumulates into ``x``'s registers (or a copy of ``x``)."""
        mm, x = self.live.accumulate[add]
        if self.reuses(x, add):
            self.names[add.result] = self.name(x)  # in place; in-flight groups on x stay ordered
        else:
            self.wait_for([x], ind)
            self.emit(f"{ctype(add.result.type)} {self.name(add.result)} = {self.reg(x, ind)};", ind)
        emit_matmul(self, mm, "", self.name(add.result), ind, accumulate=True)

    def end_loop(self, loop: Loop):
        """After a chunk loop: loaded tiles' register copies are the last chunk's, and the loop's
        results are its carried tiles."""
        self.reg_of = {v: n for v, n in self.reg_of.items() if v not in self.smem_of}
        for result, carried in zip(loop.results, loop.carried):
            self.names[result] = self.name(carried)

    # -- loads of per-token vectors ---------------------------------------------------------
    def producer_head(self, op: Op, consumer: int) -> str:
        """The head whose data ``op`` loads for consumer ``consumer``, as the loading threads name it:
        ``h``; with consumers over heads (those threads have no ``h``) the consumer's own where each
        loads its copy, else the CTA's first."""
        if not self.plan.heads:
            return "h"
        C = self.schedule.consumers
        return f"(hcta * {C} + {consumer})" if self.plan.per_consumer(op) else f"(hcta * {C})"

    def col_copies(self, op: Op, dst: str, threads: int, tid: str) -> list[str]:
        """The 4-byte cp.async copies of one per-token vector of the chunk (one per consumer where
        each loads its own), by ``threads`` threads numbered ``tid``."""
        rows = op.result.type.rows
        index = self.plan.index_name[op.operands[0].id]
        length = self.program.param(op.attrs["param"]).spec.length
        return [f"tm::load_col_async<{rows}, {threads}>((float*)({dst} + {consumer * rows * 4}), "
                f"ptr_{op.attrs['param']} + {self.token_base(length)} * H + {self.producer_head(op, consumer)}, H, "
                f"{index} * {rows}, {length}, {tid});"
                for consumer in range(self.schedule.consumers if self.plan.per_consumer(op) else 1)]

    # -- the kernel's frame ------------------------------------------------------------
    def param_args(self) -> tuple[list[str], list[tuple[ParamKind, str]]]:
        """The kernel's parameters (C++ declarations) and, in the same order, what the launch passes."""
        args, order = [], []
        for p in self.program.params:
            kind = p.spec.kind
            if kind == "const" or (not p.present and kind != "state"):
                continue
            if p.name not in self.plan.loaded and not p.spec.output and kind in ("seq", "group_seq", "matrix"):
                continue  # an input the program never reads needs no tensor map
            tensor = kind in ("seq", "group_seq", "matrix")
            if tensor and not p.spec.output and (kind == "matrix" or p.spec.dims != (1,)):
                args.append(f"const __grid_constant__ tm::TMap tmap_{p.name}")
                order.append((ParamKind.TMAP, p.name))
            elif kind == "seq" and p.spec.output and p.spec.dims == (1,):
                args.append(f"float* __restrict__ out_{p.name}")  # per-token fp32 values: plain stores
                order.append((ParamKind.PTR_OUT, p.name))  # launched as the output's address
            elif tensor and p.spec.output:
                args.append(f"const __grid_constant__ tm::TMap tmap_{p.name}")
                order.append((ParamKind.TMAP_OUT, p.name))
            elif kind in ("seq", "head"):
                args.append(f"const float* __restrict__ ptr_{p.name}")
                order.append((ParamKind.F32, p.name))
            elif kind == "state":
                args.append(f"const float* __restrict__ init_{p.name}, float* __restrict__ final_{p.name}")
                order.append((ParamKind.STATE, p.name))
            elif kind == "scalar":
                args.append(f"float arg_{p.name}")
                order.append((ParamKind.SCALAR, p.name))
            elif kind == "chunk_state":
                args.append(f"float* __restrict__ out_{p.name}" if p.spec.output
                            else f"const float* __restrict__ ptr_{p.name}")
                order.append((ParamKind.CHUNK_STATE, p.name))
            else:
                self.fail(f"parameter kind {kind} is not lowered yet")
        sequences = self.packed_dims()
        for dim in sequences:
            args.append(f"const int* __restrict__ {packed_offsets(dim)}")
            order.append((ParamKind.OFFSETS, packed_offsets(dim)))
        # in a packed batch T (S) is each sequence's length (grid_decode), the packed row's is T_packed
        args += [f"int {d}_packed" if d in sequences else f"int {d}" for d in self.size_args()]
        return args, order

    def packed_dims(self) -> tuple[str, ...]:
        """The sequence dims a packed batch takes offsets for: T and each ``Seq.along`` one (none
        without varlen)."""
        return ("T", *sequence_dims(self.program)) if self.varlen else ()

    def size_args(self) -> tuple[str, ...]:
        """The runtime sizes passed as int arguments; a packed batch's grid also takes ``T_max`` (and
        ``S_max`` for a grid over a second sequence), the longest sequence (rounded up:
        ``ops/varlen.py``), which sizes its blocks() loops."""
        if not self.varlen:
            return self.plan.size_args
        return (*self.plan.size_args, *(f"{d}_max" for d in self.packed_dims()
                                        if any(loop.dim == d for loop in self.plan.grid_loops)))

    def grid_decode(self) -> list[str]:
        """blockIdx.x: a head's column block fastest (the CTAs of one head run side by side and
        read its shared tiles, linear attention's q and k, through L2 once), then the grid loops'
        indices, innermost fastest, then batch x head (no 65535 limit on B·H as grid y would have)."""
        plan = self.plan
        grid = ["  int rest = blockIdx.x;"]
        if plan.column_ctas > 1:
            grid.append(f"  const int colcta = rest % {plan.column_ctas}; rest /= {plan.column_ctas};")
        elif self.schedule.split:
            grid.append("  const int colcta = 0;  // the CTA's consumers take every column block")
        first_rows = []  # a packed batch: the first row of each grid loop's block in this CTA
        for depth in reversed(range(len(plan.grid_loops))):
            loop = plan.grid_loops[depth]
            size = loop.size * (self.schedule.consumers if loop is plan.split_loop else 1)
            count = f"((({loop.dim + '_max' if self.varlen else loop.dim}) + {size - 1}) / {size})"
            var = "cta" if loop is plan.split_loop else "blk"
            grid.append(f"  const int {var}{depth} = rest % {count}; rest /= {count};")
            first_rows.append((f"{var}{depth} * {size}", loop.dim))
        if plan.matrix:
            return grid
        if plan.heads:  # consumer wg runs head hcta * consumers + wg
            C = self.schedule.consumers
            grid.append(f"  const int b = rest / (H / {C}), hcta = rest % (H / {C});")
        else:
            grid.append("  const int b = rest / H, h = rest % H;")
        for dim in self.packed_dims():
            bos, offsets = packed_start(dim), packed_offsets(dim)
            grid.append(f"  const int {bos} = {offsets}[b], {dim} = {offsets}[b + 1] - {bos};  // packed sequence b")
        grid += [f"  if ({row} >= {dim}) return;  // past the sequence's end (the grid spans the longest)"
                 for row, dim in first_rows if self.varlen]
        return grid

    def consumer_block(self) -> list[str]:
        """The declaration of the grid block a consumer takes when the consumers share out a grid loop."""
        if self.plan.split_loop is None:
            return []
        return [f"const int blk{len(self.plan.grid_loops) - 1} = {self.plan.block_expr('wg')};  // and its grid block"]

    def check_shared_memory(self, smem_bytes: int, limit: int, where: str):
        occupancy = f", occupancy={self.schedule.occupancy}" if self.schedule.occupancy > 1 else ""
        if smem_bytes > limit:
            raise ResourceError(f"{self.plan.target} code generator: this schedule needs {smem_bytes // 1024} KiB "
                                f"of shared memory (stages={self.schedule.stages}, consumers="
                                f"{self.schedule.consumers}{occupancy}); {where} has at most {limit // 1024} KiB",
                                self.program.loc)

    def kernel_source(self, source: list[str], smem_bytes: int, threads: int, order, tmap_rows: dict) -> KernelSource:
        plan, consumers = self.plan, self.schedule.consumers
        return KernelSource(f"tilemix_{self.program.name}", "\n".join(source) + "\n", smem_bytes,
                            self.layout.stage_bytes, threads, self.schedule, order,
                            [(loop.dim, loop.size * (consumers if loop is plan.split_loop else 1))
                             for loop in plan.grid_loops], list(self.size_args()), tmap_rows, plan.matrix,
                            plan.column_ctas)
