"""Lowering of tile programs to generic tensor-core kernels (sm_80/86/89, and sm_90 when forced).

The same IR, the same passes and consumer walk as the sm_90a lowering (a sibling ``Lowering``
target), with what the target lacks done otherwise:

- no warp specialisation: a CTA is ``Schedule.consumers`` groups of 128 threads, each running one
  program instance on register tiles in the same layout as on Hopper (hopper.cuh's ``tm::rt``,
  which per warp is the mma.sync m16n8 accumulator layout), so every elementwise op, mask,
  reduction and scan lowers to the same tile-library call;
- loads: every thread of the CTA issues ``cp.async`` copies into the 128-byte-swizzled shared
  layout TMA would write, the chunk loop's loads into a ring of ``stages`` buffers filled
  ``stages - 1`` chunks ahead (one commit group per chunk, ``cp.async.wait_group`` and
  ``__syncthreads`` at the top of each iteration; that barrier also frees the stage the next
  loads overwrite), the tiles before the loop once;
- matmuls: ``ldmatrix`` (``.trans`` for the MN-major operands) + ``mma.sync.m16n8k16``, A from
  shared memory or straight from registers, synchronous (no wgmma groups to wait for);
- stores: each 64-column panel through a swizzled shared panel (``tm::store_panel``) and out with
  16-byte global writes, clipped at the tensor's edges.

Kernel arguments are plain pointers where Hopper passes tensor maps (``ParamKind.PTR``/``PTR_OUT``
in ``KernelSource.params``).

Schedules are the Hopper ones (``default_schedule`` with the arch), fitted to the arch's
shared memory: on sm_86/sm_89 (99 KiB) most scans get one group per CTA and a one-stage ring (no
load/compute overlap), with staging buffers shared where nothing fits otherwise; programs whose
tiles need more than that even then (gla-style 128x128 states) are a ResourceError there.
``tilemix tune --target generic`` tunes these kernels, cached apart from Hopper's."""

from __future__ import annotations

from tilemix.tiles.ir import Loop, Op, Program

from .emit import ctype
from .knobs import SMEM_LIMITS, Schedule, launch_registers, smem_limit
from .lowering import Lowering, lower
from .op_emitters import OP_EMITTERS, store_entry
from .source import KernelSource, ParamKind
from .structure import CONSUMER_THREADS, PANEL

__all__ = ["GENERIC_ARCHS", "lower_generic", "GenericLowering"]

GENERIC_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


