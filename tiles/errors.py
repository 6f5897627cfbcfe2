"""Errors that point at the user's program, not at tilemix internals."""

from __future__ import annotations

import linecache
import os
import sys
from dataclasses import dataclass

__all__ = ["Loc", "ResourceError", "TileError", "user_loc"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Loc:
    """A line of the user's program."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def source(self) -> str:
        return linecache.getline(self.file, self.line).strip()


class TileError(Exception):
    """A program the language rejects. The message names the user's line."""

    def __init__(self, message: str, loc: Loc | None = None):
        self.message = message
        self.loc = loc
        where = ""
        if loc is not None:
            where = f"\n  at {loc}" + (f"\n    {loc.source}" if loc.source else "")
        super().__init__(message + where)


class ResourceError(TileError):
    """A schedule that needs more of the target (shared memory, registers) than it has; another
    schedule of the same program may fit."""


def user_loc() -> Loc | None:
    """The innermost stack frame outside this package (the user's line)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if os.path.dirname(path) != _PACKAGE_DIR:
            return Loc(frame.f_code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return None
