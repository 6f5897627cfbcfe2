"""Float64 NumPy ground truth for every op, and the tolerances that judge
the tile programs against it (``tolerance``)."""

from .based import based
from .bidirectional import bidirectional_linear_attention, prefix_linear_attention
from .lolcats import lolcats_attention
from .long_conv import gated_long_conv, long_conv
from .mixers import attention, gemm, gla, linear_attention, retention, rwkv6, ssd
from .mlstm import mlstm
from .rwkv7 import rwkv7
from .selective_scan import selective_scan
from .tolerance import BOUNDS, bound, rel_err

__all__ = ["BOUNDS", "attention", "bidirectional_linear_attention", "bound", "gemm", "gla", "linear_attention",
           "prefix_linear_attention", "rel_err", "retention", "rwkv6", "selective_scan", "ssd"]
__all__ += ["mlstm"]
__all__ += ["based"]
__all__ += ["long_conv", "gated_long_conv"]
__all__ += ["lolcats_attention"]
__all__ += ["rwkv7"]