def emit_store_copy(lw: GenericLowering, op: Op, decl: str, out: str, ind: int):
    """A tile store: each 64-column panel into this group's shared panel, then out in 16-byte
    writes, clipped at the tensor's edges."""
    value, *index = op.operands
    name, t = op.attrs["param"], value.type
    src = lw.reg(value, ind)
    idx = [lw.plan.index_name[v.id] for v in index]
    dst, ld, rows_left, cols_left = lw.tile_at(name, idx, t.rows, t.cols, out=True)
    buf = f"(smem + {lw.layout.store_offset} + wg * {lw.layout.store_rows * 128})"
    for panel in range(t.cols // PANEL):
        lw.emit(f"tm::sync_threads({lw.bar}, {CONSUMER_THREADS});  // the panel buffer is free", ind)
        lw.emit(f"tm::store_panel<{lw.is_bf16}, {panel}>({buf}, {src});", ind)
        lw.emit(f"tm::sync_threads({lw.bar}, {CONSUMER_THREADS});", ind)
        lw.emit(f"tm::copy_panel_out<{t.rows}>({dst} + {panel * PANEL}, {ld}, {rows_left}, "
                f"({cols_left}) - {panel * PANEL}, {buf});", ind)


class GenericLowering(Lowering):
    """mma.sync: every thread issues cp.async loads into a ring, matmuls synchronous."""

    matmul_ss = "tm::matmul_sync_ss"
    matmul_rs = "tm::matmul_sync_rs"
    proxy_fence = None  # ldmatrix reads shared memory like any load: the group's barrier orders it
    asynchronous = False  # nothing is ever in flight, and the chunk loop's ops keep program order
    consumer_heads = False  # loads are issued per consumer group, not per head
    store_buffers = 1
    emitters = {**OP_EMITTERS, "store": store_entry(emit_store_copy)}

    def __init__(self, *plans, arch: str, varlen: bool = False):
        super().__init__(*plans, varlen=varlen)
        self.arch = arch
        self.threads = CONSUMER_THREADS * self.schedule.consumers

    @classmethod
    def consumer_registers(cls, schedule: Schedule) -> int:
        """Registers a thread has: ptxas's launch-bounds cap (the plans' reloads count against it)."""
        return launch_registers(CONSUMER_THREADS * schedule.consumers, schedule.occupancy)

    # -- arguments and loads ------------------------------------------------------------
    def param_args(self) -> tuple[list[str], list[tuple[ParamKind, str]]]:
        """The base arguments with each tensor map replaced by a pointer to the 16-bit tensor."""
        args, order = super().param_args()
        for i, (kind, name) in enumerate(order):
            if kind is ParamKind.TMAP:
                args[i], order[i] = f"const tm::u16* __restrict__ ptr_{name}", (ParamKind.PTR, name)
            elif kind is ParamKind.TMAP_OUT:
                args[i], order[i] = f"tm::u16* __restrict__ out_{name}", (ParamKind.PTR_OUT, name)
        return args, order

    def issue_load(self, op: Op, dst: str) -> list[str]:
        """The cp.async copies of one tile load (for a split parameter or a split grid loop, one
        per consumer), issued by every thread of the CTA."""
        plan, name, t = self.plan, op.attrs["param"], op.result.type
        lines = []
        for consumer in range(self.schedule.consumers if plan.per_consumer(op) else 1):
            idx = [plan.block_expr(consumer) if plan.split_loop is not None and v is plan.split_loop.index
                   else plan.index_name[v.id] for v in op.operands]
            src, ld, rows_left, cols_left = self.tile_at(name, idx, t.rows, t.cols, str(consumer))
            lines.append(f"tm::load_tile_async<{t.rows}, {t.cols}, {self.threads}>({dst} + "
                         f"{consumer * t.rows * t.cols * 2}, {src}, {ld}, {rows_left}, {cols_left}, threadIdx.x);")
        return lines

    def wait_prologue(self, ind: int):
        """The tiles loaded before the chunk loop are one commit group, the oldest. If only the
        loop reads them, its first wait (for chunk 0) waits for them too, and their latency
        overlaps the ring's first loads; otherwise wait here, before the ring is primed."""
        if not self.only_loop_reads(self.plan.prologue_loads):
            self.emit("tm::cp_async_wait<0>();", ind)
            self.emit("__syncthreads();", ind)

    def only_loop_reads(self, loads) -> bool:
        """Whether every reader of these loads' tiles is inside the program's one chunk loop's body,
        which waits for all earlier commit groups before its first iteration (a loop that may run
        no iteration, one with a start, waits for nothing, and with several loops: then no)."""
        if len(self.plan.loops) != 1 or self.plan.loops[0].start is not None:
            return False
        loop = self.plan.loops[0]
        tiles = {op.result for op in loads}
        inside = {id(op) for op in loop.walk()}
        return not any(v in tiles for op in self.program.walk() if id(op) not in inside
                       for v in (list(op.operands) + list(getattr(op, "init", []))))

    # -- the chunk loop -----------------------------------------------------------------
    def lower_loop(self, loop: Loop, ind: int):
        """The ring of ``stages`` buffers, filled ``stages - 1`` chunks ahead, one commit group a chunk.
        A loop after the first is a scope of its own, entered once every thread is done with the
        stages the loop before it read."""
        stages = self.schedule.stages
        for carried, init in zip(loop.carried, loop.init):
            self.emit(f"{ctype(carried.type)} {self.name(carried)} = {self.reg(init, ind)};", ind)
        position = self.plan.loops.index(loop)
        if position > 0:
            self.emit(f"{{  // chunks() loop {position + 1} of {len(self.plan.loops)}", ind)
            ind += 2
            self.emit("__syncthreads();  // the previous loop's stages are read by all", ind)
        for line in self.plan.first_chunk(loop):
            self.emit(line, ind)
        self.emit(f"const int n_iter = {self.plan.trip_count(loop)};", ind)
        self.emit_load_chunk(loop, ind)
        if stages > 1:
            self.emit(f"for (int c = 0; c < {stages - 1}; ++c) {{  // the ring's first chunks", ind)
            self.emit("if (c < n_iter) load_chunk(c);", ind + 2)
            self.emit("tm::cp_async_commit();", ind + 2)
            self.emit("}", ind)
        self.emit("for (int c = 0; c < n_iter; ++c) {", ind)
        # The copies of chunk c + stages - 1 go into the stage chunk c - 1 left, free once every
        # thread has passed the barrier below. With three stages or more they are issued at the end
        # of the body: an iteration starts on its math, and the copies issue while the tensor pipe
        # drains the body's last mma.syncs; a chunk still has stages - 2 iterations to land. With
        # two stages that would leave it none, so there they are issued first.
        late = stages > 2
        refill = [f"if (c + {stages - 1} < n_iter) load_chunk(c + {stages - 1});", "tm::cp_async_commit();"]
        if stages > 1:
            self.emit(f"tm::cp_async_wait<{stages - 2}>();  // chunk c has landed (this thread's copies)", ind + 2)
            self.emit("__syncthreads();  // everyone's copies; and chunk c - 1's stage is read by all", ind + 2)
            if not late:
                for line in refill:
                    self.emit(line, ind + 2)
        else:
            self.emit("__syncthreads();  // the previous chunk's stage is read by all", ind + 2)
            self.emit("load_chunk(c);", ind + 2)
            self.emit("tm::cp_async_commit();", ind + 2)
            self.emit("tm::cp_async_wait<0>();", ind + 2)
            self.emit("__syncthreads();", ind + 2)
        self.emit(f"const int stage = c % {stages};", ind + 2)
        self.lower_ops(list(self.issues[loop].order), ind + 2)
        for carried, update in zip(loop.carried, loop.update):
            if self.name(carried) != self.names.get(update):
                self.emit(f"{self.name(carried)} = {self.reg(update, ind + 2)};", ind + 2)
        if late:
            for line in refill:
                self.emit(line, ind + 2)
        self.emit("}", ind)
        if position > 0:
            self.emit("}", ind - 2)
        self.end_loop(loop)

    def emit_load_chunk(self, loop: Loop, ind: int):
        """``load_chunk(c)``: ``loop``'s loads of chunk c into stage c % stages, named after the
        loop's index as in the body."""
        layout, stages = self.layout, self.schedule.stages
        self.emit("auto load_chunk = [&](const int c) {", ind)
        self.emit(f"char* ring = smem + (c % {stages}) * stage_bytes;", ind + 2)
        for op in self.plan.loop_loads[loop]:
            for line in self.issue_load(op, f"ring + {layout.load_offset[op]}"):
                self.emit(line, ind + 2)
        for op in self.plan.loop_col_loads[loop]:  # the chunk's per-token vectors, in the same commit group
            dst = f"smem + {layout.col_ring} + (c % {stages}) * {layout.col_stage_bytes} + {layout.col_offset[op]}"
            for line in self.col_copies(op, dst, self.threads, "threadIdx.x"):
                self.emit(line, ind + 2)
        self.emit("};", ind)

    # -- the whole kernel -------------------------------------------------------------
    def kernel(self) -> KernelSource:
        prologue = []
        for op in self.plan.prologue_loads:
            prologue += ["  " + line for line in self.issue_load(op, f"(smem + {self.layout.prologue_offset[op]})")]
        if prologue:
            prologue.append("  tm::cp_async_commit();")
        self.lower_ops(self.program.body, 2)
        body = self.lines
        scratch = self.scratch_base()
        args, order = self.param_args()
        src = [
            "#include <tilemix/generic.cuh>",
            "",
            f'extern "C" __global__ void __launch_bounds__({self.threads}, {self.schedule.occupancy})',
            f"tilemix_{self.program.name}({', '.join(args)}) {{",
            "  extern __shared__ __align__(1024) char smem[];",
            f"  const int stage_bytes = {self.layout.stage_bytes};",
            *self.grid_decode(),
            f"  const int wg = threadIdx.x / {CONSUMER_THREADS};  // this group's program instance",
            *("  " + line for line in self.consumer_block()),
            "  const int bar_id = 1 + wg;",
            *("  " + line for line in scratch),
            *prologue,
            *body,
            "}",
        ]
        self.check_shared_memory(self.layout.top, smem_limit(self.arch, self.schedule.occupancy),
                                 f"a CTA on {self.arch}")
        return self.kernel_source(src, self.layout.top, self.threads, order, {})


def lower_generic(program: Program, arch: str = "sm_80", schedule: Schedule | None = None,
                  full_dims: dict[str, int] | None = None, varlen: bool = False) -> KernelSource:
    """CUDA C++ for ``program`` on the generic tensor-core target ``arch`` (one of
    ``GENERIC_ARCHS``). With a column split the program is traced at the split widths and
    ``full_dims`` gives the tensors' real sizes. ``varlen``: for a packed batch (``Lowering``)."""
    if arch not in SMEM_LIMITS:
        raise ValueError(f"generic code generator: arch {arch!r} is not one of {GENERIC_ARCHS}")
    return lower(GenericLowering, program, schedule or Schedule(), full_dims or dict(program.dims),
                 f"generic ({arch})", arch=arch, varlen=varlen)
