"""The kernel-parameter kinds a lowering hands the launch are ``ParamKind`` members, not bare strings:
Hopper passes 16-bit tensors as tensor maps, the generic target as addresses."""

from test_generic import PROGRAMS

from tilemix.codegen.generic import lower_generic
from tilemix.codegen.hopper import lower_hopper
from tilemix.codegen.source import ParamKind


def test_params_are_param_kinds():
    kernel, specs = PROGRAMS["linear_attention_fwd"]
    binding = kernel.bind(specs)
    hopper = [kind for kind, _ in lower_hopper(kernel.trace(binding, target="sm_90a")).params]
    generic = [kind for kind, _ in lower_generic(kernel.trace(binding, target="sm_80"), "sm_80").params]
    assert all(type(kind) is ParamKind for kind in hopper + generic)
    assert ParamKind.TMAP in hopper and ParamKind.TMAP_OUT in hopper
    assert ParamKind.PTR in generic and ParamKind.PTR_OUT in generic
    assert not {ParamKind.TMAP, ParamKind.TMAP_OUT} & set(generic)
    assert ParamKind.TMAP == "tmap"  # the values the launch and cached plans have always used
