"""Schedule choices: how each program runs on the GPU, apart from its math, decided in one place.

- defaults: ``default_schedule``, the first candidate that fits, with the ring as deep as shared
  memory allows;
- launch-time choices: ``launch_schedule`` adapts the default to the grid and the GPU (consumers
  per CTA, two heads per CTA, a deeper ring where SMs idle); ``$TILEMIX_SCHEDULE`` overrides it;
- sequence segments of scans: ``segment_count``, ``scan_segments``, ``segment_choices``;
- choices a program's module declares beside the program (``declare``): Const values chosen from
  the arguments' shapes (attention's key chunk), a column split the op makes itself (the SSD
  backward's);
- the tuner's search space: ``Config``, ``config_space``, ``legal``.

``Schedule`` itself lives in ``knobs.py`` (the lowering reads it, and this module lowers candidate
schedules to see which fit); it is exported here too."""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from tilemix.tiles import Kernel
from tilemix.tiles.errors import ResourceError, TileError
from tilemix.tiles.kernel import kernel_names
from tilemix.tiles.params import Binding

from .compile import CompileError, MissingTool, compile_cuda, resources
from .env import read
from .knobs import OCCUPANCIES, Schedule, column_blocks, launch_registers, smem_limit
from .specialise import kernel_source
from .structure import CONSUMER_THREADS, token_by_token

__all__ = ["Schedule", "default_schedule", "default_source", "launch_schedule", "heads_per_cta", "sm_count",
           "schedule_overrides", "overridden", "splittable", "wide_columns", "segment_count", "scan_segments",
           "segment_choices", "declare", "Declared", "HeadSplit", "call_consts", "head_split_width", "Config",
           "config_space", "knob_choices", "legal", "SPLIT_WIDTH", "MAX_STAGES", "IDLE_STAGES", "TUNED_MAX_STAGES"]

SPLIT_WIDTH = 64  # a column block's width: a 64-wide state's tiles fit a consumer's registers
MAX_STAGES = 3  # the default ring's depth at most (deeper measured no faster)
IDLE_STAGES = 6  # the ring of a scan that leaves most SMs idle (``_idle_ring``)
TUNED_MAX_STAGES = 4  # the tuner tries one stage past the default's bound


# -- defaults -----------------------------------------------------------------------------------
def default_schedule(kernel: Kernel, binding: Binding, arch: str = "sm_90a", probe: bool = True) -> Schedule:
    """Scans: split the state's column dim into SPLIT_WIDTH-wide blocks (state and output tiles then
    fit the registers), two per CTA; where the columns do not split, the state's row dim. Grid
    programs: two neighbouring grid blocks per CTA. Where shared memory is short: one consumer,
    then one stage. Then the ring as deep as shared memory allows (up to MAX_STAGES; scans on
    sm_90a only, the generic target's scans unmeasured). Choices made by compiling candidates
    (``probe``; False: the schedule they start from, compiling nothing, as the lowering record
    takes it): a decode step's occupancy (``_token_occupancy``), and on sm_90a, where the kernel
    spills, A operands staged where they are made if it then spills less (``Schedule.stage_a``)."""
    schedule, grid = _unprobed(kernel, binding, arch)
    if not probe:
        return schedule
    if not grid:
        schedule = _token_occupancy(kernel, binding, schedule, arch)
    return _fewer_spills(kernel, binding, schedule, arch) if arch == "sm_90a" else schedule


def _unprobed(kernel: Kernel, binding: Binding, arch: str) -> tuple[Schedule, bool]:
    """``default_schedule`` before the choices it compiles candidates for, and whether the program
    is a grid program (its blocks run apart)."""
    split = tuple((dim, SPLIT_WIDTH) for dim in wide_columns(kernel, binding) or wide_rows(kernel, binding)[:1])
    if split:
        pairs = [Schedule(split=split, consumers=2)] if column_blocks(split, binding.static) % 2 == 0 else []
        # two consumers share a CTA's loads; fewer consumers or stages when shared memory is short
        schedule = _first_fitting(kernel, binding, pairs + [Schedule(split=split, consumers=1),
                                                            Schedule(split=split, consumers=1, stages=1)], arch)
        return (_deepest_ring(kernel, binding, schedule, arch) if arch == "sm_90a" else schedule), False
    program = kernel.trace(binding, target=arch)
    if any(op.name == "loop" and op.kind == "blocks" for op in program.body):
        # neighbouring grid blocks share loads
        own = _DECLARED.get(kernel, _UNDECLARED).own_blocks
        shared = [] if own else [Schedule(consumers=2, consumer_axis="blocks")]
        schedule = _first_fitting(kernel, binding, shared + [Schedule(), Schedule(stages=1)], arch)
        return _deepest_ring(kernel, binding, schedule, arch), True
    schedule = _first_fitting(kernel, binding, [Schedule(), Schedule(stages=1)], arch)
    return (_deepest_ring(kernel, binding, schedule, arch) if arch == "sm_90a" else schedule), False


