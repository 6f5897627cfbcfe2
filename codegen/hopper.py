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

Program shapes lowered: nested ``blocks`` grid loops around ``chunks`` loops
one after another (scans, attention, gemm; a bidirectional mixer's two
passes); anything else is rejected with an error naming the line. The loops
walk one ring: the producer and the consumers count chunks on from one loop
to the next (``ring_done``), so each stage's barrier phases run on unbroken.

The analysis passes and the consumer walk are shared with the generic target
(``lowering.lower``); this module is what only sm_90a emits: the producer, the
mbarrier ring's chunk loop, TMA stores and the warp-specialised kernel frame.
"""

from __future__ import annotations

from tilemix.tiles.ir import Loop, Op, Program

from .emit import ctype
from .knobs import Schedule, launch_registers, smem_limit
from .layout import align
from .lowering import Lowering, lower
from .op_emitters import OP_EMITTERS, store_entry
from .source import KernelSource, ParamKind
from .structure import CONSUMER_THREADS, PANEL, packed_start

__all__ = ["KernelSource", "lower_hopper", "HopperLowering"]

PRODUCER_THREADS = 128
# per thread, [several consumers, one]: with one consumer the producer keeps 40, with more 24
PRODUCER_REGISTERS, CONSUMER_REGISTERS = (24, 40), (240, 232)


def emit_store_tma(lw: HopperLowering, op: Op, decl: str, out: str, ind: int):
    """A tile store: each 64-column panel goes through one of this consumer's shared panel
    buffers (two, alternating, for wide tiles) and leaves by TMA (asynchronous, clipped at the
    tensor's edges), while the consumer goes on. In a packed batch a sequence's partial last
    chunk leaves by plain stores clipped at the sequence's end (TMA's would write into the next)."""
    value, *index = op.operands
    name, t = op.attrs["param"], value.type
    lw.tmap_rows[name] = t.rows
    layout = lw.layout
    src, panel_bytes, buffers = lw.reg(value, ind), layout.store_rows * 128, layout.store_buffers
    leader = f"threadIdx.x % {CONSUMER_THREADS} == 0"
    idx = [lw.plan.index_name[v.id] for v in index]
    for panel in range(t.cols // PANEL):
        buf = f"(smem + {layout.store_offset + panel % buffers * panel_bytes} + wg * {panel_bytes * buffers})"
        in_flight = 0 if panel == 0 else buffers - 1  # earlier stores may use either buffer
        lw.emit(f"if ({leader}) tm::bulk_wait_read<{in_flight}>();  // this buffer is free again", ind)
        lw.emit(f"tm::sync_threads({lw.bar}, {CONSUMER_THREADS});", ind)
        lw.emit(f"tm::store_panel<{lw.is_bf16}, {panel}>({buf}, {src});", ind)
        lw.emit("tm::fence_proxy_async();", ind)
        lw.emit(f"tm::sync_threads({lw.bar}, {CONSUMER_THREADS});", ind)
        rank, coords = lw.tma_coords(name, idx, t, panel)
        tma = f"if ({leader}) {{ tm::tma_store_{rank}(&tmap_{name}, {buf}, {coords}); tm::bulk_commit(); }}"
        if not lw.varlen:
            lw.emit(tma, ind)
            continue
        dst, ld, rows_left, _ = lw.tile_at(name, idx, t.rows, t.cols, out=True)
        lw.emit(f"if ({rows_left} >= {t.rows}) {{ {tma} }}", ind)
        lw.emit(f"else tm::copy_panel_out<{t.rows}>({dst} + {panel * PANEL}, {ld}, {rows_left}, {PANEL}, {buf});",
                ind)


class HopperLowering(Lowering):
    """sm_90a: a producer warpgroup's TMA loads into a ring completing on mbarriers, consumer
    warpgroups issuing wgmma groups, TMA stores."""

    matmul_ss = "tm::matmul_ss"
    matmul_rs = "tm::matmul_rs"
    proxy_fence = "tm::fence_proxy_async();"
    asynchronous = True
    consumer_heads = True
    store_buffers = 2
    emitters = {**OP_EMITTERS, "store": store_entry(emit_store_tma)}

    @classmethod
    def consumer_registers(cls, schedule: Schedule) -> int:
        """Registers a consumer thread has (``setmaxnreg``): the producer gives its share away, 64K per SM in all.
        At ``occupancy`` > 1 a CTA starts with its share of the register file, ptxas's launch-bounds
        cap (a multiple of 8) per thread, and ``setmaxnreg`` moves registers only within the CTA."""
        one = schedule.consumers == 1
        if schedule.occupancy == 1:
            return CONSUMER_REGISTERS[one]
        threads = PRODUCER_THREADS + CONSUMER_THREADS * schedule.consumers
        launch = launch_registers(threads, schedule.occupancy)
        given = (launch - PRODUCER_REGISTERS[one]) * PRODUCER_THREADS
        return min(CONSUMER_REGISTERS[one], (launch + given // (CONSUMER_THREADS * schedule.consumers)) // 8 * 8)

    def wait_prologue(self, ind: int):
        self.emit("tm::mbar_wait(prologue, 0);", ind)
        if self.varlen:
            self.zero_prologue_past_sequence(ind)

    def zero_prologue_past_sequence(self, ind: int):
        """``zero_past_sequence`` for the sequence tiles loaded before the chunk loops (a query block,
        say): this consumer's copy, or all copies of a tile the consumers share."""
        for op in self.plan.prologue_loads:
            t, spec = op.result.type, self.program.param(op.attrs["param"]).spec
            if spec.kind not in ("seq", "group_seq"):
                continue
            row0, length = f"{self.plan.index_name[op.operands[0].id]} * {t.rows}", spec.length
            mine = self.plan.per_consumer(op)
            at = f"smem + {self.layout.prologue_offset[op]}" + (f" + wg * {t.rows * t.cols * 2}" if mine else "")
            panels = t.cols // PANEL if mine else self.plan.load_bytes(op) // (t.rows * 128)
            self.emit(f"if ({row0} + {t.rows} > {length}) {{  // the sequence ends inside this block", ind)
            for line in (f"tm::zero_rows<{t.rows}>({at}, {panels}, {length} - {row0});", "tm::fence_proxy_async();",
                         f"tm::sync_threads({self.bar}, {CONSUMER_THREADS});"):
                self.emit(line, ind + 2)
            self.emit("}", ind)

    # -- the producer -------------------------------------------------------------
    def tma_loads(self, op: Op, dst: str, bar: str) -> list[str]:
        """The TMA copies of one tile load (one per 64-column panel and, for a split parameter,
        per consumer), completing on ``bar``."""
        plan, name, t = self.plan, op.attrs["param"], op.result.type
        self.tmap_rows[name] = t.rows
        lines = []
        for consumer in range(self.schedule.consumers if plan.per_consumer(op) else 1):
            idx = [plan.block_expr(consumer) if plan.split_loop is not None and v is plan.split_loop.index
                   else plan.index_name[v.id] for v in op.operands]
            for panel in range(t.cols // PANEL):
                at = f"{dst} + {consumer * t.rows * t.cols * 2 + panel * t.rows * 128}"
                rank, coords = self.tma_coords(name, idx, t, panel, str(consumer), self.producer_head(op, consumer))
                lines.append(f"tm::tma_load_{rank}({at}, &tmap_{name}, {bar}, {coords});")
        return lines

    def tma_coords(self, name: str, idx: list[str], t, panel: int, consumer: str = "wg",
                   head: str | None = None) -> tuple[str, str]:
        """TMA rank and box coordinates (innermost first) of 64-column panel ``panel`` of tile ``t``
        of parameter ``name`` at block indices ``idx``, for head ``head`` (default: this consumer's
        ``h``)."""
        kind = self.program.param(name).spec.kind
        if kind == "matrix":
            return "2d", f"{idx[1]} * {t.cols} + {panel * PANEL}, {idx[0]} * {t.rows}"
        if head is None:
            head = "h / (H / G)" if kind == "group_seq" else "h"
        elif kind == "group_seq":
            head = f"{head} / (H / G)"
        start = packed_start(self.program.param(name).spec.length)
        row, batch = (f"{start} + {idx[0]} * {t.rows}", "0") if self.varlen else (f"{idx[0]} * {t.rows}", "b")
        return "4d", f"{self.plan.col0(name, consumer)} + {panel * PANEL}, {head}, {row}, {batch}"

    def producer(self) -> list[str]:
        """One thread issues the TMA loads; with per-token vectors in the ring its warp copies those,
        each lane arriving on the stage's barrier once its copies land (the barrier expects them)."""
        plan, layout = self.plan, self.layout
        lanes = bool(plan.col_loads)  # then every loop's chunks expect the lanes' arrivals
        leader = "threadIdx.x == 0"
        out = [f"    if ({'threadIdx.x < 32' if lanes else leader}) {{"]
        if plan.prologue_loads:
            total = sum(plan.load_bytes(op) for op in plan.prologue_loads)
            copies = [f"tm::mbar_expect_tx(prologue, {total});"]
            for op in plan.prologue_loads:
                copies += self.tma_loads(op, f"smem + {layout.prologue_offset[op]}", "prologue")
            out += [f"      if ({leader}) {{", *["        " + line for line in copies], "      }"] if lanes else \
                ["      " + line for line in copies]
        for position, loop in enumerate(plan.loops):
            out += self.producer_loop(loop, position, lanes, leader)
        out.append("    }")
        return out

    def producer_loop(self, loop: Loop, position: int, lanes: bool, leader: str) -> list[str]:
        """The producer's ``position``-th chunk loop: each chunk's loads into the next free stage of
        the ring, counting on from the loops before it (in a scope of its own after the first)."""
        plan, layout, stages = self.plan, self.layout, self.schedule.stages
        stage_bytes = layout.stage_bytes
        ring = "c" if position == 0 else "(ring_done + c)"  # the chunk's number in the ring's sequence
        out = ["      " + line for line in plan.first_chunk(loop)]
        out.append(f"      const int n_iter = {plan.trip_count(loop)};")
        out.append("      for (int c = 0; c < n_iter; ++c) {")
        out.append(f"        int stage = {ring} % {stages};")
        out.append(f"        if ({ring} >= {stages}) tm::mbar_wait(&empty[stage], (({ring} / {stages}) - 1) & 1);")
        loads = plan.loop_loads[loop]
        tiles = [f"tm::mbar_expect_tx(&full[stage], {sum(map(plan.load_bytes, loads))});"]
        for op in loads:
            tiles += self.tma_loads(op, f"smem + stage * {stage_bytes} + {layout.load_offset[op]}", "&full[stage]")
        if lanes:
            for op in plan.loop_col_loads[loop]:
                dst = f"smem + {layout.col_ring} + stage * {layout.col_stage_bytes} + {layout.col_offset[op]}"
                out += ["        " + line for line in self.col_copies(op, dst, 32, "threadIdx.x")]
            out.append("        tm::cp_async_arrive(&full[stage]);")
            out += [f"        if ({leader}) {{", *["          " + line for line in tiles], "        }"]
        else:
            out += ["        " + line for line in tiles]
        out.append("      }")
        return self.ring_scope(out, position, "      ")

    def ring_scope(self, loop_lines: list[str], position: int, ind: str) -> list[str]:
        """A chunk loop's lines, and where more loops follow, the count of the ring's chunks so far
        (``ring_done``) updated after them: the first loop's counters stand in the enclosing
        scope, a later loop's in a scope of its own."""
        count = len(self.plan.loops)
        if count == 1:
            return loop_lines
        done = [f"{ind}{'int ring_done = n_iter;' if position == 0 else 'ring_done += n_iter;'}"]
        if position == 0:
            return loop_lines + done
        return [f"{ind}{{  // chunks() loop {position + 1} of {count}", *("  " + line for line in loop_lines),
                *(["  " + line for line in done] if position < count - 1 else []), f"{ind}}}"]

    # -- the consumers' chunk loop ---------------------------------------------------------
    def lower_loop(self, loop: Loop, ind: int):
        """The chunk loop walked in ``IssuePlan.order``; where ``IssuePlan.overlapped`` allows, the
        chunk's last groups run on and its stage is released one iteration later, after the next
        iteration's groups are issued. The chunks count on from the loops before it in the ring
        (``ring_scope``), and where a loop follows, this one's last stage is released."""
        stages, position = self.schedule.stages, self.plan.loops.index(loop)
        issue, outer = self.issues[loop], ind
        self.wait_for(loop.init, ind)
        for carried, init in zip(loop.carried, loop.init):
            self.emit(f"{ctype(carried.type)} {self.name(carried)} = {self.reg(init, ind)};", ind)
        start = len(self.lines)
        ring = "c" if position == 0 else "(ring_done + c)"  # the chunk's number in the ring's sequence
        for line in self.plan.first_chunk(loop):
            self.emit(line, ind)
        self.emit(f"const int n_iter = {self.plan.trip_count(loop)};", ind)
        self.emit("for (int c = 0; c < n_iter; ++c) {", ind)
        self.emit(f"int stage = {ring} % {stages};", ind + 2)
        self.emit(f"tm::mbar_wait(&full[stage], ({ring} / {stages}) & 1);", ind + 2)
        if self.varlen:
            self.zero_past_sequence(loop, ind + 2)
        overlapped = {self.name(v) for v in issue.overlapped}
        # so the previous iteration may have left groups writing those in flight
        self.carried_over = set(overlapped)
        self.in_flight = []
        self.lower_ops(list(issue.order), ind + 2)
        for carried, update in zip(loop.carried, loop.update):
            if self.name(carried) != self.names.get(update):
                self.wait_for([update], ind + 2)
                self.emit(f"{self.name(carried)} = {self.reg(update, ind + 2)};", ind + 2)
        groups = len(self.in_flight)
        deferred = bool(overlapped) and groups > 0 and {*self.in_flight, *self.carried_over} <= overlapped
        if groups and not deferred:
            self.wait_all(ind + 2)
        if deferred:
            self.emit(f"tm::wgmma_wait<{groups}>();  // the previous chunk's groups are done", ind + 2)
            self.emit(f"if (c > 0) tm::mbar_arrive(&empty[({ring} - 1) % {stages}]);", ind + 2)
        else:
            self.emit("tm::mbar_arrive(&empty[stage]);", ind + 2)
        self.emit("}", ind)
        if deferred:
            self.emit("tm::wgmma_wait<0>();", ind)
            if position < len(self.plan.loops) - 1:  # the next loop's producer waits for this stage
                last = "n_iter" if position == 0 else "(ring_done + n_iter)"
                self.emit(f"if (n_iter > 0) tm::mbar_arrive(&empty[({last} - 1) % {stages}]);", ind)
        self.in_flight.clear()
        self.carried_over.clear()
        self.lines[start:] = self.ring_scope(self.lines[start:], position, " " * outer)
        self.end_loop(loop)

    def zero_past_sequence(self, loop: Loop, ind: int):
        """In a packed batch, the rows of a sequence's partial last chunk past its end set to zero in
        the stage (TMA clips at the packed row's end only: it loaded the next sequence's tokens), as
        a load past the end reads zeros. Every consumer zeroes all of them before it reads any (the
        other consumers write the same zeros), then hands them to the wgmma proxy."""
        chunk = self.plan.index_name[loop.index.id]
        lines = []
        for op in self.plan.loop_loads[loop]:
            rows = op.result.type.rows
            panels = self.plan.load_bytes(op) // (rows * 128)
            at = f"smem + stage * stage_bytes + {self.layout.load_offset[op]}"
            lines.append(f"tm::zero_rows<{rows}>({at}, {panels}, {loop.dim} - {chunk} * {rows});")
        if not lines:
            return
        self.emit(f"if (({chunk} + 1) * {loop.size} > {loop.dim}) {{  // the sequence ends inside this chunk", ind)
        for line in [*lines, "tm::fence_proxy_async();", f"tm::sync_threads({self.bar}, {CONSUMER_THREADS});"]:
            self.emit(line, ind + 2)
        self.emit("}", ind)

    def param_args(self):
        """The base arguments and, in a packed batch, each tile output's address beside its tensor
        map (a sequence's partial last chunk is stored without TMA)."""
        args, order = super().param_args()
        if self.varlen:
            outputs = [name for kind, name in order if kind is ParamKind.TMAP_OUT]
            args[len(order):len(order)] = [f"tm::u16* __restrict__ out_{name}" for name in outputs]
            order += [(ParamKind.PTR_OUT, name) for name in outputs]
        return args, order

    # -- the whole kernel ---------------------------------------------------------------
    def kernel(self) -> KernelSource:
        self.lower_ops(self.program.body, 6)
        consumer = self.lines
        scratch = self.scratch_base()
        bar_off = align(self.layout.top, 8)  # the ring's full and empty barriers, then the prologue's
        smem_bytes = bar_off + 16 * self.schedule.stages + 8
        args, order = self.param_args()
        consumers = self.schedule.consumers
        threads = PRODUCER_THREADS + CONSUMER_THREADS * consumers
        src = [
            "#include <tilemix/hopper.cuh>",
            "",
            f'extern "C" __global__ void __launch_bounds__({threads}, {self.schedule.occupancy})',
            f"tilemix_{self.program.name}({', '.join(args)}) {{",
            "  extern __shared__ __align__(1024) char smem[];",
            f"  const int stage_bytes = {self.layout.stage_bytes};",
            f"  tm::u64* full = (tm::u64*)(smem + {bar_off});",
            f"  tm::u64* empty = full + {self.schedule.stages};",
            f"  tm::u64* prologue = empty + {self.schedule.stages};",
            *self.grid_decode(),
            *self.barrier_init(),
            f"  if (threadIdx.x < {PRODUCER_THREADS}) {{",
            f"    tm::setmaxnreg_dec<{PRODUCER_REGISTERS[consumers == 1]}>();",
            *self.producer(),
            "  } else {",
            f"    tm::setmaxnreg_inc<{self.consumer_registers(self.schedule)}>();",
            f"    const int wg = threadIdx.x / {CONSUMER_THREADS} - 1;  // this consumer's column block",
            *("    " + line for line in self.consumer_block()),
            *([f"    const int h = hcta * {consumers} + wg;  // and its head"] if self.plan.heads else []),
            "    const int bar_id = 1 + wg;",
            *("    " + line for line in scratch),
            *consumer,
            *([f"    if (threadIdx.x % {CONSUMER_THREADS} == 0) tm::bulk_wait<0>();  // stores done"]
              if self.layout.stores else []),
            "  }",
            "}",
        ]
        self.check_shared_memory(smem_bytes, smem_limit("sm_90a", self.schedule.occupancy), "an sm_90a CTA")
        return self.kernel_source(src, smem_bytes, threads, order, dict(self.tmap_rows))

    def barrier_init(self) -> list[str]:
        """The ring's full and empty mbarriers and the prologue's, initialised by one thread."""
        arrivals = "33);  // the TMA leader and 32 copying lanes" if self.plan.col_loads else "1);"
        return [
            "  if (threadIdx.x == 0) {",
            f"    for (int s = 0; s < {self.schedule.stages}; ++s) {{",
            f"      tm::mbar_init(&full[s], {arrivals}",
            f"      tm::mbar_init(&empty[s], {CONSUMER_THREADS * self.schedule.consumers});",
            "    }",
            "    tm::mbar_init(prologue, 1);",
            "    tm::fence_barrier_init();",
            "  }",
            "  __syncthreads();",
        ]


def lower_hopper(program: Program, schedule: Schedule | None = None,
                 full_dims: dict[str, int] | None = None, varlen: bool = False) -> KernelSource:
    """CUDA C++ for ``program``. With a column split the program is traced at
    the split widths and ``full_dims`` gives the tensors' real sizes. ``varlen``: for a packed
    batch (``Lowering``)."""
    return lower(HopperLowering, program, schedule or Schedule(), full_dims or dict(program.dims), "sm_90a",
                 varlen=varlen)
