"""Which register tiles a matmul stages, and where: at the matmul, or earlier, at their last register reader.

A tensor-core matmul reads its B operand (and A where transposed) from shared memory, so a
register tile in that place is stored there ("staged") where the matmul is emitted. A tile that
elementwise ops also read keeps its registers until then, though after its last such reader only
matmuls read it, from shared memory. Staged just before that reader instead, its registers die
there (the reader may write its result over them). The derived SSD backward's dt program loads
each chunk's saved state (128x64 fp32: 64 registers a thread), multiplies it with the state's
gradient and reads it again in ``C·h``: staged at the product, its sm_90a kernel spilled 72 bytes,
not 368. A tile only matmuls read is staged where it is made (its registers then free for what
comes between), unless a wgmma group is in flight there: 8 derived programs of the mixer library
stopped spilling (the delta rule's dv at D = 128: 280 bytes)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from tilemix.tiles.ir import Loop, Op, Value

from .liveness import Liveness
from .structure import PANEL

__all__ = ["staged_operands", "plan_early_staging"]


def staged_operands(mm: Op, loaded: frozenset[Value], register_a: bool = False) -> list[Value]:
    """The tiles matmul ``mm`` stages: B, and A where it is read transposed (or ``register_a``:
    where it would be read from registers), unless loaded (those are read where they lie); none for
    vector products (``layout`` transposes their vectors) or for matmuls not in whole 64-row panels."""
    a, b = mm.operands
    ta = mm.attrs["ta"]
    m, n, k = mm.result.type.rows, mm.result.type.cols, a.type.rows if ta else a.type.cols
    if (n == 1 and not ta) or m == 1 or m % 64 or n % 64 or k % 16:
        return []
    staged = [v for v in (b, a if ta or register_a else None) if v is not None and v not in loaded]
    return [v for v in staged if not (v.type.cols % PANEL or v.type.rows % 64)]


def plan_early_staging(loop: Loop, order: list[Op], reads: Mapping[Op, set[Value]], live: Liveness,
                       loaded: frozenset[Value], in_place: frozenset[str],
                       register_a: bool = False) -> Mapping[Op, tuple[Value, ...]]:
    """op -> the tiles staged just before it (``Emitter.shared``): tiles made in ``loop``'s body, not
    carried on, that it is the last to read in registers (it then takes them over, its result of
    their shape), or made by the op before it and read by none in registers, every later reader in
    ``order`` (the body less its absorbed matmuls; ``reads``: what each reads) being a matmul that
    stages them. Readers take them over only where they may write over an operand (``in_place``:
    elementwise ops): staging before a register matmul (its A operand) only moved ptxas's choices
    (the delta rule scan's dw: 48 bytes of spills from none). ``register_a``
    (``Schedule.stage_a``): an A operand counts as staged too, so a tile only matmuls read is staged
    at birth even where one reads it as A, from shared memory then, not registers."""
    matmul = {add: mm for add, (mm, _) in live.accumulate.items()}
    made = {u.result for u in order if u.result is not None} - set(loop.update)
    staging = {u: set(staged_operands(matmul.get(u, u), loaded, register_a)) - {live.accumulate[u][1]}
               if u in live.accumulate else set(staged_operands(u, loaded, register_a)) if u.name == "matmul" else set()
               for u in order}
    found: dict[Op, set[Value]] = {}
    for v in made - loaded - live.shared_rows:
        readers = [u for u in order if v in reads[u]]
        in_registers = [i for i, u in enumerate(readers) if v not in staging[u]]
        if not in_registers and readers:  # only matmuls read it, from shared memory: staged at birth
            born = next(i for i, u in enumerate(order) if u.result is v)
            if born + 1 < len(order) and not _groups_in_flight(order, born, reads, matmul):
                found.setdefault(order[born + 1], set()).add(v)
            continue
        if not in_registers or in_registers[-1] == len(readers) - 1:
            continue
        last = readers[in_registers[-1]]
        if (last.name in in_place and last not in live.accumulate and last.result is not None
                and last.result.type.shape == v.type.shape
                and all(v in staging[u] for u in readers[in_registers[-1] + 1:])):
            found.setdefault(last, set()).add(v)
    return MappingProxyType({op: tuple(sorted(vs, key=lambda v: v.id)) for op, vs in found.items()})


def _groups_in_flight(order: list[Op], at: int, reads: Mapping[Op, set[Value]], matmul: Mapping[Op, Op]) -> bool:
    """Whether ``order[at]`` is a matmul or leaves one in flight (issued before, its result read
    after): staging there would wait for it, or hold the tile beside pinned accumulators, where
    ptxas spilled more than it saved (retention's d_log_gamma at D = 128: 64 -> 312 bytes)."""
    def issues(u: Op) -> bool:
        return u.name == "matmul" or u in matmul

    if issues(order[at]):
        return True
    return any(issues(u) and u.result is not None and any(u.result in reads[w] for w in order[at + 1:])
               and not any(u.result in reads[w] for w in order[i + 1:at + 1])
               for i, u in enumerate(order[:at]))
