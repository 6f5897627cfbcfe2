"""The tile language: write a sequence mixer as chunked loops of tile math.

    from tilemix.tiles import kernel, Seq, State, Out, Scalar, chunks, causal

    @kernel
    def linear_attention(q: Seq["K"], k: Seq["K"], v: Seq["V"], scale: Scalar,
                         o: Out[Seq["V"]], s: State["K", "V"] = None):
        for c in chunks(64):
            qc, kc, vc = q[c] * scale, k[c], v[c]
            o[c] = causal(qc @ kc.T) @ vc + qc @ s
            s = s + kc.T @ vc

A ``@kernel`` is traced into a typed SSA IR (``tilemix.tiles.ir``), checked by
the verifier (``verify``), and run by the NumPy interpreter on the CPU or
lowered to GPU kernels by ``tilemix.codegen``. ``tilemix.tiles.autodiff``
derives a scan program's backward as more programs of the language.
"""

from importlib.metadata import version as _version

from .errors import Loc, TileError
from .ir import Program
from .kernel import Kernel, TensorSpec, kernel
from .language import (
                       blocks,
                       cast,
                       causal,
                       chunks,
                       colmax,
                       colsum,
                       concat,
                       cos,
                       cumsum,
                       exp,
                       exp2,
                       eye,
                       floor,
                       full,
                       in_seq,
                       iota,
                       linrec,
                       log,
                       maximum,
                       minimum,
                       outer,
                       position,
                       rowmax,
                       rowsum,
                       segsum,
                       sigmoid,
                       sin,
                       softplus,
                       sqrt,
                       tanh,
                       trisolve,
                       where,
                       window,
                       zeros,
)
from .params import Const, GroupSeq, Head, Matrix, Out, Scalar, Seq, State
from .targets import TARGETS, Target
from .types import DType, Space, TileType
from .verify import verify

__version__ = _version("tilemix")  # the installed distribution's, as pip and `tilemix --version` report it

__all__ = [
    "__version__", "kernel", "Kernel", "TensorSpec", "Program", "TileError", "Loc", "verify", "Target", "TARGETS",
    "DType", "Space", "TileType",
    "Seq", "GroupSeq", "Head", "State", "Matrix", "Scalar", "Const", "Out",
    "chunks", "blocks", "zeros", "full", "exp", "exp2", "log", "sqrt", "sigmoid", "softplus", "tanh", "where",
    "maximum", "minimum", "causal", "window", "in_seq", "rowsum", "rowmax", "colsum", "colmax",
    "cumsum", "segsum", "cast", "sin", "cos", "iota", "eye", "position", "concat", "linrec", "trisolve", "outer",
    "floor",
]
