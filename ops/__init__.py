"""Sequence mixers written in the tile language, callable on torch tensors.

Each op is a ``@kernel`` program (``*_fwd``) plus a public function with the
flash-linear-attention calling convention. CPU tensors run the NumPy
interpreter; the GPU backends are built in ``tilemix.codegen``. Programs of
your own run the same way: ``run(kernel, **args)`` returns their outputs and
final states, ``mixer(kernel)`` makes them a differentiable torch function (a custom
op that ``torch.compile`` traces; its backward derived from the program, ``ops/derived.py``),
see ``tilemix.ops.runtime``.
"""

from tilemix.tiles import __version__

from ._library import Mixer, custom_op, mixer
from .attention import attention, attention_fwd
from .based import based, based_fwd
from .bidirectional import (
    bidirectional_linear_attention_fwd,
    bidirectional_linear_attention_normalized_fwd,
    prefix_linear_attention,
    prefix_linear_attention_fwd,
)
from .context_parallel import attention_cp, linear_attention_cp, ssd_cp
from .decode import (
    Step,
    delta_rule_step,
    gated_delta_rule_step,
    gla_step,
    linear_attention_step,
    retention_step,
    rwkv6_step,
    ssd_step,
    step,
)
from .delta_rule import (
    delta_rule,
    delta_rule_fwd,
    delta_rule_prepare,
    delta_rule_scan,
    gated_delta_rule,
    gated_delta_rule_fwd,
    gated_delta_rule_prepare,
    gated_delta_rule_scan,
)
from .gated import gla, gla_fwd, retention, retention_fwd, rwkv6, rwkv6_fwd
from .gemm import gemm, gemm_fwd, gemm_nt, gemm_tn
from .layers import (
    Based,
    DeltaNet,
    GatedLinearAttention,
    H3Conv,
    HedgehogFeatureMap,
    LinearAttention,
    LoLCATsAttention,
    Mamba1Mixer,
    Mamba2Mixer,
    MLSTMLayer,
    MultiHeadAttention,
    Retention,
    RWKV6TimeMix,
    RWKV7TimeMix,
)
from .linear_attention import linear_attention, linear_attention_fwd, linear_attention_scan
from .lolcats import lolcats_attention, lolcats_fwd
from .long_conv import gated_long_conv, long_conv
from .mlstm import mlstm, mlstm_fwd
from .models import HybridLM
from .runtime import run, use_target
from .rwkv7 import rwkv7, rwkv7_prepare, rwkv7_prepare_output, rwkv7_scan
from .selective_scan import selective_scan, selective_scan_fwd
from .ssd import ssd, ssd_fwd, ssd_scan

PROGRAMS = {
    "gemm": gemm_fwd,
    "attention": attention_fwd,
    "linear_attention": linear_attention_fwd,
    "ssd": ssd_fwd,
}

SEGMENTED = {  # ops whose scan can run in sequence segments (ops/_segments.py; tuned by `tilemix tune`)
    "linear_attention": linear_attention_scan,
    "ssd": ssd_scan,
}

__all__ = ["__version__", "attention", "gemm", "linear_attention", "ssd", "PROGRAMS", "SEGMENTED",
           "attention_fwd", "gemm_fwd", "gemm_nt", "gemm_tn", "linear_attention_fwd", "ssd_fwd",
           "MultiHeadAttention", "LinearAttention", "Mamba2Mixer", "HybridLM", "use_target", "custom_op",
           "run", "mixer", "Mixer", "linear_attention_cp", "ssd_cp", "attention_cp"]
__all__ += ["retention", "retention_fwd", "gla", "gla_fwd", "rwkv6", "rwkv6_fwd", "Retention", "GatedLinearAttention",
            "RWKV6TimeMix"]
__all__ += ["delta_rule", "gated_delta_rule", "delta_rule_fwd", "gated_delta_rule_fwd", "delta_rule_prepare",
            "delta_rule_scan", "gated_delta_rule_prepare", "gated_delta_rule_scan", "DeltaNet"]
__all__ += ["mlstm", "mlstm_fwd", "MLSTMLayer"]
__all__ += ["prefix_linear_attention", "prefix_linear_attention_fwd", "bidirectional_linear_attention_fwd",
            "bidirectional_linear_attention_normalized_fwd"]
__all__ += ["selective_scan", "selective_scan_fwd", "Mamba1Mixer"]
__all__ += ["based", "based_fwd", "Based"]
__all__ += ["long_conv", "gated_long_conv", "H3Conv"]
__all__ += ["step", "Step", "linear_attention_step", "ssd_step", "retention_step", "gla_step", "rwkv6_step",
            "delta_rule_step", "gated_delta_rule_step"]
__all__ += ["lolcats_attention", "lolcats_fwd", "LoLCATsAttention", "HedgehogFeatureMap"]
__all__ += ["rwkv7", "rwkv7_prepare", "rwkv7_prepare_output", "rwkv7_scan", "RWKV7TimeMix"]
