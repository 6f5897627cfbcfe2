"""The derived backward as GPU kernels (``ops.derived_cuda``): every program the CUDA path launches
for linear attention and SSD compiles with tensor-core MMA and no local memory on sm_90a (HGMMA)
and the generic target (sm_80, HMMA), at head dims 64 and 128; on a GPU, bf16 gradients within
the bf16 bound of the float64 ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compile_checks import MMA, check_compiled, has_wide_matmul

from tilemix import ops
from tilemix.ops.examples import example_specs, kernel_specs
from tilemix.reference.tolerance import bound, rel_err

pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra (cuda-bindings, nvidia-cuda-nvrtc)")

from tilemix.codegen.schedule import SPLIT_WIDTH, default_schedule  # noqa: E402
from tilemix.codegen.specialise import kernel_source  # noqa: E402
from tilemix.ops.derived_cuda import backward_launches, column_split, whole_width  # noqa: E402
from tilemix.tiles.autodiff import derive_backward  # noqa: E402

OPS = {"linear_attention": ("q", "k", "v"), "ssd": ("x", "dt", "A", "B", "C", "D")}  # the gradients launched
# (op, head dim) -> the programs launched, by the gradient leading each: SSD's dA rides in dt's
# program, dD in dx's where dx runs in one block (D = 64); linear attention's gradients need no
# checkpoints (dq runs forward-fused): no states program
PROGRAMS = {("linear_attention", 64): ("q", "k", "v"), ("linear_attention", 128): ("q", "k", "v"),
            ("ssd", 64): ("states", "x", "dt", "B", "C"), ("ssd", 128): ("states", "x", "dt", "B", "C", "D")}
# (op, head dim, arch, program) -> local memory bytes measured, where the program still spills: SSD's
# dt and A gradients keep more 64-wide fp32 tiles live than a thread's registers (dx with dD, sm_80: 16 B)
SPILLING: dict[tuple, int] = {
    ("ssd", 64, "sm_90a", "dt"): 16, ("ssd", 64, "sm_80", "dt"): 8, ("ssd", 64, "sm_80", "x"): 16,
    ("ssd", 128, "sm_90a", "dt"): 72, ("ssd", 128, "sm_80", "dt"): 16,
}


def _launches(op: str, D: int, arch: str):
    """The launches at head dim ``D`` on ``arch`` (the CUDA path's, ``derived_cuda``): the gradients
    ``whole_width`` names at the full width (transposed where it says), the others in one column block."""
    kernel = ops.PROGRAMS[op]
    binding = kernel.bind(example_specs(op, D=D))
    outputs = [p.name for p in binding.params if p.spec.output or p.spec.kind == "state"]
    dim = column_split(kernel, binding)
    if dim is None:
        return kernel, backward_launches(kernel, binding, outputs, OPS[op])
    whole = whole_width(kernel, binding, outputs, OPS[op], arch)
    launches = []
    for transpose in (False, True):
        names = [n for n, turned in whole.items() if turned is transpose]
        launches += backward_launches(kernel, binding, outputs, names, transpose) if names else []
    blocked = [n for n in OPS[op] if n not in whole]
    if blocked:
        block = kernel.bind(example_specs(op, D=D, sizes={dim: SPLIT_WIDTH}))
        launches += [launch for launch in backward_launches(kernel, block, outputs, blocked)
                     if launch[0] is not None or not any(n is None for n, _, _ in launches)]
    return kernel, launches


@pytest.mark.parametrize("arch", list(MMA))
@pytest.mark.parametrize("op, D, program", [(op, D, p) for (op, D), names in PROGRAMS.items() for p in names])
def test_derived_backward_compiles_without_local_memory(op, program, D, arch):
    kernel, launches = _launches(op, D, arch)
    (derived, binding), = [(k, b) for name, k, b in launches if (name or "states") == program]
    check_compiled(derived, binding, arch, (op, D, arch, program), SPILLING,
                   mma=has_wide_matmul(derived, binding, arch))


def test_wide_states_run_in_column_blocks():
    """At head dim 128 the state's columns split into SPLIT_WIDTH-wide blocks on the host (the
    reverse programs contract them, so no schedule can split them); at 64 they do not."""
    kernel = ops.PROGRAMS["linear_attention"]
    assert column_split(kernel, kernel.bind(example_specs("linear_attention", D=128))) == "V"
    assert column_split(kernel, kernel.bind(example_specs("linear_attention", D=64))) is None


def test_linear_attention_gradients_run_at_full_width():
    """At D = 128 every gradient of linear attention runs once, its state's columns split inside
    each CTA (two consumers), no host blocks: dv as derived (it contracts none of the state's V
    columns), dq and dk carrying their states transposed (they contract V, not K)."""
    kernel = ops.PROGRAMS["linear_attention"]
    binding = kernel.bind(example_specs("linear_attention", D=128))
    assert whole_width(kernel, binding, ["o", "s"], ["q", "k", "v"]) == {"k": True, "q": True, "v": False}
    for name, split in (("v", "V"), ("k", "K"), ("q", "K")):
        (_, derived, derived_binding), = backward_launches(kernel, binding, ["o", "s"], [name], name != "v")
        schedule = default_schedule(derived, derived_binding)
        assert dict(schedule.split) == {split: 64} and schedule.consumers == 2, name


def test_retention_gradients_run_at_full_width():
    """At D = 128 on sm_90a retention's gradients run once, no host blocks: dv as derived, dq and dk
    transposed, their ``do·scale`` gone (``tiles.matmul_scalars``: dq's 64x128 fp32 copies of the
    scaled and decayed ``do`` spilled 376 bytes, and ran in V blocks that torch then summed)."""
    kernel = ops.retention_fwd
    binding = kernel.bind(kernel_specs(kernel, size=128))
    assert whole_width(kernel, binding, ["o", "s"], ["q", "k", "v"]) == {"q": True, "k": True, "v": False}


def test_ssd_gradients_at_full_width():
    """At N = P = 128 on sm_90a SSD's dx runs once as derived (P splits in the CTA), dB and dC
    transposed (N splits): the newest gradient term is the product the lowering accumulates into the
    other, so dB does not hold the scaled x and the state's copy to the add, and dC recomputes the
    state's product where its adjoint reads it (both spilled and ran in host blocks)."""
    kernel = ops.PROGRAMS["ssd"]
    binding = kernel.bind(example_specs("ssd", D=128))
    outputs = [p.name for p in binding.params if p.spec.output or p.spec.kind == "state"]
    assert whole_width(kernel, binding, outputs, OPS["ssd"]) == {"x": False, "B": True, "C": True}


