"""The ``TILEMIX_*`` environment variables: every one the package reads is in ``VARIABLES`` (name,
meaning, default, example) and read through ``read``, which refuses any other name.
``python -m tilemix.codegen.env`` prints the table as markdown."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Variable", "VARIABLES", "read", "snapshot", "cache_root", "markdown"]


@dataclass(frozen=True)
class Variable:
    name: str
    meaning: str
    default: str
    example: str


VARIABLES = (
    Variable("TILEMIX_TARGET", "the GPU kernels' target where `target=` and `use_target` say nothing: "
             "auto, hopper or generic", "auto (by the GPU)", "generic"),
    Variable("TILEMIX_SCHEDULE", "Schedule fields replacing a program's default schedule, per program "
             "(`schedule_overrides`; a tuned config still wins)", "none", "ssd_bwd_dc:stages=1;gemm_fwd:stages=3"),
    Variable("TILEMIX_POISON", "outputs start as NaN, so tests catch elements a kernel leaves unwritten", "off", "1"),
    Variable("TILEMIX_CACHE", "where compiled kernels and tuned configs are kept", "~/.cache/tilemix",
             "/tmp/tilemix-cache"),
    Variable("TILEMIX_AUTOTUNE", "1: a call with no tuned config tunes one first", "off", "1"),
    Variable("TILEMIX_SEGMENTS", "the sequence segments every segmented scan runs in, where T allows "
             "(`segment_count`)", "chosen per call", "4"),
    Variable("TILEMIX_SSD_BWD_SPLIT", "the width of the column blocks of P the SSD backward programs run on; "
             "0: none (`head_split_width`)", "64 on a GPU", "0"),
)
_NAMES = frozenset(v.name for v in VARIABLES)


# os.environ's own dict (POSIX: bytes keys and values), which every os.environ write keeps in step:
# a lookup there skips the KeyError that os.environ.get raises and catches for an unset name
# (1-4 µs each; a remembered CUDA call reads six)
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None
_KEYS = {name: os.fsencode(name) for name in _NAMES}


def read(name: str) -> str | None:
    """The value of ``name``, one of ``VARIABLES`` (None when unset); any other name is a KeyError,
    so no variable goes undocumented."""
    if name not in _NAMES:
        raise KeyError(f"{name} is not one of the documented variables {sorted(_NAMES)}")
    if _ENVIRON is None:
        return os.environ.get(name)
    value = _ENVIRON.get(_KEYS[name])
    return None if value is None else os.fsdecode(value)


def snapshot(names: tuple[str, ...]) -> tuple:
    """The values of ``names`` (documented variables) as they are now, undecoded (None where unset):
    a cache key for what they select, cheaper than ``read`` of each (a remembered CUDA call takes one)."""
    if _ENVIRON is None:
        return tuple(map(os.environ.get, _checked(names)))
    return tuple(map(_ENVIRON.get, _encoded(names)))


@functools.cache
def _checked(names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in names if name not in _NAMES]
    if unknown:
        raise KeyError(f"{unknown} are not documented variables {sorted(_NAMES)}")
    return names


@functools.cache
def _encoded(names: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(_KEYS[name] for name in _checked(names))


def cache_root() -> Path:
    """``$TILEMIX_CACHE``, else ``~/.cache/tilemix``: where compiled kernels and tuned configs are kept."""
    root = read("TILEMIX_CACHE")
    return Path(root) if root is not None else Path.home() / ".cache" / "tilemix"


def markdown() -> str:
    """``VARIABLES`` as a markdown table (for the README)."""
    rows = ["| variable | meaning | default | example |", "|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.meaning} | {v.default} | `{v.example}` |" for v in VARIABLES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