def _token_occupancy(kernel: Kernel, binding: Binding, schedule: Schedule, arch: str) -> Schedule:
    """A program that runs token by token (every ``chunks()`` loop one row: a decode step) does no
    tensor-core work; it moves its states through registers, bound by memory latency, so more CTAs
    per SM keep more states in flight: one consumer each, the most CTAs per SM whose launch bounds
    leave a thread twice its share of the state tiles and whose kernel compiles without spilling
    (checked by compiling; without the codegen tools the schedule stays as it is)."""
    widths = dict(schedule.split)
    traced = kernel.trace(replace(binding, static={**binding.static, **widths}), target=arch)  # as the split runs
    if not token_by_token([op for op in traced.walk() if op.name == "loop" and op.kind == "chunks"]):
        return schedule
    state_registers = sum(binding.extent(p.spec.dims[0]) * widths.get(p.spec.dims[1], binding.extent(p.spec.dims[1]))
                          for p in binding.params if p.spec.kind == "state") // CONSUMER_THREADS
    threads = CONSUMER_THREADS * (2 if arch == "sm_90a" else 1)  # one consumer, and sm_90a's producer
    for n in sorted(OCCUPANCIES, reverse=True):
        if n <= schedule.occupancy or launch_registers(threads, n) < 2 * state_registers:
            continue
        candidate = replace(schedule, consumers=1, occupancy=n)
        try:
            source = kernel_source(kernel, binding, candidate, arch)
            if not _local_bytes(source.source, arch, source.name):
                return candidate
        except (ResourceError, CompileError):  # a candidate that does not build is not taken
            continue
        except MissingTool:
            break
    return schedule


def _fewer_spills(kernel: Kernel, binding: Binding, schedule: Schedule, arch: str) -> Schedule:
    """``schedule`` with ``stage_a`` (and the ring as deep as then fits) where its kernel spills and
    spills fewer bytes so (checked by compiling both; without the codegen tools, or where the staged
    form does not build, as it is)."""
    if schedule.stage_a:
        return schedule
    try:
        source = kernel_source(kernel, binding, schedule, arch)
        for stages in range(schedule.stages, 0, -1):  # the staging buffers may take a ring stage's room
            candidate = replace(schedule, stage_a=True, stages=stages)
            try:
                staged = kernel_source(kernel, binding, candidate, arch)
                break
            except ResourceError:
                continue
        else:
            return schedule
        if staged.source == source.source:  # no A operand to stage: nothing to compile
            return schedule
        spilled = _local_bytes(source.source, arch, source.name)
        if spilled and _local_bytes(staged.source, arch, staged.name) < spilled:
            return candidate
    except (ResourceError, CompileError, MissingTool):
        pass
    return schedule


@functools.cache
def _local_bytes(source: str, arch: str, name: str) -> int:
    """The local memory (spills) ``source``'s kernel uses on ``arch``: compiled as a launch would
    compile it (the cubin cached), its resources read from the cubin."""
    return resources(compile_cuda(source, arch, name))["local_memory"]


def default_source(kernel: Kernel, binding: Binding, arch: str = "sm_90a"):
    """The kernel ``default_schedule`` gives on ``arch`` (a ``KernelSource``)."""
    return kernel_source(kernel, binding, default_schedule(kernel, binding, arch), arch)


def _probe_size(binding: Binding) -> int:
    """A tile width no other dim or chunk size has (a multiple of 16)."""
    taken = set(binding.sizes.values()) | set(binding.static.values())
    size = 16 * 61
    while size in taken:
        size += 16
    return size


