"""SSD gradients: two backward tile programs (``ssd_bwd_dc`` forward in time, ``ssd_bwd_dx`` over the
chunks last to first) and per-chunk sums in torch. float64 gradcheck on CPU through the interpreter;
float64 torch autograd of the token-by-token recurrence; bf16 numerics through the interpreter; on
an H100 the same programs as sm_90a kernels."""

from __future__ import annotations

import re

import pytest
import torch

from tilemix import ops, reference
from tilemix.reference.tolerance import bound, rel_err


def _ssd(x, dt, A, B, C, D=None, h0=None, log_decay=None):
    """The recurrence token by token in plain torch (float64 autograd ground truth), as
    ``tilemix.reference.ssd``: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_tᵀ, y_t = h_tᵀ C_t + D x_t
    (``log_decay``: dt·A given as a tensor of its own, for its gradient)."""
    batch, T, H, P = x.shape
    log_decay = dt * A if log_decay is None else log_decay
    G, N = B.shape[2:]
    Bh, Ch = B.repeat_interleave(H // G, 2), C.repeat_interleave(H // G, 2)
    h = x.new_zeros(batch, H, N, P) if h0 is None else h0
    ys = []
    for t in range(T):
        h = (torch.exp(log_decay[:, t])[..., None, None] * h
             + dt[:, t, :, None, None] * Bh[:, t, :, :, None] * x[:, t, :, None, :])
        ys.append(torch.einsum("bhnp,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, 1) if T else torch.zeros_like(x)
    return (y if D is None else y + D[:, None] * x), h


def _inputs(T, H, G, N=16, P=16, with_D=True, with_state=True, dtype=torch.float64, seed=0, batch=1,
            dt_range=(0.05, 0.55), A_range=(0.1, 2.1)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, H, P, generator=g).to(dtype)
    dt = torch.rand(batch, T, H, generator=g, dtype=torch.float64) * (dt_range[1] - dt_range[0]) + dt_range[0]
    A = -(torch.rand(H, generator=g, dtype=torch.float64) * (A_range[1] - A_range[0]) + A_range[0])
    B, C = (torch.randn(batch, T, G, N, generator=g).to(dtype) for _ in range(2))
    D = torch.randn(H, generator=g, dtype=torch.float64) if with_D else None
    h0 = torch.randn(batch, H, N, P, generator=g, dtype=torch.float64) if with_state else None
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    return [x, dt.to(exact), A.to(exact), B, C, None if D is None else D.to(exact),
            None if h0 is None else h0.to(exact)]


def test_torch_recurrence_is_the_reference():
    args = _inputs(70, 4, 2)
    y, h = _ssd(*args)
    ref_y, ref_h = reference.ssd(*args, output_final_state=True)
    assert torch.allclose(y, torch.from_numpy(ref_y), rtol=1e-12, atol=1e-12)
    assert torch.allclose(h, torch.from_numpy(ref_h), rtol=1e-12, atol=1e-12)


CASES = [  # H, G, D, initial state, final state's gradient
    (2, 1, True, True, True),
    (4, 2, False, False, False),
    (4, 2, True, True, False),
    (2, 2, False, False, True),
]


@pytest.mark.parametrize("T", [1, 70, 130])
@pytest.mark.parametrize("H, G, with_D, with_state, final", CASES)
def test_ssd_gradcheck(T, H, G, with_D, with_state, final):
    """fast_mode (random directions): the full Jacobian would run the interpreter per input element."""
    args = _inputs(T, H, G, with_D=with_D, with_state=with_state, seed=T + H)
    wanted = [i for i, a in enumerate(args) if a is not None]

    def f(*tensors):
        full = list(args)
        for i, t in zip(wanted, tensors):
            full[i] = t
        y, h = ops.ssd(*full[:5], D=full[5], initial_state=full[6], output_final_state=final)
        return (y, h) if final else y

    inputs = [args[i].clone().requires_grad_() for i in wanted]
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("T", [1, 70, 130])
@pytest.mark.parametrize("H, G, with_D, with_state, final", CASES)
def test_ssd_gradients_match_torch(T, H, G, with_D, with_state, final):
    """Every gradient against float64 torch autograd of the recurrence, to 1e-8 relative."""
    args = _inputs(T, H, G, with_D=with_D, with_state=with_state, seed=T + 2 * H)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(1, T, H, 16, generator=g, dtype=torch.float64)
    dh = torch.randn(1, H, 16, 16, generator=g, dtype=torch.float64)
    wanted = [i for i, a in enumerate(args) if a is not None]

    def grads(forward):
        full = [None if a is None else a.clone().requires_grad_() for a in args]
        y, h = forward(*full)
        loss = (y * dy).sum() + ((h * dh).sum() if final else 0)
        return torch.autograd.grad(loss, [full[i] for i in wanted])

    ours = grads(lambda *a: ops.ssd(*a[:5], D=a[5], initial_state=a[6], output_final_state=True))
    expected = grads(_ssd)
    for i, o, e in zip(wanted, ours, expected):
        assert rel_err(o, e.numpy()) <= 1e-8, ("x dt A B C D h0".split()[i], rel_err(o, e.numpy()))


def test_ssd_backward_in_column_blocks(monkeypatch):
    """On a GPU the backward programs run on 64-wide blocks of P (the state then fits the registers),
    each block a head of its own in its head's group, and torch adds their partial sums over P (dB,
    dC, dt's, D's and the decays' terms): the same gradients, here with 16-wide blocks of P = 48 and
    two heads per group."""
    monkeypatch.setenv("TILEMIX_SSD_BWD_SPLIT", "16")
    args = _inputs(130, 4, 2, N=16, P=48, seed=4)
    g = torch.Generator().manual_seed(6)
    dy = torch.randn(1, 130, 4, 48, generator=g, dtype=torch.float64)
    dh = torch.randn(1, 4, 16, 48, generator=g, dtype=torch.float64)

    def grads(forward):
        full = [a.clone().requires_grad_() for a in args]
        y, h = forward(*full)
        return torch.autograd.grad((y * dy).sum() + (h * dh).sum(), full)

    ours = grads(lambda *a: ops.ssd(*a[:5], D=a[5], initial_state=a[6], output_final_state=True))
    for name, o, e in zip("x dt A B C D h0".split(), ours, grads(_ssd)):
        assert rel_err(o, e.numpy()) <= 1e-8, name


def test_ssd_gradient_of_some_inputs():
    """Only x and A want gradients; a call without an initial state but with one for B only."""
    x, dt, A, B, C, D, h0 = _inputs(70, 2, 1, seed=3)
    dy = torch.randn_like(x)
    ours = torch.autograd.grad(ops.ssd(x.requires_grad_(), dt, A.requires_grad_(), B, C, D, h0)[0], (x, A), dy)
    expected = torch.autograd.grad(_ssd(x, dt, A, B, C, D, h0)[0], (x, A), dy)
    for o, e in zip(ours, expected):
        assert torch.allclose(o, e, rtol=1e-10, atol=1e-12)


def _dA_magnitude(args, dy, dh):
    """``Σ_t |dt_t · ∂L/∂(dt_t A)|`` per head (float64): the size of the terms dA sums, which cancel."""
    a = (args[1].double() * args[2].double()).requires_grad_()
    y, h = _ssd(*[None if t is None else t.double() for t in args], log_decay=a)
    (da,) = torch.autograd.grad((y * dy.double()).sum() + (h * dh.double()).sum(), a)
    return (args[1].double() * da).abs().sum((0, 1))


def _check_bf16(ours, expected, args, dy, dh):
    """Each gradient within the bf16 bound; dA (a sum over every token of terms that cancel) against
    the size of its terms."""
    for name, o, e in zip("x dt A B C D h0".split(), ours, expected):
        if o is None:
            continue
        magnitude = _dA_magnitude(args, dy, dh).numpy() if name == "A" else None
        err = rel_err(o.float(), e.numpy(), magnitude)
        assert err <= bound(torch.bfloat16), (name, err)


def test_ssd_gradients_empty_sequence():
    x, dt, A, B, C, D, h0 = (None if t is None else t.requires_grad_() for t in _inputs(0, 2, 1))
    y, h = ops.ssd(x, dt, A, B, C, D, h0, output_final_state=True)
    dh = torch.randn_like(h)
    grads = torch.autograd.grad((h * dh).sum(), (x, A, h0), allow_unused=True)
    assert grads[0] is None or grads[0].numel() == 0
    assert torch.equal(grads[2], dh)


@pytest.mark.parametrize("decay", ["strong", "weak"])
def test_ssd_interpreter_bf16_gradients(decay):
    """The backward programs in bf16 through the interpreter (the sm_90a kernels' numerics) against
    float64 autograd: within the bf16 bound. The decays' gradient pairs the forward and reversed
    states per chunk with matching rounding (no telescoping over the whole sequence: that measured
    0.3-18 relative error on dA at T = 256-4096 with strong decay)."""
    ranges = dict(strong=((0.001, 0.1), (1.0, 16.0)), weak=((0.001, 0.01), (0.01, 0.1)))[decay]
    args = _inputs(300, 2, 1, N=64, P=64, dtype=torch.bfloat16, seed=11, dt_range=ranges[0], A_range=ranges[1])
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(1, 300, 2, 64, generator=g).bfloat16()
    dh = torch.randn(1, 2, 64, 64, generator=g)

    def grads(forward, tensors, dy, dh):
        tensors = [t.clone().requires_grad_() for t in tensors]
        y, h = forward(*tensors)
        return torch.autograd.grad((y * dy).sum() + (h * dh).sum(), tensors)

    ours = grads(lambda *a: ops.ssd(*a[:5], D=a[5], initial_state=a[6], output_final_state=True), args, dy, dh)
    expected = grads(_ssd, [a.double() for a in args], dy.double(), dh.double())
    _check_bf16(ours, expected, args, dy, dh)


def test_ssd_opcheck_with_gradients():
    args = _inputs(70, 4, 2, dtype=torch.float32)
    args = [t.requires_grad_() if t is not None else None for t in args]
    torch.library.opcheck(torch.ops.tilemix.ssd.default, (*args, True))


def test_ssd_training_step_compiles_fullgraph():
    """The backward programs are custom ops: a compiled training step has no graph break and
    matches eager."""
    args = _inputs(70, 4, 2, dtype=torch.float32)
    dy = torch.randn_like(args[0])

    def loss(*a):
        y, h = ops.ssd(*a[:5], D=a[5], initial_state=a[6], output_final_state=True)
        return (y * dy).sum() + h.square().sum()

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):  # AOT traces the backward too
        xs = [t.clone().requires_grad_() for t in args]
        fn(*xs).backward()
        grads.append([t.grad for t in xs])
    for e, c in zip(*grads):
        assert torch.allclose(e, c, rtol=1e-6, atol=1e-6)


def test_mamba2_layer_trains():
    """Gradients reach every parameter of the Mamba-2 mixer through SSD's backward programs."""
    layer = ops.Mamba2Mixer(64, heads=2, head_dim=32, state_dim=16).double()
    g = torch.Generator().manual_seed(5)
    layer(torch.randn(1, 40, 64, generator=g, dtype=torch.float64)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def _backward_sources(N, P):
    from tilemix.codegen.schedule import default_source
    from tilemix.ops.ssd_backward import ssd_bwd_dc, ssd_bwd_dx
    from tilemix.tiles import TensorSpec

    x, vec = TensorSpec((2, 4096, 16, P), "bfloat16"), TensorSpec((2, 4096, 16), "float32")
    head, bc = TensorSpec((16,), "float32"), TensorSpec((2, 4096, 2, N), "bfloat16")
    return [default_source(kernel, kernel.bind(a)) for kernel, a in (
        (ssd_bwd_dc, dict(x=x, dt=vec, A=head, B=bc, C=bc, dy=x)),
        (ssd_bwd_dx, dict(x=x, dt=vec, A=head, B=bc, C=bc, dy=x, D=head)))]


@pytest.mark.parametrize("N, P", [(64, 64), (128, 64)])
def test_ssd_backward_programs_lower(N, P):
    """Both backward programs compile for sm_90a with wgmma and no wgmma serialisation (ptxas
    C7515). They spill: no column split is possible (du contracts N, dB contracts P, and the decay
    gradient reduces both); ptxas at 232 registers (bench/history/NOTES-2026-11.md has the stack sizes)."""
    pytest.importorskip("cuda.bindings")
    from tilemix.codegen.compile import compile_cuda, ptxas_report, sass

    for source in _backward_sources(N, P):
        assert "HGMMA" in sass(compile_cuda(source.source, "sm_90a", source.name)), source.name
        report = ptxas_report(source.source, "sm_90a", source.name)
        assert "Used" in report and "C7515" not in report, report


# -- two heads per CTA (Schedule(consumer_axis="heads"), off by default): heads 2h and 2h + 1 (P's
# column blocks of one head) share the group's B and C tiles, loaded once per stage for both
HEADS = dict(stages=1, consumers=2, consumer_axis="heads")


def _backward_bindings(N=128, P=64, H=16, G=2):
    from tilemix.ops.ssd_backward import ssd_bwd_dc, ssd_bwd_dx
    from tilemix.tiles import TensorSpec

    x, vec = TensorSpec((2, 4096, H, P), "bfloat16"), TensorSpec((2, 4096, H), "float32")
    head, bc = TensorSpec((H,), "float32"), TensorSpec((2, 4096, G, N), "bfloat16")
    return [(kernel, kernel.bind(a)) for kernel, a in (
        (ssd_bwd_dc, dict(x=x, dt=vec, A=head, B=bc, C=bc, dy=x)),
        (ssd_bwd_dx, dict(x=x, dt=vec, A=head, B=bc, C=bc, dy=x, D=head)))]


@pytest.mark.parametrize("stages, share", [(1, False), (2, True)])
def test_ssd_backward_two_heads_per_cta_lowers(stages, share):
    """Both backward programs (N = 128, a 64-wide P block) with two consumer warpgroups on
    consecutive heads: they fit an sm_90a CTA at one stage (170 and 202 KiB), or at two with staging
    buffers shared (218 KiB), and compile with wgmma and no wgmma serialisation (ptxas C7515)."""
    pytest.importorskip("cuda.bindings")
    from tilemix.codegen.compile import compile_cuda, ptxas_report, sass
    from tilemix.codegen.knobs import SMEM_LIMIT, Schedule
    from tilemix.codegen.specialise import hopper_source

    for kernel, binding in _backward_bindings():
        source = hopper_source(kernel, binding, Schedule(**{**HEADS, "stages": stages, "share_staging": share}))
        assert source.threads == 384 and source.smem_bytes <= SMEM_LIMIT
        assert "HGMMA" in sass(compile_cuda(source.source, "sm_90a", source.name)), source.name
        report = ptxas_report(source.source, "sm_90a", source.name)
        assert "Used" in report and "C7515" not in report, report


@pytest.mark.parametrize("H, G, sms, arch, paired", [
    (16, 2, 32, "sm_90a", True),     # B·H = 32 heads, 32 SMs: 16 CTAs of two heads
    (16, 2, 33, "sm_90a", False),    # fewer heads than SMs: pairs would leave over half of them idle
    (6, 2, 8, "sm_90a", False),      # H/G = 3 heads per group: a pair would straddle two groups
    (16, 2, 8, "sm_86", False),      # the heads axis is sm_90a's (warp specialisation)
])
def test_launch_schedule_pairs_heads_of_a_group(H, G, sms, arch, paired, monkeypatch):
    """One-consumer scans over grouped heads (SSD's backward programs) run two heads of a group per
    CTA by default where that is legal, fits, and keeps at least half the GPU busy."""
    from tilemix.codegen.schedule import launch_schedule

    monkeypatch.setattr("tilemix.codegen.schedule.sm_count", lambda device: sms)
    for kernel, binding in _backward_bindings(H=H, G=G):
        schedule = launch_schedule(kernel, binding, 0, arch)
        assert (schedule.consumer_axis == "heads") == paired, (kernel.name, schedule)
        if paired:
            assert schedule.consumers == 2 and schedule.stages == 2 and schedule.share_staging


def test_ssd_backward_two_heads_share_group_tiles():
    """The producer loads B and C once per stage at the CTA's group, x and dy once per consumer at
    its own head; the grid runs B·H/2 CTAs (``hcta``) and each consumer's per-head values (dt, A,
    D, the states, the per-token outputs, the TMA stores) use its own ``h``."""
    from tilemix.codegen.schedule import Schedule
    from tilemix.codegen.specialise import hopper_source

    for kernel, binding in _backward_bindings():
        src = hopper_source(kernel, binding, Schedule(**HEADS)).source
        loads = [line for line in src.splitlines() if "tm::tma_load" in line]
        group = [line for line in loads if "&tmap_B," in line or "&tmap_C," in line]
        assert len(group) == 4 and all("(hcta * 2) / (H / G)" in line for line in group)  # 2 panels of N each
        for name in ("x", "dy"):
            mine = [line for line in loads if f"&tmap_{name}," in line]
            assert len(mine) == 2 and "(hcta * 2 + 0)" in mine[0] and "(hcta * 2 + 1)" in mine[1], mine
        assert len(loads) == 8
        assert "const int b = rest / (H / 2), hcta = rest % (H / 2);" in src
        assert "const int h = hcta * 2 + wg;" in src and "h = rest % H" not in src
        assert "ptr_A[h]" in src
        producer = src[src.index("setmaxnreg_dec"):src.index("setmaxnreg_inc")]
        assert not re.search(r"\bh\b", producer), producer  # the producer has no head of its own
        # dt rides in the ring: the producer's warp copies each consumer's head
        assert "ptr_dt + (long)b * T * H + (hcta * 2 + 0)," in producer
        assert "ptr_dt + (long)b * T * H + (hcta * 2 + 1)," in producer


def test_heads_schedule_refuses_what_it_cannot_map():
    """An H (or H/G) that is not a multiple of the consumers is a ValueError naming the sizes, at
    launch and in the tuner's ``legal``; a split, a Matrix program and the generic target are
    refused by the lowering."""
    from dataclasses import replace

    from tilemix import ops as tm_ops
    from tilemix.codegen import tune
    from tilemix.codegen.launch import run_tiles
    from tilemix.codegen.schedule import Schedule, heads_per_cta
    from tilemix.codegen.specialise import generic_source, hopper_source
    from tilemix.ops.examples import example_specs
    from tilemix.tiles import TensorSpec, TileError

    heads = Schedule(**HEADS)
    for H, G in ((3, 1), (3, 3), (4, 4), (6, 2)):  # H odd, or one head per group (H/G = 1 or 3)
        kernel, binding = _backward_bindings(H=H, G=G)[1]
        with pytest.raises(ValueError, match=f"H={H}, G={G}"):
            heads_per_cta(heads, binding.sizes)
        with pytest.raises(ValueError, match="multiples of 2"):  # before anything is compiled or launched
            run_tiles(kernel, binding, {}, {"dx": torch.empty(1)}, heads)
        assert not tune.legal(heads, binding)
    for _, binding in _backward_bindings(H=4, G=2):
        assert heads_per_cta(heads, binding.sizes) == 2 and tune.legal(heads, binding)
        assert heads_per_cta(Schedule(), binding.sizes) == 1
    la = tm_ops.PROGRAMS["linear_attention"]  # no GroupSeq parameter: any even H
    for H in (2, 6):
        x = TensorSpec((1, 256, H, 64), "bfloat16")
        binding = la.bind(dict(q=x, k=x, v=x, scale=1.0))
        assert "G" not in binding.sizes and heads_per_cta(heads, binding.sizes) == 2 and tune.legal(heads, binding)
    kernel, binding = _backward_bindings()[0]
    with pytest.raises(TileError, match="sm_90a only"):
        generic_source(kernel, binding, heads, arch="sm_80")
    kernel, binding = _backward_bindings(P=128)[0]
    with pytest.raises(TileError, match="no column split"):
        hopper_source(kernel, binding, replace(heads, split=(("P", 64),)))
    gemm = tm_ops.PROGRAMS["gemm"]
    with pytest.raises(TileError, match="batch x head grid"):
        hopper_source(gemm, gemm.bind(example_specs("gemm")), heads)


@pytest.mark.gpu
@pytest.mark.parametrize("stages, share", [(1, False), (2, True)])  # both fit 227 KiB at N = 128
@pytest.mark.parametrize("N, P", [(128, 64), (128, 128), (64, 64)])
def test_gpu_ssd_backward_two_heads_per_cta(N, P, stages, share, monkeypatch):
    """The backward programs forced to two heads per CTA (H·P/64 = 4 or 8 column-block heads, 2 or 4
    per group) against the interpreter, outputs poisoned."""
    from dataclasses import replace

    from tilemix.codegen import launch

    monkeypatch.setenv("TILEMIX_POISON", "1")
    default, forced = launch.launch_schedule, set()

    def schedule(kernel, *a):
        if kernel.name not in ("ssd_bwd_dc", "ssd_bwd_dx"):
            return default(kernel, *a)
        forced.add(kernel.name)
        return replace(default(kernel, *a), **{**HEADS, "stages": stages, "share_staging": share})

    monkeypatch.setattr(launch, "launch_schedule", schedule)
    _check_against_interpreter(N, P)
    assert forced == {"ssd_bwd_dc", "ssd_bwd_dx"}


@pytest.mark.gpu
@pytest.mark.parametrize("T", [100, 300, 1024])
@pytest.mark.parametrize("H, G", [(4, 1), (4, 2)])
@pytest.mark.parametrize("N, P", [(64, 64), (128, 64), (256, 256)])
def test_gpu_ssd_gradients(T, H, G, N, P, monkeypatch):
    """The sm_90a kernels against float64 autograd of the recurrence, within the bf16 bound (outputs
    poisoned so an unwritten element fails); strong decay, initial state and final-state gradient."""
    monkeypatch.setenv("TILEMIX_POISON", "1")
    _check_gpu_gradients(T, H, G, N, P)


@pytest.mark.gpu
@pytest.mark.parametrize("H, G", [(2, 1), (4, 2)])
@pytest.mark.parametrize("N, P", [(64, 64), (128, 128)])
def test_gpu_ssd_gradients_in_segments(H, G, N, P, monkeypatch):
    """The forward and both backward programs in 4 sequence segments (as long sequences with few heads
    run them), ``ssd_bwd_dx``'s entering each segment from the next one: gradients as above."""
    monkeypatch.setenv("TILEMIX_POISON", "1")
    monkeypatch.setenv("TILEMIX_SEGMENTS", "4")
    _check_gpu_gradients(1024, H, G, N, P)


def _check_gpu_gradients(T, H, G, N, P):
    args = _inputs(T, H, G, N=N, P=P, dtype=torch.bfloat16, seed=T, batch=2, dt_range=(0.001, 0.1),
                   A_range=(1.0, 16.0))
    g = torch.Generator().manual_seed(T + 1)
    dy = torch.randn(2, T, H, P, generator=g).bfloat16()
    dh = torch.randn(2, H, N, P, generator=g)
    gpu = [t.cuda().requires_grad_() for t in args]
    y, h = ops.ssd(*gpu[:5], D=gpu[5], initial_state=gpu[6], output_final_state=True)
    ((y * dy.cuda()).sum() + (h * dh.cuda()).sum()).backward()
    ref = [t.double().requires_grad_() for t in args]
    y, h = _ssd(*ref)
    ((y * dy.double()).sum() + (h * dh.double()).sum()).backward()
    assert not any(t.grad.isnan().any() for t in gpu)
    _check_bf16([t.grad.cpu() for t in gpu], [t.grad for t in ref], args, dy, dh)


@pytest.mark.gpu
@pytest.mark.parametrize("N, P", [(128, 128), (128, 64)])
def test_gpu_ssd_backward_matches_interpreter(N, P, monkeypatch):
    """The GPU kernels against the same programs in the interpreter (bf16 numerics emulated): a masked
    tail (T = 333), group heads, D, initial state and final-state gradient, poisoned outputs."""
    monkeypatch.setenv("TILEMIX_POISON", "1")
    _check_against_interpreter(N, P)


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["hopper", "generic"])
def test_gpu_shared_staging_matches_interpreter(target, monkeypatch):
    """Staging buffers shared by tiles whose readers are done (``Schedule.share_staging``, what
    sm_86/sm_89 lower the SSD backward with at N = 128) on the GPU, forward and backward programs,
    against the interpreter."""
    from dataclasses import replace

    from tilemix.codegen import launch

    monkeypatch.setenv("TILEMIX_POISON", "1")
    default = launch.launch_schedule
    monkeypatch.setattr(launch, "launch_schedule", lambda *a: replace(default(*a), share_staging=True))
    with ops.use_target(target):
        _check_against_interpreter(128, 64)


def _check_against_interpreter(N, P):
    args = _inputs(333, 4, 2, N=N, P=P, dtype=torch.bfloat16, seed=7, batch=1)
    g = torch.Generator().manual_seed(8)
    dy = torch.randn(1, 333, 4, P, generator=g).bfloat16()
    dh = torch.randn(1, 4, N, P, generator=g)
    results = []
    for device in ("cuda", "cpu"):
        xs = [t.to(device).requires_grad_() for t in args]
        y, h = ops.ssd(*xs[:5], D=xs[5], initial_state=xs[6], output_final_state=True)
        ((y * dy.to(device)).sum() + (h * dh.to(device)).sum()).backward()
        results.append([t.grad.cpu() for t in xs])
    for name, ours, interp in zip("x dt A B C D h0".split(), *results):
        assert not ours.isnan().any(), name
        assert rel_err(ours.float(), interp.double().numpy()) <= bound(torch.bfloat16), name