def test_saved_states_take_the_forward_column_split():
    """The states program at head dim 128 splits the state's columns as the forward does; each
    consumer saves its 64 columns of the chunk's full-width [K, V] tile."""
    kernel = ops.PROGRAMS["linear_attention"]
    binding = kernel.bind(example_specs("linear_attention", D=128))
    backward = derive_backward(kernel, binding, ["o"], ["q"], fuse=False)  # dq from checkpoints
    states, states_binding = backward.kernels(kernel, binding)[0], backward.bindings(binding)[0]
    schedule = default_schedule(states, states_binding)
    assert dict(schedule.split) == {"V": 64}
    source = kernel_source(states, states_binding, schedule).source
    assert f"* {128 * 128} + (colcta * {schedule.consumers} + wg) * 64, 128, " in source


@pytest.mark.parametrize("op, D, blocks", [("linear_attention", 64, False), ("linear_attention", 128, False),
                                           ("ssd", 128, False), ("linear_attention", 128, True), ("ssd", 128, True)])
def test_cuda_path_with_the_interpreter_for_launches(monkeypatch, op, D, blocks):
    """``derived_gradients_cuda``'s host side (checkpoint buffers, one reverse program per
    gradient, column blocks, full-width gradients with their states passed and read transposed,
    Head/GroupSeq reductions) with each launch run by the interpreter instead: the interpreter's own
    gradients (``derived_gradients`` on CPU tensors). ``blocks``: every gradient in column blocks,
    a Seq input's written in place into its columns of the whole gradient, the others summed."""
    from tilemix.ops import derived_cuda
    from tilemix.ops.derived import derived_gradients
    from tilemix.tiles.interpret import interpret

    def interpreted(kernel, binding, args, outputs, arch):
        program = kernel.trace(binding)  # fp32 inputs: the CPU target
        got = interpret(program, binding, {n: (v.numpy() if isinstance(v, torch.Tensor) else v)
                                           for n, v in args.items() if v is not None})
        for name, t in outputs.items():
            t.copy_(torch.from_numpy(np.array(got[name])))

    monkeypatch.setattr(derived_cuda, "_run", interpreted)
    monkeypatch.setattr(derived_cuda, "_fits", lambda derived, binding, arch: True)  # fp32: no sm_90a kernel
    monkeypatch.setattr(derived_cuda, "_WHOLE", {})  # whole_width's answers, asked again with that _fits
    if blocks:
        monkeypatch.setattr(derived_cuda, "whole_width", lambda *args: {})
    kernel = ops.PROGRAMS[op]
    args = {n: (v.float() if isinstance(v, torch.Tensor) else v) for n, v in _case(op, T=100, H=2, D=D).items()}
    gen = torch.Generator().manual_seed(2)
    cotangents = {n: torch.randn(o.shape, generator=gen) for n, o in kernel(**args).items()}
    wrt = [n for n, v in args.items() if isinstance(v, torch.Tensor)]
    want = derived_gradients(kernel, args, cotangents, wrt)
    got = derived_cuda.derived_gradients_cuda(kernel, args, cotangents, wrt, arch="sm_90a")
    for n in wrt:
        assert got[n].shape == want[n].shape and got[n].dtype == want[n].dtype, n
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-4), n