def _positional(op, probe: int) -> bool:
    """Whether ``op`` addresses the ``probe``-wide dim by position (a slice of part of it, a concat
    along it, an index along it): a column block traced at its own width would address its own
    columns from 0, not the call's, and a program whose structure follows the width (selective_scan's
    derived ``d_A``: one entry per ``P`` columns of a ``[1, N·P]`` state) would run another program."""
    if op.name == "slice":
        (a,), at = op.operands, op.attrs
        return (a.type.rows == probe and (at["row0"], at["rows"]) != (0, probe)) or \
            (a.type.cols == probe and (at["col0"], at["cols"]) != (0, probe))
    if op.name == "concat":
        extent = (lambda t: t.rows) if op.attrs["axis"] == 0 else (lambda t: t.cols)
        return any(extent(t) == probe for t in (op.result.type, *(x.type for x in op.operands)))
    if op.name == "iota":
        return (op.result.type.rows, op.result.type.cols)[op.attrs["axis"]] == probe
    if op.name == "eye":
        return probe in (op.result.type.rows, op.result.type.cols)
    return False


def splittable(kernel: Kernel, binding: Binding, dim: str) -> bool:
    """Whether ``dim`` can be cut into independent column blocks: trace with a
    width no other dim has and check that no matmul contracts over it, no
    reduction runs along it and no op addresses it by position (``_positional``). A program that
    does not trace at another width is not splittable."""
    probe = _probe_size(binding)
    try:
        traced = kernel.trace(replace(binding, static=dict(binding.static, **{dim: probe})), target="cpu")
    except TileError:
        return False
    for op in traced.walk():
        if op.name == "matmul":
            a = op.operands[0].type
            contracted = a.rows if op.attrs["ta"] else a.cols
            if contracted == probe:
                return False
        if op.name in ("rowsum", "rowmax") and op.operands[0].type.cols == probe:
            return False
        if op.name in ("colsum", "colmax", "cumsum", "segsum") and op.operands[0].type.rows == probe:
            return False
        if _positional(op, probe):
            return False
    return True


def wide_columns(kernel: Kernel, binding: Binding) -> tuple[str, ...]:
    """The state column dims wider than ``SPLIT_WIDTH`` that ``splittable`` lets the schedule cut
    into column blocks, each once (states that share a column dim split it once), in parameter
    order: one test for the default schedule and the derived backward's column blocks."""
    return _wide_state_dims(kernel, binding, 1)


def wide_rows(kernel: Kernel, binding: Binding) -> tuple[str, ...]:
    """The state row dims wider than ``SPLIT_WIDTH`` that ``splittable`` lets the schedule cut into
    blocks, for programs whose state columns do not split: a decay's gradient (GLA's ``d_g``)
    contracts the state's columns and keeps its rows, the key dims, apart. A program whose ops
    follow the dim's width (selective_scan's forward reads ``S / P`` entries of its decays) is
    not cut: traced at the block's width it would be another program."""
    return tuple(dim for dim in _wide_state_dims(kernel, binding, 0) if _same_ops(kernel, binding, dim, SPLIT_WIDTH))


def _wide_state_dims(kernel: Kernel, binding: Binding, axis: int) -> tuple[str, ...]:
    """The states' dims on ``axis`` (0: rows, 1: columns) wider than ``SPLIT_WIDTH`` and splittable."""
    dims = dict.fromkeys(p.spec.dims[axis] for p in binding.params
                         if p.spec.kind == "state" and isinstance(p.spec.dims[axis], str))
    return tuple(dim for dim in dims if binding.extent(dim) > SPLIT_WIDTH and splittable(kernel, binding, dim))


def _same_ops(kernel: Kernel, binding: Binding, dim: str, width: int) -> bool:
    """Whether ``kernel`` traced with ``dim`` at ``width`` runs the ops it runs at the call's width."""
    def ops(b: Binding) -> list[str]:
        return [op.name for op in kernel.trace(b, target="cpu").walk()]
    try:
        return ops(binding) == ops(replace(binding, static=dict(binding.static, **{dim: width})))
    except TileError:
        return False


