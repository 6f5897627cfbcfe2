"""Float64 NumPy ground truth for every op, and the tolerances that judge
the tile programs against it (``tolerance``)."""

from .mixers import attention, gemm, gla, linear_attention, retention, rwkv6, ssd
from .mlstm import mlstm
from .tolerance import BOUNDS, bound, rel_err

__all__ = ["BOUNDS", "attention", "bound", "gemm", "gla", "linear_attention", "rel_err", "retention", "rwkv6", "ssd"]
__all__ += ["mlstm"]
