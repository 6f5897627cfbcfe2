"""The consumer code's emission state: lines, register names, shared tiles, staging, waits.

``Emitter`` is what every op emitter writes through: ``reg`` (a register tile for a value,
copying a loaded tile once, again where the plan drops the copy), ``shared`` (a shared tile for a
matmul operand, staging a register tile in its ``SharedLayout`` buffer), ``wait_for`` (the
asynchronous matmul groups a value waits on), ``scan`` (a column vector's prefix scan, once). It
reads the frozen plans; what it tracks is only what the code emitted so far holds: names, register
copies, groups in flight."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from tilemix.tiles.ir import Loop, Op, Value
from tilemix.tiles.types import DType

from .issue_order import IssuePlan
from .layout import SharedLayout
from .liveness import Liveness
from .structure import CONSUMER_THREADS, KernelPlan

__all__ = ["Emitter", "ctype", "float_literal"]


def ctype(t) -> str:
    """The C++ type of a register tile of tile type ``t``."""
    return f"tm::rt<{t.rows}, {t.cols}>"


def float_literal(x: float) -> str:
    if x == float("-inf"):
        return "tm::f_neg_inf()"
    if x == float("inf"):
        return "(-tm::f_neg_inf())"
    return f"{x!r}f"


class Emitter:
    """Emission state over the plans; a target's lowering subclasses it (``lowering.Lowering``).
    ``proxy_fence``: the fence that hands ordinary shared-memory stores to the matmul's
    asynchronous proxy (None where matmuls read shared memory synchronously)."""

    proxy_fence: str | None = None

    def __init__(self, plan: KernelPlan, live: Liveness, issues: Mapping[Loop, IssuePlan], layout: SharedLayout):
        self.plan, self.live, self.issues, self.layout = plan, live, issues, layout
        self.program, self.schedule = plan.program, plan.schedule
        self.is_bf16 = "true" if self.program.compute_dtype is DType.bf16 else "false"
        self.lines: list[str] = []
        self.names: dict[Value, str] = {loop.index: plan.index_name[loop.index.id]
                                        for loop in (*plan.loops, *plan.grid_loops)}
        self.smem_of: dict[Value, tuple[str, int]] = {}  # value -> (pointer expr, rows) for shared tiles
        self.ring_vector: dict[Value, str] = {}  # per-token vector -> its address in the chunk's stage
        self.reg_of: dict[Value, str] = {}  # shared tile value -> its register copy
        self.copies: Counter[Value] = Counter()  # register copies made of each shared tile
        self.reloads = {op: tiles for issue in issues.values() for op, tiles in issue.reloads.items()}
        self.early_staging = {op: tiles for issue in issues.values() for op, tiles in issue.early_staging.items()}
        self.staged: dict[Value, str] = {}  # staged value -> its buffer
        self.staged_early: set[Value] = set()  # staged so far by early staging: matmuls after read them there
        self.scans: dict[Value, str] = {}  # column vector -> shared memory with its prefix scan
        self.head_rows: dict[Value, str] = {}  # Head row read only in slices -> its row's global address
        self.linrec_carry: dict[Value, tuple] = {}  # linrec result -> (the op, its carry: the last row in scan order)
        self.prologue_waited = False
        self.tmap_rows: dict[str, int] = {}
        self.bar = "bar_id"  # named barrier of this consumer group (0 is __syncthreads)
        self.in_flight: list[str] = []  # the register tile each matmul group not yet waited for writes, oldest first
        self.carried_over: set[str] = set()  # tiles the previous chunk's groups may still be writing

    def fail(self, message: str, op: Op | None = None):
        self.plan.fail(message, op)

    def name(self, v: Value) -> str:
        return self.names.setdefault(v, f"v{v.id}")

    def emit(self, line: str, indent: int = 2):
        self.lines.append(" " * indent + line.lstrip())

    def reg(self, v: Value, ind: int) -> str:
        """A register-tile expression for ``v`` (copying a shared tile once: reading it afresh at
        each use spilled more in SSD; again only where the plan drops the copy, ``IssuePlan.reloads``)."""
        if v in self.smem_of:
            if v not in self.reg_of:
                ptr, rows = self.smem_of[v]
                name = f"{self.name(v)}_r{self.copies[v] or ''}"
                self.copies[v] += 1
                self.emit(f"{ctype(v.type)} {name}; tm::load_shared<{self.is_bf16}>({name}, {ptr});", ind)
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
        t = v.type  # whole 64x64 panels (tiles.lowerable)
        if v in self.staged:
            return self.staged[v], t.rows
        ptr = self.staged[v] = f"(smem + {self.layout.staging[v]} + wg * {t.rows * t.cols * 2})"
        # In-flight matmuls may still read this buffer: the previous chunk's (left running at its end),
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
        """Wait for the matmul groups writing any of ``values`` (and with ``older`` for the previous
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
        """Whether ``op``'s result may take over ``x``'s registers: ``op`` is ``x``'s last reader (or
        its last in registers, ``x`` staged before it: ``IssuePlan.early_staging``), in the scope that
        defines ``x`` (so not once per iteration of a value made before the loop), and the register
        tiles have one shape (a view of shared memory has no registers to give)."""
        scope = self.live.scope.get(x)
        last = self.live.last_reader.get(x) is op or x in self.early_staging.get(op, ())
        return (last and scope is not None and scope is self.live.scope.get(op.result)
                and x not in self.smem_of and x not in self.live.shared_rows and x in self.names
                and (x.type.rows, x.type.cols) == (op.result.type.rows, op.result.type.cols))

    def scan(self, v: Value, ind: int) -> str:
        """Shared memory holding the prefix scan of column vector ``v``, scanned once."""
        if v not in self.scans:
            floats = 2 * v.type.rows
            ptr = self.scans[v] = f"((float*)(smem + {self.layout.scans[v]}) + wg * {floats})"
            self.emit(f"tm::prefix_scan({self.reg(v, ind)}, {ptr}, scratch, {self.bar});", ind)
        return self.scans[v]

    def scratch_base(self) -> list[str]:
        """The declarations of the consumer's exchange buffers: ``scratch`` for column reductions
        and scans, ``transposed`` for transposes (hopper.cuh says why)."""
        floats = self.layout.scratch_floats
        per_consumer = sum(floats.values()) or 4
        return [f"float* scratch = (float*)(smem + {self.layout.scratch_offset}) + wg * {per_consumer};",
                *([f"float* transposed = scratch + {floats['scratch']};"] if floats["transposed"] else [])]
