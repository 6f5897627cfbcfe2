"""The order sm_90a kernels walk a chunk loop's ops in (codegen/issue_order.py): wgmma groups issued
before the waits, every dependence and register hand-over of program order kept, program order
itself where another order would hold more registers; and whether a chunk's last groups run on into
the next chunk (``Schedule.overlap``). CPU only, but for the tests that ask ptxas."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from test_generic import OVER_BUDGET, PROGRAMS

from tilemix.codegen.hopper import HopperLowering
from tilemix.codegen.issue_order import OVERLAP_RESERVE, peak_registers, plan_issue, tile_registers, unit_reads
from tilemix.codegen.liveness import Liveness
from tilemix.codegen.lowering import plans
from tilemix.codegen.schedule import default_schedule, default_source
from tilemix.codegen.specialise import hopper_source
from tilemix.codegen.structure import KernelPlan
from tilemix.tiles import TensorSpec


def _plans(name: str, **dims) -> tuple[KernelPlan, Liveness]:
    """The sm_90a structure and liveness plans of program ``name`` at the bench shape (feature dims
    ``dims``, default 128, or ``issue``: the schedule's issue order)."""
    issue = dims.pop("issue", None)
    kernel, specs = PROGRAMS[name]
    specs = {n: _resized(s, dims) for n, s in specs.items()}
    binding = kernel.bind(specs)
    schedule = default_schedule(kernel, binding)
    if issue is not None:
        schedule = replace(schedule, issue=issue)
    program = kernel.trace(replace(binding, static=dict(binding.static, **dict(schedule.split))), target="sm_90a")
    plan, live, _, _ = plans(HopperLowering, program, schedule, dict(binding.static), "sm_90a")
    return plan, live


def _order(plan: KernelPlan, live: Liveness, registers: int | None = None) -> list:
    """The chunk loop's ops in the order the sm_90a kernel walks them (``registers``: a consumer's)."""
    registers = HopperLowering.consumer_registers(plan.schedule) if registers is None else registers
    return list(plan_issue(plan, live, plan.loops[0], asynchronous=True, registers=registers).order)


def _resized(spec, dims):
    """A sequence's (or a head row vector's, [H, D], or a state's, [B, H, ...]) feature dims set to ``dims["D"]``."""
    if not isinstance(spec, TensorSpec) or "D" not in dims or len(spec.shape) not in (2, 4, 5):
        return spec
    lead = 1 if len(spec.shape) == 2 else 2 if len(spec.shape) == 4 and spec.dtype == "float32" else 3
    if lead == 1 and spec.dtype != "float32":  # a Matrix
        return spec
    return TensorSpec(spec.shape[:lead] + tuple(1 if n == 1 else dims["D"] for n in spec.shape[lead:]), spec.dtype)


LOOPED = [name for name in PROGRAMS if name not in OVER_BUDGET and _plans(name)[0].loops]


@pytest.mark.parametrize("name", LOOPED)
def test_order_keeps_dependences_and_hand_overs(name):
    """The walk is a permutation of the body in which every value is made before it is read (an
    absorbed matmul before the add it is emitted with), stores keep their order, and each value's last reader in
    program order is still its last: the lowering's in-place decisions do not change."""
    plan, live = _plans(name)
    body = plan.loops[0].body
    order = _order(plan, live)
    assert sorted(map(id, order)) == sorted(map(id, body))
    at = {op: i for i, op in enumerate(order)}
    made = {op.result: op for op in body if op.result is not None}
    for op in order:
        for v in op.operands:
            assert v not in made or at[made[v]] < at[op], (name, op.name, v)
    for add, (mm, _) in live.accumulate.items():
        if add in at:
            assert at[mm] < at[add], (name, add)
    stores = [op for op in body if op.name in ("store", "store_state")]
    assert sorted(stores, key=at.get) == stores, name
    for op in body:
        for v in op.operands:
            last = live.last_reader.get(v)
            if last in at and last is not op and v not in {t.result for t in plan.loads}:
                assert at[op] < at[last], (name, op.name, v)


def _chunk_loop(source: str) -> str:
    """The consumer's chunk loop: from its full-barrier wait to the stage's release."""
    body = source.split("tm::mbar_wait(&full[stage]")[1]
    return body.split("mbar_arrive(&empty")[0]


def test_linear_attention_issues_its_matmuls_before_waiting():
    """Linear attention's chunk with two consumers (D=128): q·kᵀ, q·S and the state update S + kᵀ·v are
    all issued before the first wait, which waits for q·kᵀ alone (``wgmma_wait<2>``, to mask it), and
    the chunk waits twice. In program order it waited three times, the state update issued last and
    waited for alone."""
    kernel, specs = PROGRAMS["linear_attention_fwd"]
    loop = _chunk_loop(default_source(kernel, kernel.bind(specs)).source)
    first_wait = loop.index("wgmma_wait")
    assert len(re.findall(r"tm::matmul_(?:rs|ss)<", loop[:first_wait])) == 3, loop
    assert loop[first_wait:].startswith("wgmma_wait<2>"), loop
    assert loop.count("wgmma_wait") == 2, loop


def test_one_consumer_runs_the_state_update_through_the_store():
    """With one consumer per CTA (D=64) the state update is issued after the chunk's other groups, so the
    output's wait leaves it running (``wgmma_wait<1>``) through the store, and the chunk's end waits for
    it: q·kᵀ and q·S, a wait for q·kᵀ, the masked product and the update, a wait for the output."""
    kernel, specs = PROGRAMS["linear_attention_fwd"]
    narrow = kernel.bind({n: _resized(s, {"D": 64}) for n, s in specs.items()})
    loop = _chunk_loop(default_source(kernel, narrow).source)
    waits = re.findall(r"wgmma_wait<(\d)>", loop)
    assert waits == ["1", "1", "0"], loop
    issued = [loop.index(m) for m in re.findall(r"tm::matmul_(?:rs|ss)<[^;]*;", loop)]
    state_update = re.findall(r"tm::matmul_ss<true, true, false, true[^;]*;", loop)  # kᵀ·v, accumulating
    assert len(issued) == 4 and state_update and loop.index(state_update[0]) == max(issued), loop
    assert loop.index("tma_store") > max(issued) and loop.index("tma_store") < loop.rindex("wgmma_wait<0>"), loop


def test_program_order_where_matmuls_first_would_hold_more_registers():
    """The SSD backward's programs (fifteen matmuls a chunk, at the register limit) spill when their
    matmuls are issued early: their loops keep program order."""
    for name in ("ssd_bwd_dc", "ssd_bwd_dx"):
        plan, live = _plans(name, D=64)
        assert _order(plan, live) == plan.loops[0].body, name


def test_a_body_whose_tiles_fill_the_registers_keeps_program_order():
    """The user mixer gla_fwd at K = V = 128 holds more register tiles in program order than a
    consumer has (its 128x128 state spills either way, more in an early order): it keeps program
    order, and would not with the registers to spare (the limit is the one the chunk overlap uses)."""
    plan, live = _plans("gla_fwd")
    units = [op for op in plan.loops[0].body if op not in live.absorbed]
    held = peak_registers(units, unit_reads(units, dict(live.absorbed_by)),
                          lambda v: tile_registers(plan, live, v))
    assert held + OVERLAP_RESERVE > HopperLowering.consumer_registers(plan.schedule)
    assert _order(plan, live) == plan.loops[0].body
    assert _order(plan, live, registers=held + OVERLAP_RESERVE) != plan.loops[0].body


def test_generic_target_keeps_program_order():
    """mma.sync is synchronous: nothing to overlap, the generic kernels walk the body as written."""
    from tilemix.codegen.generic import GenericLowering

    plan, live = _plans("linear_attention_fwd")
    issue = plan_issue(plan, live, plan.loops[0], asynchronous=GenericLowering.asynchronous, registers=0)
    assert list(issue.order) == plan.loops[0].body and not issue.overlapped


def test_schedule_chooses_the_order():
    """``Schedule.issue``: "program" walks the body as written, "early" issues the matmuls first even where
    that holds more registers (the SSD backward), "fit" (the default) only where it does not; anything
    else is an error naming the choices."""
    from tilemix.tiles.errors import TileError

    def walk(name, issue):
        plan, live = _plans(name, D=64, issue=issue)
        return _order(plan, live), plan.loops[0].body

    program, body = walk("linear_attention_fwd", "program")
    assert program == body
    fit, body = walk("linear_attention_fwd", "fit")
    assert fit != body
    fit, body = walk("ssd_bwd_dx", "fit")
    assert fit == body
    early, body = walk("ssd_bwd_dx", "early")
    assert early != body
    with pytest.raises(TileError, match="'fit', 'early', 'program'"):
        walk("linear_attention_fwd", "sideways")


@pytest.mark.parametrize("name", LOOPED)
def test_fit_holds_no_more_registers_than_program_order(name):
    """The default order ("fit") compiles to no more stack (spills) than program order: the register
    estimate behind it keeps the early order only where ptxas agrees it fits."""
    pytest.importorskip("cuda.bindings")
    from tilemix.codegen.compile import compile_cuda, resources

    kernel, specs = PROGRAMS[name]
    binding = kernel.bind({**kernel.consts_for("sm_90a", specs), **specs})
    default = default_schedule(kernel, binding)
    stack = {}
    for issue in ("fit", "program"):
        source = hopper_source(kernel, binding, replace(default, issue=issue))
        stack[issue] = resources(compile_cuda(source.source, "sm_90a", source.name))["stack"]
    assert stack["fit"] <= stack["program"], stack


OVERLAPPED = "the previous chunk's groups are done"  # the chunk's end with its last groups still running


def _source(name: str, D: int, **fields):
    """Program ``name``'s sm_90a source (feature dims ``D``), its default schedule with ``fields`` replaced."""
    kernel, specs = PROGRAMS[name]
    args = {n: _resized(s, {"D": D}) for n, s in specs.items()}
    binding = kernel.bind({**kernel.consts_for("sm_90a", args), **args})
    return hopper_source(kernel, binding, replace(default_schedule(kernel, binding), **fields))


def test_overlap_chooses_whether_groups_cross_chunks():
    """``Schedule.overlap``: "on" leaves a chunk's accumulating groups running into the next chunk, "off"
    waits for them at its end; "fit" (the default) overlaps attention's dk/dv program at D = 64 but
    not at 128, where its two 64x128 accumulators, scores, dp and the probabilities' bf16 operands
    would not fit beside each other (ptxas then serialised every wgmma, bench/NOTES.md "Chunk
    overlap"), and overlaps its dq program at both.
    Anything else is an error naming the choices."""
    from tilemix.tiles.errors import TileError

    assert OVERLAPPED not in _source("attention_bwd_dkdv", 128).source
    assert OVERLAPPED in _source("attention_bwd_dkdv", 128, overlap="on").source
    assert OVERLAPPED in _source("attention_bwd_dkdv", 64).source
    assert OVERLAPPED not in _source("attention_bwd_dkdv", 64, overlap="off").source
    assert OVERLAPPED in _source("attention_bwd_dq", 128).source
    assert OVERLAPPED in _source("gemm_fwd", 128).source
    with pytest.raises(TileError, match="'fit', 'on', 'off'"):
        _source("gemm_fwd", 128, overlap="sometimes")


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name", LOOPED)
def test_fit_overlaps_only_where_ptxas_keeps_wgmma_asynchronous(name, D):
    """Wherever "fit" overlaps chunks, ptxas keeps the wgmmas asynchronous (no remark C7512); and it
    does not where the estimate refuses (attention's dk/dv program at D = 128 forced "on")."""
    pytest.importorskip("cuda.bindings")
    from tilemix.codegen.compile import ptxas_report

    source = _source(name, D)
    if OVERLAPPED in source.source:
        assert "C7512" not in ptxas_report(source.source, "sm_90a", source.name), (name, D)
    if (name, D) == ("attention_bwd_dkdv", 128):
        forced = _source(name, D, overlap="on")
        assert "C7512" in ptxas_report(forced.source, "sm_90a", forced.name)
