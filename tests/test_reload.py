"""Register copies of loaded tiles dropped across the body's peak of registers and read afresh from
the stage (codegen/reload.py): the plan splits a copy only where the peak exceeds the budget and the
copy is held across it, and the lowering then loads the tile again at the reader after the peak."""

from __future__ import annotations

import re

import pytest

from tilemix.codegen.reload import plan_reloads
from tilemix.codegen.schedule import default_schedule
from tilemix.codegen.specialise import kernel_source
from tilemix.ops.examples import kernel_specs
from tilemix.ops.gated import gla_fwd
from tilemix.tiles.ir import Op, Value

TILE = 64  # registers of each value below


def _op(name: str, *operands: Value) -> Op:
    return Op(name, tuple(operands), {}, Value(None), None)


def _body(between: int):
    """``g`` (a loaded tile) read by a unary op, ``between`` live tiles made after it, then read
    again by a second unary op: reader 1, the tiles, reader 2."""
    g = Value(None)
    first = _op("exp", g)
    held = [_op("full") for _ in range(between)]
    second = _op("neg", g, *(op.result for op in held))
    order = [first, *held, second]
    return g, second, order


def _reloads(order, g, capacity, reads_copy=lambda op, v: True):
    """The plan for ``order``, where the ``full`` ops' results take a tile of registers each."""
    reads = {op: set(op.operands) for op in order}
    tiles = {op.result for op in order if op.name == "full"}
    return plan_reloads(order, reads, frozenset({g}), lambda v: TILE if v in tiles else 0, lambda v: TILE,
                        reads_copy, capacity)


def test_a_copy_held_across_a_peak_over_the_budget_is_read_again():
    g, second, order = _body(3)  # the peak: 3 tiles and the copy
    assert dict(_reloads(order, g, capacity=4 * TILE - 1)) == {second: frozenset({g})}


def test_a_body_within_the_budget_keeps_its_copy():
    g, _, order = _body(3)
    assert not _reloads(order, g, capacity=4 * TILE)


def test_a_copy_held_only_below_the_peak_is_kept():
    """The peak (four tiles made after the second reader) is over the budget, but the copy is
    not held across it: reading the tile again would not lower it."""
    g, second, order = _body(1)
    late = [_op("full") for _ in range(4)]
    order += [*late, _op("add", *(op.result for op in late))]  # the peak: four tiles
    assert not _reloads(order, g, capacity=3 * TILE)


def test_a_reader_of_the_shared_tile_holds_no_copy():
    """A matmul reads the loaded tile from shared memory: no copy is held, nothing to reload."""
    g, _, order = _body(3)
    assert not _reloads(order, g, capacity=TILE, reads_copy=lambda op, v: False)


def _gla_source(D: int, arch: str) -> str:
    binding = gla_fwd.bind(kernel_specs(gla_fwd, size=D, T=4096))
    return kernel_source(gla_fwd, binding, default_schedule(gla_fwd, binding, arch), arch).source


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_gla_reads_its_gate_again_after_the_peak_at_d128(arch):
    """GLA's 64x128 gate chunk is copied for its cumsum and read again by its column sum at the end
    of the body: at D = 128 the copy is dropped and the column sum loads the stage again."""
    source = _gla_source(128, arch)
    copies = re.findall(r"tm::rt<64, 128> (v\d+_r\d*); tm::load_shared", source)
    assert len(copies) == 2 and copies[1] == copies[0] + "1", copies
    lines = source.splitlines()
    first_uses = [i for i, line in enumerate(lines) if re.search(rf"\b{copies[0]}\b", line)]
    reload = next(i for i, line in enumerate(lines) if f"{copies[1]};" in line)
    assert max(first_uses) < reload  # the first copy is dead before the second is loaded
    assert re.search(rf"tm::reduce_cols\(v\d+, {copies[1]},", source)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_gla_within_the_budget_copies_its_gate_once_at_d64(arch):
    assert len(re.findall(r"tm::rt<64, 64> v\d+_r\d*; tm::load_shared", _gla_source(64, arch))) == 1