def _deepest_ring(kernel: Kernel, binding: Binding, schedule: Schedule, arch: str,
                  limit: int = MAX_STAGES) -> Schedule:
    """``schedule`` with as many ring stages as shared memory holds, up to ``limit``: more loads in
    flight while the consumers work."""
    source = kernel_source(kernel, binding, schedule, arch)
    if not source.stage_bytes:
        return schedule
    room = (smem_limit(arch, schedule.occupancy) - source.smem_bytes) // source.stage_bytes
    # each stage also takes barriers and alignment padding: the deepest count that lowers
    for stages in range(min(limit, schedule.stages + room), schedule.stages, -1):
        try:
            kernel_source(kernel, binding, replace(schedule, stages=stages), arch)
            return replace(schedule, stages=stages)
        except ResourceError:
            continue
    return schedule


def _first_fitting(kernel: Kernel, binding: Binding, candidates: list[Schedule], arch: str = "sm_90a") -> Schedule:
    """The first schedule whose kernel fits the target, then the same with staging buffers shared
    (a program that fits without keeps the code every GPU test so far has run); the last one's
    error if none fits."""
    for schedule in candidates + [replace(c, share_staging=True) for c in candidates]:
        try:
            kernel_source(kernel, binding, schedule, arch)
            return schedule
        except ResourceError as e:
            error = e
    raise error


# -- launch-time choices ------------------------------------------------------------------------
_DEFAULTS: dict[tuple, Schedule] = {}
_HEADS: dict[tuple, Schedule | None] = {}  # launch_schedule's two-heads choice per specialisation


@functools.cache  # fixed for the process; every remembered call's signature reads it
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_schedule(kernel: Kernel, binding: Binding, device_index: int, arch: str = "sm_90a") -> Schedule:
    """The default schedule, adapted to the grid: a scan whose two-consumer CTAs would fill less
    than half the GPU (few batch x heads, long sequences) runs one consumer per CTA, twice the
    CTAs; a one-consumer scan may run two heads per CTA (``_heads_pair``); and one that still
    leaves SMs idle a deeper ring (``_idle_ring``). A grid program of one block runs two heads per
    CTA (``_one_block_heads``). ``$TILEMIX_SCHEDULE``'s fields win."""
    key = (id(kernel), binding.key(), arch)
    base = _DEFAULTS.get(key)
    if base is None:
        base = _DEFAULTS[key] = default_schedule(kernel, binding, arch)
    forced = overridden(kernel, base)
    if forced is not base:
        return forced
    if base.consumer_axis == "blocks":
        return _one_block_heads(kernel, binding, base, device_index, arch) or base
    if base.consumer_axis != "columns" or "B" not in binding.sizes:
        return base
    if base.consumers == 1:
        chosen = _heads_pair(kernel, binding, base, device_index, arch) or base
    else:
        chosen = replace(base, consumers=1) if 2 * _ctas(binding, base) < sm_count(device_index) else base
    return _idle_ring(kernel, binding, chosen, device_index, arch)


