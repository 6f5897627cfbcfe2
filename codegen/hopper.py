"""Lowering of tile programs to warp-specialised sm_90a kernels.

A CTA runs one or two program instances (``Schedule.consumers``): one thread
of a producer warpgroup issues the TMA loads — those before the sequential
loop once, those inside it into a ring of shared-memory stages completing on
mbarriers — while each consumer warpgroup walks the program's ops, each one a
call into ``tiles/include/tilemix/hopper.cuh``, with register tiles in the
wgmma accumulator layout. Matmul operands come from shared memory (loaded
tiles, or register tiles staged there) or, for a register left operand,
straight from registers. Elementwise maps read a loaded tile (``tm::shared_tile``)
or a per-token vector's transpose (``tm::shared_row``) where it lies in its ring
stage, element by element, rather than from a register copy.

Matmuls are asynchronous: each is one committed wgmma group, waited for only
where its result is first read, and then only as far as that group
(``wgmma_wait<n>``, n = the groups issued after it); the chunk loop's ops are
walked in ``issue_order`` (independent matmuls issued before the first wait).
``x + a @ b`` accumulates into ``x``'s registers, and a value read once, in its
own scope, hands its registers to the op that reads it — so a carried
accumulator (gemm's, attention's output) is updated in place, and when an
iteration ends with its matmul still in flight the chunk's shared-memory stage
is released one iteration later, after the next iteration's wgmmas are issued.

Program shapes lowered: nested ``blocks`` grid loops around at most one
``chunks`` loop (scans, attention, gemm); anything else is rejected with an
error naming the line.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from tilemix.tiles.errors import ResourceError, TileError
from tilemix.tiles.ir import Loop, Op, Program, Value
from tilemix.tiles.types import DType

from .issue_order import issue_order, peak_registers, unit_reads
from .schedule import ISSUE_ORDERS, OVERLAPS, SMEM_LIMIT, Schedule, column_blocks
from .source import KernelSource, ParamKind

__all__ = ["KernelSource", "lower_hopper"]

CONSUMER_THREADS = 128
PRODUCER_THREADS = 128
PANEL = 64  # columns of a 128-byte swizzled shared-memory panel
# per thread, [several consumers, one]: with one consumer the producer keeps 40, with more 24
PRODUCER_REGISTERS, CONSUMER_REGISTERS = (24, 40), (240, 232)
OVERLAP_RESERVE = 24  # registers a consumer keeps beside its tiles (addresses, indices): see Schedule.overlap

_SETUP = ("full", "scalar_param", "read_param", "load_state")  # ops allowed beside a grid loop
_ELEMENTWISE = ("where", "cast", "pow", "causal", "window", "in_seq")  # with _UNARY and _BINARY

_UNARY = {
    "neg": "[](float a) { return -a; }",
    "abs": "[](float a) { return fabsf(a); }",
    "exp": "[](float a) { return tm::f_exp(a); }",
    "exp2": "[](float a) { return tm::ex2(a); }",
    "log": "[](float a) { return tm::f_log(a); }",
    "sqrt": "[](float a) { return tm::f_sqrt(a); }",
    "sigmoid": "[](float a) { return tm::f_sigmoid(a); }",
    "softplus": "[](float a) { return tm::f_softplus(a); }",
    "tanh": "[](float a) { return tm::f_tanh(a); }",
}
_BINARY = {
    "add": "a + b", "sub": "a - b", "mul": "a * b", "div": "a / b",
    "maximum": "fmaxf(a, b)", "minimum": "fminf(a, b)",
    "lt": "a < b ? 1.0f : 0.0f", "le": "a <= b ? 1.0f : 0.0f",
    "gt": "a > b ? 1.0f : 0.0f", "ge": "a >= b ? 1.0f : 0.0f",
}


def _ctype(t) -> str:
    return f"tm::rt<{t.rows}, {t.cols}>"


def thread_registers(t) -> int:
    """Registers a thread holds of a ``tm::rt<rows, cols>`` (wgmma's accumulator layout: 2 rows of
    each 64 and 2 columns of each 8; a row vector repeats in every row's threads)."""
    rows = 1 if t.rows == 1 else t.rows // 32
    cols = 1 if t.cols == 1 else t.cols // 4
    return rows * cols


class _Lowering:
    # What another target's lowering (codegen/generic.py) changes: the name in errors, the matmul
    # entry points (same template arguments), the fence that hands ordinary shared-memory stores to
    # wgmma's asynchronous proxy (None where matmuls read shared memory synchronously), and whether
    # matmuls run asynchronously (then the chunk loop's ops are walked in issue_order).
    target = "sm_90a"
    matmul_ss = "tm::matmul_ss"
    matmul_rs = "tm::matmul_rs"
    proxy_fence: str | None = "tm::fence_proxy_async();"
    asynchronous = True  # matmuls are wgmma groups, waited for where their results are read

    def __init__(self, program: Program, schedule: Schedule, full_dims: dict[str, int]):
        self.p = program
        self.full_dims = full_dims
        self.schedule = schedule
        self.is_bf16 = "true" if program.compute_dtype is DType.bf16 else "false"
        self.lines: list[str] = []
        self.names: dict[Value, str] = {}
        self.smem_of: dict[Value, tuple[str, int]] = {}  # value -> (pointer expr, rows) for shared tiles
        self.ring_vector: dict[Value, str] = {}  # per-token vector -> its address in the chunk's stage
        self.reg_of: dict[Value, str] = {}  # shared tile value -> its register copy
        self.staged: dict[Value, str] = {}
        # staged value -> (offset, bytes per group, whether staged inside the chunk loop)
        self.stage_slots: dict[Value, tuple[int, int, bool]] = {}
        self.in_loop = False  # lowering the chunk loop's body
        self.scratch_floats = {"scratch": 0, "transposed": 0}  # per consumer: the widest exchange of each buffer
        self.lowered: set[Op] = set()  # ops whose code is emitted (an absorbed matmul: with its add)
        self.scans: dict[Value, str] = {}  # column vector -> shared memory with its prefix scan
        self.smem_top = 0  # bytes of shared memory allocated so far (after the stage ring)
        self.loop: Loop | None = None
        self.loads: list[Op] = []
        self.index_name: dict[int, str] = {}
        self.prologue_offset: dict[Op, int] = {}
        self.prologue_waited = False
        self.tmap_rows: dict[str, int] = {}
        self.bar = "bar_id"  # named barrier of this consumer warpgroup (0 is __syncthreads)
        self.in_flight: list[str] = []  # the register tile each wgmma group not yet waited for writes, oldest first
        self.carried_over: set[str] = set()  # tiles the previous chunk's groups may still be writing

    # -- helpers -----------------------------------------------------------
    def fail(self, message: str, op: Op | None = None):
        raise TileError(f"{self.target} code generator: {message}", op.loc if op else self.p.loc)

    def name(self, v: Value) -> str:
        return self.names.setdefault(v, f"v{v.id}")

    def emit(self, line: str, indent: int = 2):
        self.lines.append(" " * indent + line.lstrip())

    def alloc(self, nbytes: int, align: int = 1024) -> int:
        self.smem_top = (self.smem_top + align - 1) // align * align
        offset = self.smem_top
        self.smem_top += nbytes
        return offset

    def reg(self, v: Value, ind: int) -> str:
        """A register-tile expression for ``v`` (copying a shared tile once: reading it afresh at
        each use measured more spills in SSD, 104 B against 56 B)."""
        if v in self.smem_of:
            if v not in self.reg_of:
                ptr, rows = self.smem_of[v]
                name = f"{self.name(v)}_r"
                self.emit(f"{_ctype(v.type)} {name}; tm::load_shared<{self.is_bf16}>({name}, {ptr});", ind)
                self.reg_of[v] = name
            return self.reg_of[v]
        return self.name(v)

    def elementwise(self, v: Value, ind: int) -> str:
        """A binary map's operand: a loaded shared tile not yet in registers as a view
        (``tm::shared_tile``: each element read where the map uses it), not a register copy that
        stays live until the tile's last reader (32 registers per 64x64 tile), else ``reg``."""
        if v in self.smem_of and v not in self.reg_of:
            return f"tm::shared_tile<{self.is_bf16}, {v.type.rows}, {v.type.cols}>{{{self.smem_of[v][0]}}}"
        return self.reg(v, ind)

    def shared(self, v: Value, ind: int) -> tuple[str, int]:
        """A shared tile for ``v``: loaded ones as they are, register tiles staged."""
        if v in self.smem_of:
            return self.smem_of[v]
        t = v.type
        if t.cols % PANEL or t.rows % 64:
            self.fail(f"a {t.rows}x{t.cols} register tile used as a shared matmul operand needs rows and "
                      f"columns that are multiples of 64")
        if v in self.staged:
            return self.staged[v], t.rows
        nbytes = t.rows * t.cols * 2
        offset = self.stage_slot(v, nbytes)
        ptr = self.staged[v] = f"(smem + {offset} + wg * {nbytes})"
        # In-flight wgmmas may still read this buffer: the previous chunk's (left running at its end),
        # or, where buffers are shared, those of the value staged here before.
        if self.schedule.share_staging:
            self.wait_all(ind)
        self.wait_for([v], ind, older=True)
        self.emit(f"tm::sync_threads({self.bar}, {CONSUMER_THREADS});", ind)
        self.emit(f"tm::store_shared<{self.is_bf16}>({ptr}, {self.reg(v, ind)});", ind)
        if self.proxy_fence:
            self.emit(self.proxy_fence, ind)
        self.emit(f"tm::sync_threads({self.bar}, {CONSUMER_THREADS});", ind)
        return ptr, t.rows

    def stage_slot(self, v: Value, nbytes: int) -> int:
        """Shared memory for staging ``v``: a new buffer, or with ``Schedule.share_staging`` the
        buffer of a value staged in the same scope whose readers are all emitted. Staging waits for
        every in-flight wgmma and passes the group's barrier before it stores, so no read of the old
        value is pending then."""
        if self.schedule.share_staging:
            for u, (offset, size, in_loop) in self.stage_slots.items():
                done = self.last_reader.get(u) in self.lowered
                # a tile staged before the chunk loop is not staged again in each iteration: a buffer
                # reused inside the loop would hand the next iteration's readers another tile
                once = self.in_loop and not in_loop
                if size == nbytes and done and not once and self.scope.get(u) is self.scope.get(v):
                    del self.stage_slots[u], self.staged[u]
                    self.stage_slots[v] = (offset, size, self.in_loop)
                    return offset
        offset = self.alloc(nbytes * self.schedule.consumers)
        self.stage_slots[v] = (offset, nbytes, self.in_loop)
        return offset

    def wait_all(self, ind: int):
        if self.in_flight or self.carried_over:
            self.emit("tm::wgmma_wait<0>();", ind)
        self.in_flight.clear()
        self.carried_over.clear()

    def wait_older(self, ind: int):
        """Wait for the previous chunk's groups (older than all of this chunk's)."""
        self.emit(f"tm::wgmma_wait<{len(self.in_flight)}>();", ind)
        self.carried_over.clear()

    def wait_for(self, values, ind: int, older: bool = False):
        """Wait for the wgmma groups writing any of ``values`` (and with ``older`` for the previous
        chunk's): groups complete in issue order, so for the newest of them, leaving the ones issued
        after it in flight."""
        names = {self.names.get(v) for v in values}
        newest = max((i for i, out in enumerate(self.in_flight) if out in names), default=None)
        if newest is not None:
            self.emit(f"tm::wgmma_wait<{len(self.in_flight) - 1 - newest}>();", ind)
            del self.in_flight[:newest + 1]
            self.carried_over.clear()
        elif self.carried_over and (older or names & self.carried_over):
            self.wait_older(ind)

    def reuses(self, x: Value, op: Op) -> bool:
        """Whether ``op``'s result may take over ``x``'s registers: ``op`` is ``x``'s last reader,
        in the scope that defines ``x`` (so not once per iteration of a value made before the loop),
        and the register tiles have one shape (a view of shared memory has no registers to give)."""
        scope = self.scope.get(x)
        return (self.last_reader.get(x) is op and scope is not None and scope is self.scope.get(op.result)
                and x not in self.smem_of and x not in self.shared_rows and x in self.names
                and (x.type.rows, x.type.cols) == (op.result.type.rows, op.result.type.cols))

    def scan(self, v: Value, ind: int) -> str:
        """Shared memory holding the prefix scan of column vector ``v``, scanned once."""
        if v not in self.scans:
            floats = 2 * v.type.rows
            offset = self.alloc(floats * 4 * self.schedule.consumers, 16)
            ptr = self.scans[v] = f"((float*)(smem + {offset}) + wg * {floats})"
            buffer = self.scratch(4 * (v.type.rows // 64))
            self.emit(f"tm::prefix_scan({self.reg(v, ind)}, {ptr}, {buffer}, {self.bar});", ind)
        return self.scans[v]

    def scratch(self, floats: int, buffer: str = "scratch") -> str:
        """The consumer's buffer for a cross-warp exchange of ``floats`` floats: ``scratch`` for column
        reductions and scans, ``transposed`` for transposes (hopper.cuh says why), each sized for the
        program's widest exchange (a fixed 4 KiB per consumer kept attention_bwd_dq at two stages; at
        three, H200, attention backward B=4 T=4096 H=16 D=128 causal: 2.084 -> 1.862 ms)."""
        self.scratch_floats[buffer] = max(self.scratch_floats[buffer], -(-floats // 4) * 4)
        return buffer

    def scratch_base(self) -> list[str]:
        """Allocate the consumers' exchange buffers (after lowering the body): their declarations."""
        per_consumer = sum(self.scratch_floats.values()) or 4
        offset = self.alloc(per_consumer * 4 * self.schedule.consumers, 16)
        return [f"float* scratch = (float*)(smem + {offset}) + wg * {per_consumer};",
                *([f"float* transposed = scratch + {self.scratch_floats['scratch']};"]
                  if self.scratch_floats["transposed"] else [])]

    # -- structure -----------------------------------------------------------
    def analyze(self):
        """Split the program into grid loops (blocks), the per-CTA body, at most one sequential
        chunks loop in it, and the tile loads before (prologue) and inside (ring) that loop."""
        # column vectors prefix-scanned in shared memory (``scan``) for a cumsum or segsum: their
        # column sums read the scan too, wherever they come, so every program rounds them alike
        self.scanned = {op.operands[0] for op in self.p.walk()
                        if op.name in ("cumsum", "segsum") and op.operands[0].type.cols == 1}
        body = self.p.body
        self.grid_loops = []
        while True:
            loops = [op for op in body if isinstance(op, Loop)]
            if len(loops) == 1 and loops[0].kind == "blocks" and all(
                    op is loops[0] or op.name in _SETUP for op in body):
                self.grid_loops.append(loops[0])
                body = loops[0].body
                continue
            break
        self.body = body
        loops = [op for op in body if isinstance(op, Loop)]
        if len(loops) > 1 or any(op.kind != "chunks" for op in loops):
            self.fail("this version lowers nested blocks() loops around at most one chunks() loop")
        self.loop = loops[0] if loops else None
        if self.loop is not None and any(isinstance(op, Loop) for op in self.loop.body):
            self.fail("loops nested in a chunks() loop are not lowered yet", self.loop)
        tile_loads = lambda ops: [op for op in ops if op.name == "load" and op.result.type.cols > 1]  # noqa: E731
        self.prologue_loads = tile_loads(body)
        self.loads = tile_loads(self.loop.body) if self.loop is not None else []
        self.loaded_tiles = {op.result for op in self.loads}
        # per-token vectors (Seq[1]) of the chunk: copied into the ring with the chunk's tiles, so
        # the consumers read them from shared memory rather than wait on global memory at the head
        # of every chunk
        self.col_loads = [op for op in (self.loop.body if self.loop is not None else [])
                          if op.name == "load" and op.result.type.cols == 1 and op.operands[0] is self.loop.index
                          and self.p.param(op.attrs["param"]).spec.kind == "seq"]
        for op in self.prologue_loads + self.loads:
            if op.result.type.cols % PANEL:
                self.fail(f"tiles loaded from {op.attrs['param']} are {op.result.type.cols} wide; "
                          f"sm_90a needs feature dims that are multiples of {PANEL}", op)
        self.loaded = {op.attrs["param"] for op in self.p.walk() if op.name == "load"}
        self.matrix = any(p.spec.kind == "matrix" for p in self.p.params)
        if self.matrix:
            self.size_args = sorted({d for p in self.p.params if p.spec.kind == "matrix" for d in p.spec.dims})
        else:
            self.size_args = ["T", "H", "G"]
        for depth, loop in enumerate(self.grid_loops):
            self.index_name[loop.index.id] = self.names[loop.index] = f"blk{depth}"
        self.split_loop = None  # the grid loop whose blocks the consumers share out
        axis = self.schedule.consumer_axis
        if axis not in ("columns", "blocks", "heads"):
            self.fail(f"consumer_axis is 'columns', 'blocks' or 'heads', not {axis!r}")
        self.heads = axis == "heads"  # the consumers take consecutive heads of one batch
        if self.heads:
            if self.target != "sm_90a":  # the generic lowering (a subclass) issues loads per head otherwise
                self.fail("consumer_axis='heads' is lowered for sm_90a only")
            if self.matrix:
                self.fail("consumer_axis='heads' needs a batch x head grid (a program of Seq parameters)")
            if self.schedule.split:
                self.fail("consumer_axis='heads' takes no column split (each consumer runs a whole head)")
        if self.schedule.consumer_axis == "blocks" and self.schedule.consumers > 1:
            if not self.grid_loops:
                self.fail("consumer_axis='blocks' needs a blocks() loop")
            self.split_loop = self.grid_loops[-1]
        if self.loop is not None:
            # the chunk index: the iteration counter c, offset by the first chunk when the loop has a start,
            # counted down from the last chunk when it runs in reverse
            index = "c" if self.loop.start is None else "(c_first + c)"
            index = f"(n_iter - 1 - {index})" if self.loop.reverse else index
            self.index_name[self.loop.index.id] = self.names[self.loop.index] = index
        self.plan_accumulation()
        # transposes of per-token vectors that only elementwise maps read: views of the stage
        # (``tm::shared_row``), each element read where it is used, no registers held
        ring = {op.result for op in self.col_loads}
        self.shared_rows = {op.result for op in (self.loop.body if self.loop is not None else [])
                            if op.name == "transpose" and op.operands[0] in ring
                            and all(not isinstance(r, Loop) and (r.name in _UNARY or r.name in _BINARY)
                                    for r in self.readers[op.result])}

    def plan_accumulation(self):
        """List each value's readers and find its last one (a loop reads its carried updates after
        its body), note the op list (scope) defining it, and pick the adds ``x + a @ b`` whose
        matmul is read by nothing else: those wgmmas accumulate into ``x``."""
        self.uses, self.scope, self.last_reader = Counter(), {}, {}
        self.readers: defaultdict[Value, list[Op]] = defaultdict(list)

        def read(values, op: Op):
            self.uses.update(values)
            self.last_reader.update((v, op) for v in values)
            for v in values:
                self.readers[v].append(op)

        def visit(ops: list[Op]):
            for op in ops:
                if op.result is not None:
                    self.scope[op.result] = ops
                if isinstance(op, Loop):
                    read(op.init, op)
                    self.scope.update({v: op.body for v in op.carried})
                    visit(op.body)
                    read(op.update, op)
                else:
                    read(op.operands, op)

        visit(self.p.body)
        producer = {op.result: op for op in self.p.walk() if op.result is not None}
        self.accumulate: dict[Op, tuple[Op, Value]] = {}  # add -> (its matmul, the accumulator)
        for op in self.p.walk():
            if op.name != "add":
                continue
            for m, x in (op.operands, op.operands[::-1]):
                mm = producer.get(m)
                if (mm is not None and mm.name == "matmul" and self.uses[m] == 1 and m is not x
                        and (x.type.rows, x.type.cols) == (op.result.type.rows, op.result.type.cols)):
                    self.accumulate[op] = (mm, x)
                    break
        self.absorbed = {mm for mm, _ in self.accumulate.values()}
        # An absorbed matmul is emitted with its add, so its operands are read there: an op between
        # the two must not take their registers (or their staging buffers) as their last reader.
        deferred = {add: mm.operands for add, (mm, _) in self.accumulate.items()}

        def reread(ops: list[Op]):
            for op in ops:
                if isinstance(op, Loop):
                    self.last_reader.update((v, op) for v in op.init)
                    reread(op.body)
                    self.last_reader.update((v, op) for v in op.update)
                elif op not in self.absorbed:
                    self.last_reader.update((v, op) for v in (*deferred.get(op, ()), *op.operands))

        if deferred:
            self.last_reader = {}
            reread(self.p.body)

    def trip_count(self, loop: Loop) -> str:
        end = loop.dim  # runtime sizes are kernel arguments named after their dims
        if loop.stop is not None:
            block = self.index_name[loop.stop.index.id]
            if self.split_loop is not None and loop.stop.index is self.split_loop.index:
                # every consumer runs the CTA's longest range; positions mask what is not theirs
                block = self.block_expr(self.schedule.consumers - 1)
            end = f"min({end}, ({block} + 1) * {loop.stop.size})"
        chunks = f"(({end}) + {loop.size - 1}) / {loop.size}"
        return chunks if loop.start is None else f"max(0, {chunks} - c_first)"

    def first_chunk(self, loop: Loop) -> list[str]:
        """The declaration of ``c_first``, the first chunk of a loop with a start (none without)."""
        if loop.start is None:
            return []
        block = self.index_name[loop.start.index.id]
        if self.split_loop is not None and loop.start.index is self.split_loop.index:
            block = self.block_expr(0)  # every consumer starts where the CTA's first block does
        return [f"const int c_first = {block} * {loop.start.size} / {loop.size};"]

    def param_args(self) -> tuple[list[str], list[tuple[ParamKind, str]]]:
        args, order = [], []
        for p in self.p.params:
            kind = p.spec.kind
            if kind == "const" or (not p.present and kind != "state"):
                continue
            if p.name not in self.loaded and not p.spec.output and kind in ("seq", "group_seq", "matrix"):
                continue  # an input the program never reads needs no tensor map
            if kind in ("seq", "group_seq") and p.spec.dims != (1,) and not p.spec.output:
                args.append(f"const __grid_constant__ tm::TMap tmap_{p.name}")
                order.append((ParamKind.TMAP, p.name))
            elif kind == "matrix" and not p.spec.output:
                args.append(f"const __grid_constant__ tm::TMap tmap_{p.name}")
                order.append((ParamKind.TMAP, p.name))
            elif kind == "seq" and p.spec.output and p.spec.dims == (1,):
                args.append(f"float* __restrict__ out_{p.name}")  # per-token fp32 values: plain stores
                order.append((ParamKind.PTR_OUT, p.name))  # launched as the output's address
            elif kind in ("seq", "group_seq", "matrix") and p.spec.output:
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
            else:
                self.fail(f"parameter kind {kind} is not lowered yet")
        args += [f"int {d}" for d in self.size_args]
        return args, order

    def block_expr(self, consumer) -> str:
        """Index of consumer ``consumer``'s block of the split grid loop."""
        depth = len(self.grid_loops) - 1
        return f"(cta{depth} * {self.schedule.consumers} + {consumer})"

    def per_consumer(self, op: Op) -> bool:
        """Whether each consumer loads its own copy of this tile."""
        if self.heads:  # each consumer its own head's Seq tiles; a group's tiles once for all
            return self.p.param(op.attrs["param"]).spec.kind == "seq"
        if self.split_width(op.attrs["param"]):
            return True
        return self.split_loop is not None and self.split_loop.index in op.operands

    def split_width(self, param_name: str) -> int | None:
        """The block width of a parameter's feature dim, if it is split."""
        dims = [d for d in self.p.param(param_name).spec.dims if isinstance(d, str)]
        return dict(self.schedule.split).get(dims[-1]) if dims else None

    def col0(self, param_name: str, consumer: str = "wg") -> str:
        """Column offset of a consumer's block of a parameter's feature dim (0 without a split)."""
        width = self.split_width(param_name)
        return f"(colcta * {self.schedule.consumers} + {consumer}) * {width}" if width else "0"

    @property
    def column_ctas(self) -> int:
        """CTAs the split cuts each head's columns into (each CTA's consumers take one block each)."""
        blocks = column_blocks(self.schedule.split, self.full_dims)
        return blocks // self.schedule.consumers if self.schedule.consumer_axis == "columns" else blocks

    # -- the producer -------------------------------------------------------------
    def tma_loads(self, op: Op, dst: str, bar: str, indent: str) -> list[str]:
        """The TMA copies of one tile load (one per 64-column panel and, for a split parameter,
        per consumer), completing on ``bar``."""
        name = op.attrs["param"]
        t = op.result.type
        self.tmap_rows[name] = t.rows
        lines = []
        for consumer in range(self.schedule.consumers if self.per_consumer(op) else 1):
            idx = [self.block_expr(consumer) if self.split_loop is not None and v is self.split_loop.index
                   else self.index_name[v.id] for v in op.operands]
            for panel in range(t.cols // PANEL):
                at = f"{dst} + {consumer * t.rows * t.cols * 2 + panel * t.rows * 128}"
                rank, coords = self.tma_coords(name, idx, t, panel, str(consumer), self.producer_head(op, consumer))
                lines.append(f"{indent}tm::tma_load_{rank}({at}, &tmap_{name}, {bar}, {coords});")
        return lines

    def tma_coords(self, name: str, idx: list[str], t, panel: int, consumer: str = "wg",
                   head: str | None = None) -> tuple[str, str]:
        """TMA rank and box coordinates (innermost first) of 64-column panel ``panel`` of tile ``t``
        of parameter ``name`` at block indices ``idx``, for head ``head`` (default: this consumer's
        ``h``)."""
        param = self.p.param(name)
        if param.spec.kind == "matrix":
            return "2d", f"{idx[1]} * {t.cols} + {panel * PANEL}, {idx[0]} * {t.rows}"
        if head is None:
            head = "h / (H / G)" if param.spec.kind == "group_seq" else "h"
        elif param.spec.kind == "group_seq":
            head = f"{head} / (H / G)"
        return "4d", f"{self.col0(name, consumer)} + {panel * PANEL}, {head}, {idx[0]} * {t.rows}, b"

    def producer_head(self, op: Op, consumer: int) -> str:
        """The head whose data ``op`` loads for consumer ``consumer``, as the producer names it: ``h``;
        with consumers over heads (the producer has no ``h``) the consumer's own where each loads its
        copy, else the CTA's first."""
        if not self.heads:
            return "h"
        C = self.schedule.consumers
        return f"(hcta * {C} + {consumer})" if self.per_consumer(op) else f"(hcta * {C})"

    def col_source(self, op: Op, consumer: int) -> str:
        """Address of the (b, head) slice of the per-token vector ``op`` loads, for consumer ``consumer``."""
        return f"ptr_{op.attrs['param']} + (long)b * T * H + {self.producer_head(op, consumer)}"

    def col_copies(self, op: Op, dst: str, threads: int, tid: str) -> list[str]:
        """The 4-byte cp.async copies of one per-token vector of the chunk (one per consumer where
        each loads its own), by ``threads`` threads numbered ``tid``."""
        rows = op.result.type.rows
        index = self.index_name[op.operands[0].id]
        return [f"tm::load_col_async<{rows}, {threads}>((float*)({dst} + {consumer * rows * 4}), "
                f"{self.col_source(op, consumer)}, H, {index} * {rows}, T, {tid});"
                for consumer in range(self.schedule.consumers if self.per_consumer(op) else 1)]

    def producer(self, stage_bytes: int, offsets: dict[Op, int]) -> list[str]:
        # One thread issues the TMA loads; with per-token vectors in the ring its warp copies those,
        # each lane arriving on the stage's barrier once its copies land (the barrier expects them).
        lanes = bool(self.col_loads)
        leader = "threadIdx.x == 0"
        out = [f"    if ({'threadIdx.x < 32' if lanes else leader}) {{"]
        if self.prologue_loads:
            total = sum(self.load_bytes(op) for op in self.prologue_loads)
            copies = [f"tm::mbar_expect_tx(prologue, {total});"]
            for op in self.prologue_loads:
                copies += self.tma_loads(op, f"smem + {self.prologue_offset[op]}", "prologue", "")
            out += [f"      if ({leader}) {{", *["        " + line for line in copies], "      }"] if lanes else \
                ["      " + line for line in copies]
        if self.loop is not None:
            stages = self.schedule.stages
            out += ["      " + line for line in self.first_chunk(self.loop)]
            out.append(f"      const int n_iter = {self.trip_count(self.loop)};")
            out.append("      for (int c = 0; c < n_iter; ++c) {")
            out.append(f"        int stage = c % {stages};")
            out.append(f"        if (c >= {stages}) tm::mbar_wait(&empty[stage], ((c / {stages}) - 1) & 1);")
            tiles = [f"tm::mbar_expect_tx(&full[stage], {stage_bytes});"]
            for op in self.loads:
                tiles += self.tma_loads(op, f"smem + stage * {stage_bytes} + {offsets[op]}", "&full[stage]", "")
            if lanes:
                for op in self.col_loads:
                    dst = f"smem + {self.col_ring} + stage * {self.col_stage_bytes} + {self.col_offset[op]}"
                    out += ["        " + line for line in self.col_copies(op, dst, 32, "threadIdx.x")]
                out.append("        tm::cp_async_arrive(&full[stage]);")
                out += [f"        if ({leader}) {{", *["          " + line for line in tiles], "        }"]
            else:
                out += ["        " + line for line in tiles]
            out.append("      }")
        out.append("    }")
        return out

    def load_bytes(self, op: Op) -> int:
        t = op.result.type
        size = 4 if t.cols == 1 else 2  # per-token vectors are fp32
        return t.rows * t.cols * size * (self.schedule.consumers if self.per_consumer(op) else 1)

    # -- the consumer ---------------------------------------------------------------
    def lower_ops(self, ops: list[Op], ind: int):
        for op in ops:
            if isinstance(op, Loop) and op.kind == "blocks":
                self.lower_ops(op.body, ind)  # a grid loop: its index comes from blockIdx
            elif isinstance(op, Loop):
                self.in_loop = True
                self.lower_loop(op, ind)
                self.in_loop = False
            else:
                self.lower_op(op, ind)
                if op not in self.absorbed:
                    self.lowered.add(op)

    def lower_loop(self, loop: Loop, ind: int):
        self.wait_for(loop.init, ind)
        for carried, init in zip(loop.carried, loop.init):
            self.emit(f"{_ctype(carried.type)} {self.name(carried)} = {self.reg(init, ind)};", ind)
        for line in self.first_chunk(loop):
            self.emit(line, ind)
        self.emit(f"const int n_iter = {self.trip_count(loop)};", ind)
        self.emit("for (int c = 0; c < n_iter; ++c) {", ind)
        self.emit(f"int stage = c % {self.schedule.stages};", ind + 2)
        self.emit(f"tm::mbar_wait(&full[stage], (c / {self.schedule.stages}) & 1);", ind + 2)
        # Leave this chunk's wgmmas running (and release its stage next time) only when they write
        # carried accumulators that nothing but wgmma touches; if other instructions define those
        # registers inside the loop, ptxas serialises every wgmma of the kernel. (And only with two
        # stages or more: with one, the producer needs this stage back before it can load the chunk
        # the next iteration waits for — a deadlock the tuner found.)
        only_wgmma = {self.name(v) for v in loop.carried if self.uses[v] == 1
                      and any(x is v and self.reuses(x, add) for add, (_, x) in self.accumulate.items())}
        order = self.body_order(loop)
        may_defer = self.asynchronous and self.schedule.stages > 1 and self.overlaps(loop, order, only_wgmma)
        # so the previous iteration may have left groups writing those in flight
        self.carried_over = set(only_wgmma) if may_defer else set()
        self.in_flight = []
        self.lower_ops(order, ind + 2)
        for carried, update in zip(loop.carried, loop.update):
            if self.name(carried) != self.names.get(update):
                self.wait_for([update], ind + 2)
                self.emit(f"{self.name(carried)} = {self.reg(update, ind + 2)};", ind + 2)
        groups = len(self.in_flight)
        deferred = may_defer and groups > 0 and {*self.in_flight, *self.carried_over} <= only_wgmma
        if groups and not deferred:
            self.wait_all(ind + 2)
        if deferred:
            self.emit(f"tm::wgmma_wait<{groups}>();  // the previous chunk's groups are done", ind + 2)
            self.emit(f"if (c > 0) tm::mbar_arrive(&empty[(c - 1) % {self.schedule.stages}]);", ind + 2)
        else:
            self.emit("tm::mbar_arrive(&empty[stage]);", ind + 2)
        self.emit("}", ind)
        if deferred:
            self.emit("tm::wgmma_wait<0>();", ind)
        self.in_flight.clear()
        self.carried_over.clear()
        self.reg_of = {v: n for v, n in self.reg_of.items() if v not in self.smem_of}
        for result, carried in zip(loop.results, loop.carried):
            self.names[result] = self.name(carried)

    def body_order(self, loop: Loop) -> list[Op]:
        """The chunk loop's ops in the order they are lowered: program order for synchronous
        matmuls, else wgmma groups issued early and waited for late (``issue_order``)."""
        issue = self.schedule.issue
        if issue not in ISSUE_ORDERS:
            self.fail(f"Schedule.issue is one of {', '.join(map(repr, ISSUE_ORDERS))}, not {issue!r}")
        if not self.asynchronous or issue == "program":
            return loop.body
        return issue_order(loop.body, absorbed=self.absorbed_by,
                           last_reader={v: op for v, op in self.last_reader.items() if self.tile_registers(v)},
                           issues_group=self.issues_group, waits_for=self.waits_for,
                           in_registers=self.tile_registers if issue == "fit" else None,
                           capacity=self.consumer_registers - OVERLAP_RESERVE,
                           state_last=loop.update if self.schedule.consumers == 1 else ())

    @property
    def absorbed_by(self) -> dict[Op, Op]:
        """Each absorbed matmul -> the add it is emitted with."""
        return {mm: add for add, (mm, _) in self.accumulate.items()}

    def tile_registers(self, v: Value) -> int:
        """Registers a thread holds of ``v``: none for tiles in shared memory (loads, row views)."""
        return 0 if v in self.shared_rows or v in self.loaded_tiles else thread_registers(v.type)

    @property
    def consumer_registers(self) -> int:
        """Registers a consumer thread has (``setmaxnreg``): the producer gives its share away, 64K per SM in all."""
        return CONSUMER_REGISTERS[self.schedule.consumers == 1]

    def overlaps(self, loop: Loop, order: list[Op], carried: set[str]) -> bool:
        """``Schedule.overlap`` for this chunk loop walked in ``order``, whose groups writing the
        ``carried`` tiles may run on into the next chunk ("fit": where ``overlap_registers`` and
        ``OVERLAP_RESERVE`` for addresses and indices fit the consumer's registers)."""
        overlap = self.schedule.overlap
        if overlap not in OVERLAPS:
            self.fail(f"Schedule.overlap is one of {', '.join(map(repr, OVERLAPS))}, not {overlap!r}")
        if overlap != "fit":
            return overlap == "on"
        return self.overlap_registers(loop, order, carried) + OVERLAP_RESERVE <= self.consumer_registers

    def overlap_registers(self, loop: Loop, order: list[Op], carried: set[str]) -> int:
        """Registers a thread's tiles need with the chunk's last groups overlapping the next chunk:
        the body's peak of register tiles (``peak_registers``) and those groups' register operands
        (bf16 fragments, live until the next chunk's first wait)."""
        units = [op for op in order if op not in self.absorbed]
        reads = unit_reads(units, self.absorbed_by)
        held = [mm.operands[0] for add, (mm, x) in self.accumulate.items()
                if add in reads and self.name(x) in carried and not mm.attrs["ta"]]
        return peak_registers(units, reads, self.tile_registers) + sum(map(self.tile_registers, held)) // 2

    def issues_group(self, op: Op) -> bool:
        """Whether lowering ``op`` commits a wgmma group (a matvec is a row sum, done at once)."""
        mm = self.accumulate[op][0] if op in self.accumulate else op
        if mm.name != "matmul":
            return False
        return mm.result.type.cols > 1 or mm.attrs["ta"]

    def waits_for(self, op: Op) -> list[Value]:
        """The values lowering ``op`` waits for if a wgmma group is still writing them: its operands,
        an accumulating add's matmul operands, less the accumulator it adds into in place."""
        if op in self.accumulate:
            mm, x = self.accumulate[op]
            return [*mm.operands, *([] if self.reuses(x, op) else [x])]
        return list(op.operands)

    def lower_op(self, op: Op, ind: int):
        a = op.attrs
        name = op.name
        if op in self.absorbed:
            return  # emitted by the add it accumulates into
        if op in self.accumulate:
            self.lower_accumulate(op, ind)
            return
        args = op.operands
        decl = f"{_ctype(op.result.type)} {{}};" if op.result is not None else ""
        if op.result is not None and name != "matmul" and (name in _UNARY or name in _BINARY or name in _ELEMENTWISE):
            donor = next((x for x in args if self.reuses(x, op)), None)
            if donor is not None:  # write in place: no new registers
                self.names[op.result] = self.names[donor]
                decl = ""
        if name != "matmul":
            self.wait_for(args, ind)
        out = self.name(op.result) if op.result is not None else None
        decl = decl.format(out)
        if name == "load":
            param = self.p.param(a["param"])
            t = op.result.type
            if t.cols > 1:
                mine = f" + wg * {t.rows * t.cols * 2}" if self.per_consumer(op) else ""
                if op in self.prologue_offset:
                    if not self.prologue_waited:
                        self.emit("tm::mbar_wait(prologue, 0);", ind)
                        self.prologue_waited = True
                    base = f"smem + {self.prologue_offset[op]}"
                else:
                    base = f"smem + stage * stage_bytes + {self.load_offset[op]}"
                self.smem_of[op.result] = (f"({base}{mine})", t.rows)
                return
            if param.spec.kind != "seq":
                self.fail("vector loads are implemented for Seq[1] parameters", op)
            if op in self.col_offset:  # copied into the ring with the chunk's tiles
                mine = f" + wg * {t.rows * 4}" if self.per_consumer(op) else ""
                at = f"smem + {self.col_ring} + stage * {self.col_stage_bytes} + {self.col_offset[op]}{mine}"
                self.emit(f"{decl} tm::load_col_shared({out}, (const float*)({at}));", ind)
                self.ring_vector[op.result] = at
                return
            row0 = f"{self.index_name[args[0].id]} * {t.rows}"
            self.emit(f"{decl} tm::load_col({out}, ptr_{param.name} + (long)b * T * H + h, H, {row0}, T);", ind)
        elif name == "store":
            self.lower_store(op, ind)
        elif name == "read_param":
            if op.result.type.cols != 1:
                self.fail("Head parameters wider than 1 are not lowered yet", op)
            self.emit(f"{decl} tm::fill({out}, ptr_{a['param']}[h]);", ind)
        elif name == "scalar_param":
            self.emit(f"{decl} tm::fill({out}, arg_{a['param']});", ind)
        elif name == "load_state":
            t = op.result.type
            width = self._state_ld(a["param"])
            if a["initial"]:
                self.emit(f"{decl} tm::load_f32({out}, init_{a['param']} + ((long)b * H + h) * {t.rows * width} + "
                          f"{self.col0_state(a['param'])}, {width});", ind)
            else:
                self.emit(f"{decl} tm::fill({out}, 0.0f);", ind)
        elif name == "store_state":
            t = args[0].type
            width = self._state_ld(a["param"])
            self.emit(f"if (final_{a['param']}) tm::store_f32(final_{a['param']} + ((long)b * H + h) * "
                      f"{t.rows * width} + {self.col0_state(a['param'])}, {width}, {self.reg(args[0], ind)});", ind)
        elif name == "full":
            self.emit(f"{decl} tm::fill({out}, {_float(a['value'])});", ind)
        elif name in _UNARY:
            self.emit(f"{decl} tm::map1({out}, {_UNARY[name]}, {self.reg(args[0], ind)});", ind)
        elif name == "pow":
            body = " * ".join(["a"] * a["n"])
            self.emit(f"{decl} tm::map1({out}, [](float a) {{ return {body}; }}, {self.reg(args[0], ind)});", ind)
        elif name in _BINARY:
            self.emit(f"{decl} tm::map2({out}, [](float a, float b) {{ return {_BINARY[name]}; }}, "
                      f"{self.elementwise(args[0], ind)}, {self.elementwise(args[1], ind)});", ind)
        elif name == "where":
            self.emit(f"{decl} tm::map3({out}, [](float c, float a, float b) {{ return c != 0.0f ? a : b; }}, "
                      f"{', '.join(self.reg(x, ind) for x in args)});", ind)
        elif name == "cast":
            flag = "true" if a["dtype"] is DType.bf16 else "false"
            fn = "[](float a) { return a; }" if a["dtype"] is DType.f32 else \
                f"[](float a) {{ return tm::round16<{flag}>(a); }}"
            self.emit(f"{decl} tm::map1({out}, {fn}, {self.reg(args[0], ind)});", ind)
        elif name in ("causal", "window", "in_seq"):
            self.lower_mask(op, decl, out, ind)
        elif name in ("rowsum", "rowmax"):
            red = "tm::op_sum()" if name == "rowsum" else "tm::op_max()"
            self.emit(f"{decl} tm::reduce_rows({out}, {self.reg(args[0], ind)}, {red});", ind)
        elif name == "colsum" and args[0] in self.scanned:  # the scan's last row: no exchange of its own
            self.emit(f"{decl} tm::fill({out}, {self.scan(args[0], ind)}[{2 * args[0].type.rows - 1}]);", ind)
        elif name in ("colsum", "colmax"):
            red = "tm::op_sum()" if name == "colsum" else "tm::op_max()"
            buffer = self.scratch(4 * args[0].type.cols)
            self.emit(f"{decl} tm::reduce_cols({out}, {self.reg(args[0], ind)}, {red}, {buffer}, {self.bar});", ind)
        elif name == "transpose":
            t = args[0].type
            if t.rows != 1 and t.cols != 1:
                self.fail(f"a {t.rows}x{t.cols} tile is transposed only as a matmul operand (a.T @ b); "
                          "standalone transposes are lowered for row and column vectors", op)
            if t.rows == 1 and t.cols == 1:
                self.emit(f"{decl} {out} = {self.reg(args[0], ind)};", ind)
            elif op.result in self.shared_rows:
                self.emit(f"const tm::shared_row<{t.rows}> {out}{{(const float*)({self.ring_vector[args[0]]})}};", ind)
            else:
                buffer = self.scratch(max(t.rows, t.cols), "transposed")
                self.emit(f"{decl} tm::transpose({out}, {self.reg(args[0], ind)}, {buffer}, {self.bar});", ind)
        elif name == "cumsum" and args[0].type.cols > 1:
            t = args[0].type
            buffer = self.scratch(4 * t.cols * (t.rows // 64))
            self.emit(f"{decl} tm::cumsum_rows({out}, {self.reg(args[0], ind)}, {str(a['reverse']).lower()}, "
                      f"{str(a['exclusive']).lower()}, {buffer}, {self.bar});", ind)
        elif name == "cumsum":
            self.emit(f"{decl} tm::cumsum({out}, {self.scan(args[0], ind)}, {str(a['reverse']).lower()}, "
                      f"{str(a['exclusive']).lower()});", ind)
        elif name == "segsum":
            self.emit(f"{decl} tm::segsum({out}, {self.scan(args[0], ind)});", ind)
        elif name == "matmul":
            self.lower_matmul(op, decl, out, ind)
        else:
            self.fail(f"op {name!r} is not lowered yet", op)

    def lower_store(self, op: Op, ind: int):
        """A tile store: each 64-column panel goes through one of this consumer's shared panel
        buffers (two, alternating, for wide tiles) and leaves by TMA (asynchronous, clipped at the
        tensor's edges), while the consumer goes on."""
        value, *index = op.operands
        name, t = op.attrs["param"], value.type
        if t.cols == 1 and self.p.param(name).spec.kind == "seq":  # one fp32 value per token
            row0 = f"{self.index_name[index[0].id]} * {t.rows}"
            self.wait_for([value], ind)
            self.emit(f"tm::store_col(out_{name} + (long)b * T * H + h, H, {row0}, T, {self.reg(value, ind)});", ind)
            return
        if t.cols % PANEL:
            self.fail(f"stored tiles are {t.cols} wide; sm_90a stores need multiples of {PANEL} columns", op)
        self.tmap_rows[name] = t.rows
        src, panel_bytes = self.reg(value, ind), self.store_rows * 128
        leader = f"threadIdx.x % {CONSUMER_THREADS} == 0"
        idx = [self.index_name[v.id] for v in index]
        for panel in range(t.cols // PANEL):
            buf = f"(smem + {self.store_offset + panel % self.store_buffers * panel_bytes} + wg * " \
                  f"{panel_bytes * self.store_buffers})"
            in_flight = 0 if panel == 0 else self.store_buffers - 1  # earlier stores may use either buffer
            self.emit(f"if ({leader}) tm::bulk_wait_read<{in_flight}>();  // this buffer is free again", ind)
            self.emit(f"tm::sync_threads({self.bar}, {CONSUMER_THREADS});", ind)
            self.emit(f"tm::store_panel<{self.is_bf16}, {panel}>({buf}, {src});", ind)
            self.emit("tm::fence_proxy_async();", ind)
            self.emit(f"tm::sync_threads({self.bar}, {CONSUMER_THREADS});", ind)
            rank, coords = self.tma_coords(name, idx, t, panel)
            self.emit(f"if ({leader}) {{ tm::tma_store_{rank}(&tmap_{name}, {buf}, {coords}); tm::bulk_commit(); }}",
                      ind)

    def _state_ld(self, param_name: str) -> int:
        spec = self.p.param(param_name).spec
        dim = spec.dims[1]
        return dim if isinstance(dim, int) else self.full_dims[dim]

    def col0_state(self, param_name: str) -> str:
        spec = self.p.param(param_name).spec
        split = dict(self.schedule.split)
        if spec.dims[0] in split:
            self.fail(f"state {param_name!r} cannot be split along its rows ({spec.dims[0]})")
        width = split.get(spec.dims[1])
        return f"(colcta * {self.schedule.consumers} + wg) * {width}" if width else "0"

    def lower_mask(self, op: Op, decl: str, out: str, ind: int):
        t = op.result.type
        col = f"({self.index_name[t.col_axis.index]} * {t.col_axis.size} + col)"
        if op.name == "in_seq":
            keep = f"{col} < T"
        else:
            row = f"({self.index_name[t.row_axis.index]} * {t.row_axis.size} + row)"
            query, key = (col, row) if op.attrs.get("transposed") else (row, col)
            keep = f"{key} <= {query}"
            if op.name == "window":
                keep += f" && {key} > {query} - {op.attrs['size']}"
        # The masks keep a corner-bounded region, so a tile whose two far corners are kept is kept
        # whole: most chunks skip the per-element test.
        src, fn = self.reg(op.operands[0], ind), f"keep{op.result.id}"
        self.emit(f"auto {fn} = [&](int row, int col) {{ return {keep}; }};", ind)
        whole = f"{fn}(0, {t.cols - 1}) && {fn}({t.rows - 1}, 0)"
        masked = f"tm::mask({out}, {src}, {fn}, {_float(op.attrs['fill'])});"
        if out == src:
            self.emit(f"if (!({whole})) {masked}", ind)
        else:
            self.emit(decl, ind)
            self.emit(f"if ({whole}) {out} = {src}; else {masked}", ind)

    def lower_accumulate(self, add: Op, ind: int):
        """``x + a @ b``: the wgmma accumulates into ``x``'s registers (or a copy of ``x``)."""
        mm, x = self.accumulate[add]
        if self.reuses(x, add):
            self.names[add.result] = self.name(x)  # in place; in-flight groups on x stay ordered
        else:
            self.wait_for([x], ind)
            self.emit(f"{_ctype(add.result.type)} {self.name(add.result)} = {self.reg(x, ind)};", ind)
        self.lower_matmul(mm, "", self.name(add.result), ind, accumulate=True)
        self.lowered.add(mm)

    def lower_matvec(self, op: Op, decl: str, out: str, ind: int, accumulate: bool):
        """``a @ x`` with x a column (or ``a @ y.T``, y a row): products along the rows and a row sum,
        operands rounded to 16 bits as a matmul's are."""
        a, b = op.operands
        self.wait_for([a, b], ind)
        k, tag = a.type.cols, f"mv{op.result.id}"
        round16 = f"[](float v) {{ return tm::round16<{self.is_bf16}>(v); }}"
        row = self.reg(b, ind)
        if not op.attrs["tb"]:  # a column: as a row
            buffer = self.scratch(k, "transposed")
            self.emit(f"tm::rt<1, {k}> {tag}_row; tm::transpose({tag}_row, {row}, {buffer}, {self.bar});", ind)
            row = f"{tag}_row"
        self.emit(f"tm::rt<1, {k}> {tag}_b; tm::map1({tag}_b, {round16}, {row});", ind)
        self.emit(f"{_ctype(a.type)} {tag}_p; tm::map1({tag}_p, {round16}, {self.reg(a, ind)});", ind)
        self.emit(f"tm::map2({tag}_p, [](float x, float y) {{ return x * y; }}, {tag}_p, {tag}_b);", ind)
        if accumulate:
            self.emit(f"{_ctype(op.result.type)} {tag}_s; tm::reduce_rows({tag}_s, {tag}_p, tm::op_sum());", ind)
            self.emit(f"tm::map2({out}, [](float x, float y) {{ return x + y; }}, {out}, {tag}_s);", ind)
        else:
            self.emit(decl, ind)
            self.emit(f"tm::reduce_rows({out}, {tag}_p, tm::op_sum());", ind)

    def lower_matmul(self, op: Op, decl: str, out: str, ind: int, accumulate: bool = False):
        a, b = op.operands
        ta, tb = op.attrs["ta"], op.attrs["tb"]
        t = op.result.type
        m, n = t.rows, t.cols
        k = a.type.rows if ta else a.type.cols
        if n == 1 and not ta:
            self.lower_matvec(op, decl, out, ind, accumulate)
            return
        if m % 64 or n % 64 or k % 16:
            self.fail(f"matmuls take M and N in multiples of 64 and K of 16; this one is {m}x{k} @ {k}x{n}", op)
        b_ptr, b_rows = self.shared(b, ind)
        acc = str(accumulate).lower()
        if not ta and a not in self.smem_of:
            a_reg = self.reg(a, ind)
            self.wait_for([a], ind)
            if decl:
                self.emit(decl, ind)
            self.emit(f"{self.matmul_rs}<{self.is_bf16}, {str(tb).lower()}, {acc}, {b_rows}>({out}, {a_reg}, "
                      f"{b_ptr});", ind)
        else:
            a_ptr, a_rows = self.shared(a, ind)
            if decl:
                self.emit(decl, ind)
            self.emit(f"{self.matmul_ss}<{self.is_bf16}, {str(ta).lower()}, {str(tb).lower()}, {acc}, {a_rows}, "
                      f"{b_rows}, {m}, {n}, {k}>({out}, {a_ptr}, {b_ptr});", ind)
        if self.asynchronous:
            self.in_flight.append(out)

    # -- the whole kernel ---------------------------------------------------------------
    def grid_decode(self) -> list[str]:
        """blockIdx.x: a head's column block fastest (the CTAs of one head run side by side and
        read its shared tiles, linear attention's q and k, through L2 once), then the grid loops'
        indices, innermost fastest, then batch x head (no 65535 limit on B·H as grid y would have)."""
        grid = ["  int rest = blockIdx.x;"]
        if self.column_ctas > 1:
            grid.append(f"  const int colcta = rest % {self.column_ctas}; rest /= {self.column_ctas};")
        elif self.schedule.split:
            grid.append("  const int colcta = 0;  // the CTA's consumers take every column block")
        for depth in reversed(range(len(self.grid_loops))):
            loop = self.grid_loops[depth]
            size = loop.size * (self.schedule.consumers if loop is self.split_loop else 1)
            count = f"((({loop.dim}) + {size - 1}) / {size})"
            var = "cta" if loop is self.split_loop else "blk"
            grid.append(f"  const int {var}{depth} = rest % {count}; rest /= {count};")
        if self.matrix:
            return grid
        if self.heads:  # consumer wg runs head hcta * consumers + wg
            C = self.schedule.consumers
            grid.append(f"  const int b = rest / (H / {C}), hcta = rest % (H / {C});")
        else:
            grid.append("  const int b = rest / H, h = rest % H;")
        return grid

    def plan_loads(self) -> int:
        """Shared memory for the loaded tiles: the ring of stages first (each holding every tile the
        chunk loop loads), then the tiles loaded once before it. Returns the bytes of one stage."""
        stage_bytes = 0
        self.load_offset = {}
        for op in self.loads:
            self.load_offset[op] = stage_bytes
            stage_bytes += self.load_bytes(op)
        self.smem_top = stage_bytes * self.schedule.stages
        for op in self.prologue_loads:
            self.prologue_offset[op] = self.alloc(self.load_bytes(op))
        self.col_offset, self.col_stage_bytes = {}, 0  # the per-token vectors' ring, stage by stage
        for op in self.col_loads:
            self.col_offset[op] = self.col_stage_bytes
            self.col_stage_bytes += self.load_bytes(op)
        self.col_ring = self.alloc(self.col_stage_bytes * self.schedule.stages, 16) if self.col_loads else 0
        return stage_bytes

    def run(self) -> KernelSource:
        self.analyze()
        stage_bytes = self.plan_loads()
        offsets = self.load_offset
        stores = [op for op in self.p.walk() if op.name == "store" and op.operands[0].type.cols > 1]  # by TMA
        self.store_rows = max((op.operands[0].type.rows for op in stores), default=0)
        self.store_buffers = min(2, max((op.operands[0].type.cols // PANEL for op in stores), default=1))
        self.store_offset = self.alloc(self.store_rows * 128 * self.store_buffers * self.schedule.consumers)
        body_start = len(self.lines)
        self.lower_ops(self.p.body, 6)
        consumer = self.lines[body_start:]
        scratch = self.scratch_base()
        full_arrivals = "33);  // the TMA leader and 32 copying lanes" if self.col_loads else "1);"
        bar_off = self.alloc(16 * self.schedule.stages + 8, 8)
        grid = self.grid_decode()
        args, order = self.param_args()
        consumers = self.schedule.consumers
        threads = PRODUCER_THREADS + CONSUMER_THREADS * consumers
        # registers: the producer gives its share to the consumers (64K per SM in all)
        producer_regs, consumer_regs = PRODUCER_REGISTERS[consumers == 1], self.consumer_registers
        name = f"tilemix_{self.p.name}"
        src = [
            "#include <tilemix/hopper.cuh>",
            "",
            f'extern "C" __global__ void __launch_bounds__({threads}, 1)',
            f"{name}({', '.join(args)}) {{",
            "  extern __shared__ __align__(1024) char smem[];",
            f"  const int stage_bytes = {stage_bytes};",
            f"  tm::u64* full = (tm::u64*)(smem + {bar_off});",
            f"  tm::u64* empty = full + {self.schedule.stages};",
            f"  tm::u64* prologue = empty + {self.schedule.stages};",
            *grid,
            "  if (threadIdx.x == 0) {",
            f"    for (int s = 0; s < {self.schedule.stages}; ++s) {{",
            f"      tm::mbar_init(&full[s], {full_arrivals}",
            f"      tm::mbar_init(&empty[s], {CONSUMER_THREADS * consumers});",
            "    }",
            "    tm::mbar_init(prologue, 1);",
            "    tm::fence_barrier_init();",
            "  }",
            "  __syncthreads();",
            f"  if (threadIdx.x < {PRODUCER_THREADS}) {{",
            f"    tm::setmaxnreg_dec<{producer_regs}>();",
            *self.producer(stage_bytes, offsets),
            "  } else {",
            f"    tm::setmaxnreg_inc<{consumer_regs}>();",
            f"    const int wg = threadIdx.x / {CONSUMER_THREADS} - 1;  // this consumer's column block",
            *([f"    const int blk{len(self.grid_loops) - 1} = {self.block_expr('wg')};  // and its grid block"]
              if self.split_loop is not None else []),
            *([f"    const int h = hcta * {consumers} + wg;  // and its head"] if self.heads else []),
            "    const int bar_id = 1 + wg;",
            *("    " + line for line in scratch),
            *consumer,
            *([f"    if (threadIdx.x % {CONSUMER_THREADS} == 0) tm::bulk_wait<0>();  // stores done"]
              if stores else []),
            "  }",
            "}",
        ]
        if self.smem_top > SMEM_LIMIT:
            raise ResourceError(f"sm_90a code generator: this schedule needs {self.smem_top // 1024} KiB of "
                                f"shared memory (stages={self.schedule.stages}, consumers={consumers}); an "
                                f"sm_90a CTA has at most {SMEM_LIMIT // 1024} KiB", self.p.loc)
        return KernelSource(name, "\n".join(src) + "\n", self.smem_top, stage_bytes, threads, self.schedule, order,
                            [(loop.dim, loop.size * (consumers if loop is self.split_loop else 1))
                             for loop in self.grid_loops], self.size_args,
                            dict(self.tmap_rows), self.matrix, self.column_ctas)


def _float(x: float) -> str:
    if x == float("-inf"):
        return "tm::f_neg_inf()"
    if x == float("inf"):
        return "(-tm::f_neg_inf())"
    return f"{x!r}f"


def lower_hopper(program: Program, schedule: Schedule | None = None,
                 full_dims: dict[str, int] | None = None) -> KernelSource:
    """CUDA C++ for ``program``. With a column split the program is traced at
    the split widths and ``full_dims`` gives the tensors' real sizes."""
    return _Lowering(program, schedule or Schedule(), full_dims or dict(program.dims)).run()