# -- on the GPU --------------------------------------------------------------------------------
def _case(op: str, B=2, T=200, H=4, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if op == "linear_attention":
        return dict(q=rnd(B, T, H, D), k=rnd(B, T, H, D), v=rnd(B, T, H, D), s=rnd(B, H, D, D), scale=D ** -0.5)
    G = H // 2
    return dict(x=rnd(B, T, H, D), dt=0.1 + 0.4 * torch.rand(B, T, H, generator=g, dtype=torch.float64),
                A=-(0.5 + torch.rand(H, generator=g, dtype=torch.float64)), B=rnd(B, T, G, D), C=rnd(B, T, G, D),
                D=rnd(H), h=rnd(B, H, D, D))


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [200, 256])
def test_bf16_derived_gradients_on_gpu_within_bf16_bound(op, D, T):
    """bf16 inputs on the GPU (initial state, output and final-state gradients given; T = 200: a
    partial last chunk) against the float64 interpreter's gradients on the same rounded values (the
    gradients of dt and A cancel: input rounding alone moves them by about the bf16 bound)."""
    from tilemix.ops.derived import derived_gradients
    from tilemix.ops.derived_cuda import derived_gradients_cuda

    kernel = ops.PROGRAMS[op]
    states = {n for n, spec in kernel.specs.items() if spec.kind == "state"}

    def low(n, t):
        if not isinstance(t, torch.Tensor):
            return t
        wide = n in states or not kernel.specs[n].is_tile_operand
        return t.to("cuda", torch.float32 if wide else torch.bfloat16)

    def exact(t):
        return t.cpu().double() if isinstance(t, torch.Tensor) else t

    args = {n: low(n, t) for n, t in _case(op, T=T, D=D).items()}
    gen = torch.Generator().manual_seed(1)
    cotangents = {n: low(n, torch.randn(o.shape, generator=gen, dtype=torch.float64))
                  for n, o in kernel(**{n: exact(t) for n, t in args.items()}).items()}
    wrt = [n for n, v in args.items() if isinstance(v, torch.Tensor)]
    want = derived_gradients(kernel, {n: exact(t) for n, t in args.items()},
                             {n: exact(c) for n, c in cotangents.items()}, wrt)
    got = derived_gradients_cuda(kernel, args, cotangents, wrt)
    for n in wrt:
        assert got[n].shape == want[n].shape, n
        assert rel_err(got[n].double().cpu(), np.asarray(want[n])) <= bound(torch.bfloat16), n

def test_launch_schedules_of_few_heads_lower(monkeypatch):
    """With few heads a scan's ring deepens to fill shared memory (``_idle_ring``); each stage also
    takes barriers and padding, so a depth estimated from the stage bytes alone overshot the limit
    by 120 bytes for SSD's d_C program on the GPU. Every launch's schedule lowers."""
    from tilemix.codegen import schedule

    monkeypatch.setattr(schedule, "sm_count", lambda device: 132)
    kernel = ops.PROGRAMS["ssd"]
    args = {n: t[..., :SPLIT_WIDTH] if n in ("x", "h") else t for n, t in _case("ssd", T=200, D=128).items()}
    args = {n: t.to(torch.float32 if n == "h" or not kernel.specs[n].is_tile_operand else torch.bfloat16)
            for n, t in args.items()}
    binding = kernel.bind(args)
    outputs = [p.name for p in binding.params if p.spec.output or p.spec.kind == "state"]
    for _, derived, derived_binding in backward_launches(kernel, binding, outputs, OPS["ssd"]):
        chosen = schedule.launch_schedule(derived, derived_binding, 0, "sm_90a")
        kernel_source(derived, derived_binding, chosen, "sm_90a")


def test_backward_launches_are_prepared_once_per_signature(monkeypatch):
    """A second backward with the same shapes only launches: no launch is prepared again."""
    from tilemix.ops import derived_cuda

    prepared, launched = [], []

    def prepare(kernel, binding, args, schedule, arch, device, outputs=None):
        prepared.append(kernel)
        return lambda args, outputs: launched.append(kernel)

    monkeypatch.setattr(derived_cuda, "prepare_launch", prepare)
    monkeypatch.setattr(derived_cuda, "_LAUNCHES", {})
    kernel = ops.PROGRAMS["linear_attention"]
    args = {n: (v.float() if isinstance(v, torch.Tensor) else v) for n, v in _case("linear_attention", T=100).items()}
    cotangents = {n: torch.zeros(o.shape) for n, o in kernel(**args).items()}
    for _ in range(2):
        derived_cuda.derived_gradients_cuda(kernel, args, cotangents, ["q", "k", "v"], arch="sm_90a")
    assert len(launched) == 2 * len(prepared) == 2 * 3  # one program per gradient, no states program