def heads_per_cta(schedule: Schedule, sizes: dict[str, int]) -> int:
    """How many consecutive heads one CTA runs: ``consumers`` with ``consumer_axis='heads'`` (one
    per consumer warpgroup, sharing the group's tiles), else 1. Raises ``ValueError`` where H or the
    heads of a group (H/G) are not a multiple of it (a CTA's heads must share one group)."""
    if schedule.consumer_axis != "heads":
        return 1
    C, H = schedule.consumers, sizes.get("H", 0)  # (a Matrix program has no heads: its lowering refuses the axis)
    G = sizes.get("G")  # absent without GroupSeq parameters: nothing shared, any H that C divides
    if H % C or (G and (H // G) % C):
        raise ValueError(f"consumer_axis='heads' with consumers={C} runs {C} heads of one group per CTA: "
                         f"H and H/G must be multiples of {C}, got H={H}, G={G}")
    return C


def _ctas(binding: Binding, schedule: Schedule) -> int:
    """The CTAs a scan's grid has: one per (batch, head, column block), shared by its consumers."""
    return binding.sizes["B"] * binding.sizes["H"] * column_blocks(schedule.split, binding.static) // schedule.consumers


def _idle_ring(kernel: Kernel, binding: Binding, schedule: Schedule, device_index: int, arch: str) -> Schedule:
    """A scan whose CTAs leave more than half the SMs idle streams its chunks alone on each SM, where
    the bytes its ring keeps in flight bound it (bandwidth per SM = bytes in flight / latency): the ring
    as deep as shared memory holds, up to IDLE_STAGES. With a CTA per SM a deeper ring costs time, so
    it is left as it is."""
    if arch != "sm_90a" or 2 * _ctas(binding, schedule) >= sm_count(device_index):
        return schedule
    return _deepest_ring(kernel, binding, schedule, arch, IDLE_STAGES)


def _one_block_heads(kernel: Kernel, binding: Binding, base: Schedule, device_index: int,
                     arch: str) -> Schedule | None:
    """Two heads per CTA (``consumer_axis="heads"``) for a two-consumer grid program whose sequence
    is one grid block: on neighbouring blocks the second consumer's block lies past the end, so it
    computes what is never stored (a long convolution's column DFTs at L = 4096: 64 samples per
    head). None where that does not apply (several blocks, a packed batch, odd H or H/G), where
    half as many CTAs would leave SMs without one (B·H under twice the SM count), or where it does
    not fit."""
    sizes = binding.sizes
    if arch != "sm_90a" or base.consumers != 2 or "H" not in sizes or "T_max" in sizes:
        return None
    if sizes["B"] * sizes["H"] < 2 * sm_count(device_index):
        return None
    grid = [op for op in kernel.trace(binding, target=arch).body if op.name == "loop" and op.kind == "blocks"]
    if len(grid) != 1 or grid[0].dim != "T" or sizes["T"] > grid[0].size:
        return None
    candidate = replace(base, consumer_axis="heads")
    try:
        heads_per_cta(candidate, sizes)
    except ValueError:
        return None
    key = (id(kernel), binding.key(), arch, "one-block")
    if key not in _HEADS:
        try:
            kernel_source(kernel, binding, candidate, arch)
            _HEADS[key] = candidate
        except (ResourceError, TileError):
            _HEADS[key] = None
    return _HEADS[key]


def _heads_pair(kernel: Kernel, binding: Binding, base: Schedule, device_index: int, arch: str) -> Schedule | None:
    """Two heads (of one group) per CTA (``consumer_axis="heads"``) for a one-consumer scan with no
    column split: two warpgroups per SM hide each other's latency, and per-group tiles (GroupSeq:
    SSD's B and C) load once for both; None where that does not apply, would leave more than half
    the GPU idle (there pairs measured slower), or does not fit. Two stages sharing staging buffers
    first, else one stage."""
    sizes = binding.sizes
    if arch != "sm_90a" or base.split or base.occupancy > 1 or "H" not in sizes:  # several CTAs share the SM
        return None
    try:
        heads_per_cta(replace(base, consumers=2, consumer_axis="heads"), sizes)
    except ValueError:  # odd H or H/G: a CTA's heads must share a group
        return None
    if sizes["B"] * sizes["H"] < sm_count(device_index):  # fewer than half the SMs busy
        return None
    key = (id(kernel), binding.key(), arch)
    if key not in _HEADS:
        _HEADS[key] = None
        for candidate in (replace(base, consumers=2, consumer_axis="heads", stages=2, share_staging=True),
                          replace(base, consumers=2, consumer_axis="heads", stages=1)):
            try:
                kernel_source(kernel, binding, candidate, arch)
            except ResourceError:
                continue
            _HEADS[key] = candidate
            break
    return _HEADS[key]


@functools.lru_cache(maxsize=8)
def schedule_overrides(text: str) -> dict[str, dict[str, Any]]:
    """``$TILEMIX_SCHEDULE``, e.g. ``"ssd_bwd_dc:consumers=2,consumer_axis=heads,stages=1;gemm_fwd:stages=3"``:
    per program name, Schedule fields that replace its default schedule's (for experiments; a tuned
    config still wins). ``split`` is written ``V/64`` (several ``V/64+K/64``, none ``-``), booleans
    ``true``/``false``."""
    overrides: dict[str, dict[str, Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, assignments = part.partition(":")
        values = dict(_override(item, part) for item in filter(None, (a.strip() for a in assignments.split(","))))
        if not name or not values:
            raise ValueError(f"TILEMIX_SCHEDULE: {part!r} is not PROGRAM:FIELD=VALUE[,FIELD=VALUE...]")
        overrides[name] = values
    unknown = sorted(set(overrides) - kernel_names())
    if unknown:  # a typo would otherwise change nothing, silently
        warnings.warn(f"TILEMIX_SCHEDULE names no @kernel program defined so far: {unknown}", stacklevel=2)
    return overrides


def _override(item: str, part: str) -> tuple[str, Any]:
    """One ``FIELD=VALUE`` of ``$TILEMIX_SCHEDULE`` (in ``part``), the value of the field's type."""
    kinds = {f.name: f.default for f in fields(Schedule)}
    field_name, _, value = item.partition("=")
    if field_name not in kinds or not value:
        raise ValueError(f"TILEMIX_SCHEDULE: {item!r} in {part!r} is not FIELD=VALUE with FIELD one of "
                         f"{sorted(kinds)}")
    default = kinds[field_name]
    if isinstance(default, bool):
        if value not in ("true", "false"):
            raise ValueError(f"TILEMIX_SCHEDULE: {field_name} is true or false, got {value!r}")
        return field_name, value == "true"
    if isinstance(default, int):
        if not value.isdigit():
            raise ValueError(f"TILEMIX_SCHEDULE: {field_name} is a whole number, got {value!r}")
        return field_name, int(value)
    if isinstance(default, tuple):  # split: V/64+K/64 or -
        pairs = [] if value == "-" else [p.split("/") for p in value.split("+")]
        if not all(len(p) == 2 and p[1].isdigit() for p in pairs):
            raise ValueError(f"TILEMIX_SCHEDULE: split is DIM/WIDTH (several joined by +) or -, got {value!r}")
        if len({d for d, _ in pairs}) < len(pairs):
            raise ValueError(f"TILEMIX_SCHEDULE: split names a dim twice, got {value!r}")
        return field_name, tuple((d, int(w)) for d, w in pairs)
    return field_name, value


def overridden(kernel: Kernel, schedule: Schedule) -> Schedule:
    """``schedule`` with the fields ``$TILEMIX_SCHEDULE`` sets for ``kernel`` (itself where it sets none)."""
    forced = schedule_overrides(read("TILEMIX_SCHEDULE") or "").get(kernel.name)
    return replace(schedule, **forced) if forced else schedule


# -- sequence segments of a scan (ops/_segments.py runs them) ----------------------------------------
SCAN_CHUNK = 64  # the scans' chunk: a segment holds whole chunks
MIN_SEGMENT = 1024  # shorter segments spend more on states than they gain in parallelism
MIN_TUNED_SEGMENT = 256  # the shortest segments the tuner tries
MAX_SEGMENTS = 64
MIN_LENGTH = 16384  # below this the sequential scan won at every measured B·H (bench/NOTES.md)
TARGET_CTAS_PER_SM = 1.5


def segment_count(T: int, programs: int, sms: int, min_length: int = MIN_LENGTH) -> int:
    """How many segments a sequence of length ``T`` is cut into when the sequential scan runs
    ``programs`` CTAs on ``sms`` SMs; 1 means the sequential scan. Segments pay when fewer than
    half the SMs would have a CTA and the sequence is at least ``min_length`` long; then the
    fewest (a power of two) that give 1.5 CTAs per SM, no shorter than MIN_SEGMENT and dividing T
    into whole chunks: segments pay on an idle GPU and lose on a full one, where their second pass
    over the inputs costs more than the idle SMs (bench/NOTES.md, "Sequence segments").
    ``$TILEMIX_SEGMENTS`` forces a count (where T allows it)."""
    forced = read("TILEMIX_SEGMENTS")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"TILEMIX_SEGMENTS must be a positive integer, got {forced!r}")
        return int(forced) if T % (SCAN_CHUNK * int(forced)) == 0 else 1
    segments = 1
    if T < min_length or 2 * programs >= sms:
        return segments
    while (programs * segments < TARGET_CTAS_PER_SM * sms and T // (2 * segments) >= MIN_SEGMENT
           and T % (SCAN_CHUNK * 2 * segments) == 0):
        segments *= 2
    return segments


def scan_segments(kernel: Kernel, binding: Binding, device_index: int, arch: str, min_length: int = MIN_LENGTH) -> int:
    """``segment_count`` for a scan program at ``binding`` on the device: its CTAs are those of its
    launch schedule (batch x heads x column blocks)."""
    programs = binding.sizes["B"] * binding.sizes["H"] * column_blocks(
        launch_schedule(kernel, binding, device_index, arch).split, binding.static)
    return segment_count(binding.sizes["T"], programs, sm_count(device_index), min_length)


def segment_choices(T: int) -> list[int]:
    """The segment counts the tuner tries: powers of two up to MAX_SEGMENTS that cut T into whole
    chunks, segments no shorter than MIN_TUNED_SEGMENT (1 included)."""
    return [s for s in (2 ** i for i in range(MAX_SEGMENTS.bit_length()))
            if T % (SCAN_CHUNK * s) == 0 and (s == 1 or T // s >= MIN_TUNED_SEGMENT)]


# -- choices declared beside a program ------------------------------------------------------------
@dataclass(frozen=True)
class HeadSplit:
    """The op runs the programs on ``width``-wide column blocks of their static dim ``dim``, each
    block a head of its own, and adds up the partial results: a column split for programs the code
    generator cannot split (they contract or reduce over ``dim``). ``env``: the variable (one of
    ``codegen/env.py``'s) that sets the width, 0 for none."""

    dim: str
    width: int = SPLIT_WIDTH
    env: str | None = None


@dataclass(frozen=True)
class Declared:
    """What a program's module states about running it (``declare``). ``consts(args)``: Const values
    for a call that passes none, from the arguments' shapes (tensors or ``TensorSpec``s);
    ``head_split``: a ``HeadSplit``."""

    consts: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    head_split: HeadSplit | None = None
    own_blocks: bool = False


_DECLARED: dict[Kernel, Declared] = {}
_UNDECLARED = Declared()  # a program whose module declares nothing


def declare(*kernels: Kernel, consts: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
            head_split: HeadSplit | None = None, own_blocks: bool = False) -> Declared:
    """State ``kernels``' schedule choices beside them, in their ops module, as Triton's autotune
    configs and Pallas' ``TuningConfig`` sit beside a kernel: ``call_consts`` and
    ``head_split_width`` read them, so no choice tests a program's name. ``own_blocks``: each grid
    block walks chunks of its own (a decode split's keys), so the default schedule gives each CTA
    one, not two consumers sharing out neighbouring blocks (which walk the union of their ranges)."""
    declared = Declared(consts, head_split, own_blocks)
    for kernel in kernels:
        _DECLARED[kernel] = declared
    return declared


def call_consts(kernel: Kernel, args: dict[str, Any]) -> dict[str, Any]:
    """The Const values ``kernel``'s module declares for a call with ``args``, less those it passes."""
    choose = _DECLARED.get(kernel, _UNDECLARED).consts
    return {} if choose is None else {k: v for k, v in choose(args).items() if k not in args}


def head_split_width(kernel: Kernel, sizes: dict[str, int], gpu: bool) -> int:
    """The width of the column blocks of ``kernel``'s ``HeadSplit`` dim (whose size ``sizes`` gives)
    its op runs it on: the declared width on a GPU, none on the CPU, the ``env`` variable's where set;
    all of the dim (no split) where the width does not cut it into two or more whole blocks."""
    split = _DECLARED.get(kernel, _UNDECLARED).head_split
    if split is None:
        raise ValueError(f"{kernel.name}: its module declares no head_split")
    extent = sizes[split.dim]
    forced = read(split.env) if split.env else None
    width = int(forced) if forced else (split.width if gpu else 0)
    return width if 0 < width < extent and extent % width == 0 else extent


# -- the tuner's search space -------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """What the tuner chooses: a ``Schedule`` and overrides of the program's block-size ``Const``s."""

    schedule: Schedule
    consts: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        parts = [f"{f.name}={_show(getattr(self.schedule, f.name))}" for f in fields(Schedule)
                 if f.name in ("stages", "consumers") or getattr(self.schedule, f.name) != f.default]
        return " ".join(parts + [f"{k}={v}" for k, v in self.consts])


def _show(value) -> str:
    if isinstance(value, tuple):  # split: (("V", 64),) -> V/64
        return ",".join(f"{d}/{w}" for d, w in value) or "-"
    return str(value)


# Alternatives for the Schedule fields the tuner varies. A field of Schedule may declare its own
# with ``field(default=..., metadata={"choices": (...)})``; those take precedence, so a knob the code
# generator adds is searched without touching this module.
KNOB_CHOICES: dict[str, tuple] = {"stages": tuple(range(1, TUNED_MAX_STAGES + 1)), "consumers": (1, 2)}
PLANE = ("stages", "consumers")  # searched as a product; every other knob one at a time


def knob_choices() -> dict[str, tuple]:
    """Schedule field -> the values the tuner tries (field metadata first, then KNOB_CHOICES)."""
    found = {}
    for f in fields(Schedule):
        choices = f.metadata.get("choices", KNOB_CHOICES.get(f.name)) if f.metadata else KNOB_CHOICES.get(f.name)
        if choices:
            found[f.name] = tuple(choices)
    return found


def _block_consts(kernel: Kernel, binding: Binding) -> dict[str, list[int]]:
    """Alternatives for the program's block-size constants: integer Consts that are multiples of 64
    (bools such as is_causal are not sizes), halved and doubled within 64..256."""
    choices = {}
    for name, spec in kernel.specs.items():
        value = binding.values.get(name)
        if spec.kind == "const" and isinstance(value, int) and not isinstance(value, bool) and value % 64 == 0:
            choices[name] = sorted({v for v in (value // 2, value, value * 2) if 64 <= v <= 256 and v % 64 == 0})
    return choices


def _split_alternatives(binding: Binding, default: Schedule) -> list[tuple[tuple[str, int], ...]]:
    """The default's column split with one dim's width halved or doubled (multiples of 64 that
    divide the dim)."""
    out = []
    for i, (dim, width) in enumerate(default.split):
        extent = binding.static.get(dim, 0)
        for w in (width // 2, width * 2):
            if w >= 64 and w % 64 == 0 and extent % w == 0 and w <= extent:
                out.append(default.split[:i] + ((dim, w),) + default.split[i + 1:])
    return out


def legal(schedule: Schedule, binding: Binding) -> bool:
    """Consumers over columns each take whole column blocks: their count must divide the split's
    blocks (a scan with no split has one block, so one consumer). Consumers over heads each take a
    head of one group: their count must divide H and H/G, with no split."""
    if schedule.consumer_axis == "heads":
        try:
            heads_per_cta(schedule, binding.sizes)
        except ValueError:
            return False
        return not schedule.split and "H" in binding.sizes
    if schedule.consumer_axis != "columns":
        return True
    blocks = 1
    for dim, width in schedule.split:
        extent = binding.static.get(dim)
        if extent is None or extent % width:
            return False
        blocks *= extent // width
    return blocks % schedule.consumers == 0


def config_space(kernel: Kernel, binding: Binding, default: Schedule,
                 fits: Callable[[Config], bool] | None = None) -> list[Config]:
    """The default first, then every ring depth x consumer warpgroups at the default block sizes,
    then each other Schedule knob's choices alone (and higher occupancies with one consumer), the
    split's widths (halved, doubled; with each consumer count that fits), then each block size's
    alternatives at the default schedule: one
    axis at a time around the default, so a tune stays within a minute (the full product is too
    many kernels). Schedules the launch cannot map (``legal``) are left out. ``fits(config)`` (the
    lowering's shared-memory check) lets a larger block size take a shallower ring, then one
    consumer, where the default schedule has no room for it."""
    knobs = knob_choices()
    plane = [k for k in PLANE if k in knobs]
    space = [Config(default)]
    for values in itertools.product(*(knobs[k] for k in plane)):
        space.append(Config(replace(default, **dict(zip(plane, values)))))
    for name, values in knobs.items():
        if name not in plane:
            space += [Config(replace(default, **{name: v})) for v in values]
    if default.consumers > 1:  # more CTAs per SM in place of consumers: the registers two consumers had
        space += [Config(replace(default, consumers=1, occupancy=n)) for n in knobs.get("occupancy", ()) if n > 1]
    for split in _split_alternatives(binding, default):
        space += [Config(replace(default, split=split, consumers=c)) for c in knobs.get("consumers", (1,))]
    shallower = [replace(default, consumers=c, stages=st) for c in sorted({default.consumers, 1}, reverse=True)
                 for st in range(default.stages, 0, -1)]
    for name, values in sorted(_block_consts(kernel, binding).items()):
        for v in values:
            if v != binding.values[name]:
                options = [Config(sched, ((name, v),)) for sched in shallower]
                space.append(next((c for c in options if fits(c)), options[0]) if fits else options[0])
    space = [c for c in space if c == space[0] or legal(c.schedule, binding)]
    return list(dict.fromkeys(space))  # the default appears once, first
