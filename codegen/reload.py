"""Where a loaded tile's register copy is dropped and its reader reads the shared tile afresh.

A tile the chunk loads (a ring stage's) has no registers of its own: ``Emitter.reg`` copies it
into registers at the first reader that needs them, and the copy is reused by the readers after
it (reading the tile afresh at every use spilled more in SSD: each copy is one more tile while the
old ones are still live). But a copy read at the top of the body and again at its end holds its
registers through everything between: GLA's 64x128 gate chunk, 64 registers a thread, from its
cumsum to its column sum across the scores, the state and the exp factors. ``plan_reloads``
splits such a copy's live range where it is held across the body's peak of registers and that
peak exceeds the consumer's budget: the copy dies at the reader before the peak, and the one after
it reads the stage again (a new copy, or a binary map's view of the tile); then the registers are
counted again, for the next peak. Only at the peak: there the spill is certain, so a reload
replaces a spill and its fill; a copy held through lower points only moves ptxas's choices (gla's
d_g at D = 128 spilled 2704 bytes instead of 2560 when its gate was reloaded below the peak). The stage stays valid
until the body releases it at its end, so any reader in the body may read it again.

Registers are counted as ``liveness.registers_at`` counts them (register tiles from their
op to their last reader), with the copies added where the emitter makes them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from tilemix.tiles.ir import Op, Value

from .liveness import registers_at

__all__ = ["plan_reloads"]

Mode = Callable[[Op, Value], "bool | None"]


def plan_reloads(order: list[Op], reads: Mapping[Op, set[Value]], loaded: frozenset[Value],
                 in_registers: Callable[[Value], int], copy_registers: Callable[[Value], int],
                 reads_copy: Mode, capacity: int) -> Mapping[Op, frozenset[Value]]:
    """reader -> the loaded tiles it reads afresh, for the body walked in ``order`` (its ops less
    the absorbed matmuls; ``reads``: what each reads). ``in_registers(v)``: a value's registers (0
    for loaded tiles), ``copy_registers(v)``: a loaded tile's copy's; ``reads_copy(op, v)``: True
    where ``op`` reads ``v`` through its register copy (making one), False where it reads the shared
    tile, None where it reads the copy if one is live, else the tile in place (a binary map);
    ``capacity``: the registers a thread has for tiles. Greedy: of the copies held across the
    peak, the one held across the most ops is split first."""
    reload: set[tuple[Value, Op]] = set()
    while True:
        over = _overflowing_gaps(order, reads, loaded, in_registers, copy_registers, reads_copy, reload, capacity)
        if not over:
            break
        reload.add(max(over, key=lambda gap: gap[:2])[2])
    found: dict[Op, set[Value]] = {}
    for v, reader in reload:
        found.setdefault(reader, set()).add(v)
    return MappingProxyType({op: frozenset(vs) for op, vs in found.items()})


def _copy_uses(order: list[Op], reads: Mapping[Op, set[Value]], loaded: frozenset[Value], reads_copy: Mode,
               reload: set[tuple[Value, Op]]) -> list[tuple[Value, list[int]]]:
    """Each register copy the emitter makes: the tile, and the positions of the readers reading
    that copy (the first made it)."""
    copies: list[tuple[Value, list[int]]] = []
    open_: dict[Value, list[int]] = {}  # tile -> its live copy's readers
    for i, op in enumerate(order):
        for v in sorted(reads[op] & loaded, key=lambda x: x.id):
            if (v, op) in reload:
                open_.pop(v, None)
            mode = reads_copy(op, v)
            if mode is True and v not in open_:
                open_[v] = [i]
                copies.append((v, open_[v]))
            elif mode is not False and v in open_:
                open_[v].append(i)
    return copies


def _overflowing_gaps(order, reads, loaded, in_registers, copy_registers, reads_copy, reload, capacity):
    """(ops spanned, -position, (tile, reader)) for each gap between two readers of a copy across
    the body's peak of registers, where that peak exceeds ``capacity``."""
    copies = _copy_uses(order, reads, loaded, reads_copy, reload)
    held = registers_at(order, reads, in_registers)
    for v, uses in copies:
        for i in range(uses[0], uses[-1]):
            held[i] += copy_registers(v)
    peak = max(held, default=0)
    if peak <= capacity:
        return []
    return [(at - before, -at, (v, order[at])) for v, uses in copies for before, at in zip(uses, uses[1:])
            if peak in held[before + 1:at] and (v, order[at]) not in reload]

