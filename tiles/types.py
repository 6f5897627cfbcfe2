"""Value types of the tile language: dtypes, memory spaces and tile shapes.

Everything is a 2-D tile. Vectors are tiles with one unit dimension — a
column vector ``(rows, 1)`` holds one value per row (a row sum, a per-token
decay), a row vector ``(1, cols)`` one value per column — and a scalar is
``(1, 1)``. Broadcasting follows NumPy, so ``tile * colvec`` scales rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["DType", "Space", "TileType", "Axis", "INDEX", "dtype_of"]


class DType(str, Enum):
    """Element types. Inputs are f32/f16/bf16; arithmetic and state are f32."""

    f32 = "f32"
    f64 = "f64"  # CPU only: the interpreter in double precision (gradient checks)
    f16 = "f16"
    bf16 = "bf16"
    bool = "bool"
    index = "index"

    def __str__(self) -> str:
        return self.value


FLOAT_DTYPES = (DType.f32, DType.f16, DType.bf16, DType.f64)

_DTYPE_NAMES = {
    "f32": DType.f32, "float32": DType.f32, "fp32": DType.f32,
    "f64": DType.f64, "float64": DType.f64, "fp64": DType.f64, "double": DType.f64,
    "f16": DType.f16, "float16": DType.f16, "fp16": DType.f16, "half": DType.f16,
    "bf16": DType.bf16, "bfloat16": DType.bf16,
}


def dtype_of(x) -> DType | None:
    """The tile dtype named by a string, a DType, a numpy or a torch dtype; None if unsupported."""
    if isinstance(x, DType):
        return x
    name = str(x).replace("torch.", "")
    return _DTYPE_NAMES.get(name)


class Space(str, Enum):
    """Where a tile lives: global memory (kernel parameters), shared memory
    (tiles loaded from a parameter) or registers (everything computed)."""

    global_ = "global"
    shared = "shared"
    register = "register"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Axis:
    """Which sequence positions a tile axis covers: chunk ``index`` of size
    ``size`` along the loop dimension ``dim``. Masks (causal, window, in_seq)
    read positions from here, so they are right for any pair of chunks."""

    index: int  # id of the loop-index value
    size: int
    dim: str


@dataclass(frozen=True)
class TileType:
    rows: int
    cols: int
    dtype: DType = DType.f32
    space: Space = Space.register
    row_axis: Axis | None = None
    col_axis: Axis | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def is_scalar(self) -> bool:
        return self.shape == (1, 1)

    def __str__(self) -> str:
        if self.dtype is DType.index:
            return "index"
        if self.is_scalar:
            kind = f"scalar<{self.dtype}"
        elif self.cols == 1:
            kind = f"colvec<{self.rows}x{self.dtype}"
        elif self.rows == 1:
            kind = f"rowvec<{self.cols}x{self.dtype}"
        else:
            kind = f"tile<{self.rows}x{self.cols}x{self.dtype}"
        return kind + ("" if self.space is Space.register else f", {self.space}") + ">"


INDEX = TileType(1, 1, DType.index)
