"""long_conv and gated_long_conv (Hyena/H3): against the float64 direct sums (tilemix.reference) at
any B, L, C, in fp32 (exact phases) and in bf16/fp16 (the interpreter's 16-bit numerics, plain
phases) up to L = 16384, float64 gradcheck of the correlation backward, argument errors, the layer,
the bench rows, and the four FFT programs compiled for sm_90a and sm_80."""

from __future__ import annotations

import importlib

import pytest
import torch
from compile_checks import check_compiled
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemix import reference
from tilemix.ops import H3Conv, gated_long_conv, long_conv
from tilemix.ops.long_conv_programs import (
    long_conv_cols,
    long_conv_cols_inverse,
    long_conv_cols_inverse_pair,
    long_conv_rows,
    long_conv_spectrum_rows,
)
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import TensorSpec


def _inputs(B, L, C, dtype=torch.float32, seed=0):
    """u and a kernel decaying over about L/4 taps (Hyena's modulated filters), both in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, C, generator=gen, dtype=torch.float64)
    decay = torch.exp(-torch.arange(L, dtype=torch.float64) / max(1.0, L / 4))
    kernel = torch.randn(C, L, generator=gen, dtype=torch.float64) * decay
    return u.to(dtype), kernel.to(dtype)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), L=st.integers(1, 300), C=st.sampled_from([1, 16, 64, 70]), seed=st.integers(0, 2 ** 16))
def test_matches_float64_direct_sums(B, L, C, seed):
    """fp32; L and C not multiples of 64 are zero-padded to them."""
    u, kernel = _inputs(B, L, C, seed=seed)
    assert rel_err(long_conv(u, kernel), reference.long_conv(u, kernel)) <= bound(torch.float32)


@settings(max_examples=8, deadline=None)
@given(L=st.integers(1, 200), C=st.sampled_from([16, 64]), seed=st.integers(0, 2 ** 16))
def test_gated_matches_float64(L, C, seed):
    u, kernel = _inputs(2, L, C, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q, v = (torch.randn(2, L, C, generator=gen) for _ in range(2))
    assert rel_err(gated_long_conv(q, u, v, kernel), reference.gated_long_conv(q, u, v, kernel)) <= bound(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sixteen_thousand_samples(dtype):
    """L = 16384 (256 blocks of 64: block DFTs over four chunks), one channel: fp32 with its exact
    phases, and the 16-bit numerics the GPU kernels have."""
    u, kernel = _inputs(1, 16384, 1, dtype=dtype)
    assert rel_err(long_conv(u, kernel), reference.long_conv(u, kernel)) <= bound(dtype)


def test_kernel_is_cast_to_the_dtype_of_u():
    u, kernel = _inputs(1, 100, 16)
    assert torch.equal(long_conv(u, kernel.double()), long_conv(u, kernel))


def test_float64_gradients():
    """The correlation backward (du, dkernel) and the gates' products (dq, dk, dv)."""
    u, kernel = (t.double().requires_grad_() for t in _inputs(2, 70, 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(long_conv, (u, kernel), fast_mode=True)
    q, v = (torch.randn(2, 70, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(gated_long_conv, (q, u, v, kernel), fast_mode=True)


def test_odd_batch_gradients():
    """Rows travel in pairs (the batch's halves): an odd batch's last row pairs with a zero row."""
    u, kernel = (t.double().requires_grad_() for t in _inputs(3, 40, 2, dtype=torch.float64))
    q, v = (torch.randn(3, 40, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(gated_long_conv, (q, u, v, kernel), fast_mode=True)


@pytest.mark.parametrize("wanted", ["u", "kernel"])
def test_backward_computes_only_the_gradients_wanted(wanted, monkeypatch):
    """du needs the kernel's spectrum, dkernel u's: a backward for one transforms only its own."""
    module = importlib.import_module("tilemix.ops.long_conv")  # the module, not the function ops exports
    u, kernel = _inputs(1, 100, 16)
    spectra = []
    real = module._spectrum
    monkeypatch.setattr(module, "_spectrum", lambda x, gate=None, paired=True: spectra.append(paired)
                        or real(x, gate, paired))
    inputs = dict(u=u, kernel=kernel)
    inputs[wanted].requires_grad_()
    y = long_conv(**inputs)
    spectra.clear()
    y.sum().backward()
    assert spectra == ([False] if wanted == "u" else [True])  # the kernel's is one real signal, u's row pairs
    assert inputs[wanted].grad is not None


def test_empty_sequence():
    u, kernel = torch.zeros(2, 0, 16), torch.zeros(16, 0)
    assert long_conv(u, kernel).shape == (2, 0, 16)


def test_compiled_training_step_has_no_graph_break():
    """torch.compile(fullgraph=True) through the checks, the op and its backward op: eager's loss
    and gradients exactly."""
    u, kernel = _inputs(2, 70, 16)
    q, v = torch.randn(2, 70, 16), torch.randn(2, 70, 16)

    def step(q, u, v, kernel):
        return long_conv(u, kernel).square().sum() + gated_long_conv(q, u, v, kernel).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager, traced = ([t.clone().requires_grad_() for t in (q, u, v, kernel)] for _ in range(2))
    step(*eager).backward()
    loss = compiled(*traced)
    loss.backward()
    assert torch.equal(loss, step(q, u, v, kernel))
    for a, b in zip(traced, eager):
        assert torch.equal(a.grad, b.grad)


def test_opcheck():
    """torch.library's checks of the ops (schema, fake kernel, autograd registration)."""
    u, kernel = _inputs(1, 70, 16)
    q, v, dy = (torch.randn(1, 70, 16) for _ in range(3))
    torch.library.opcheck(torch.ops.tilemix.long_conv.default, (u.requires_grad_(), kernel.requires_grad_()))
    needs = [True, False, True, True]
    torch.library.opcheck(torch.ops.tilemix.long_conv_backward.default, (dy, u.detach(), kernel.detach(), q, v, needs))


@pytest.mark.parametrize("call, error, message", [
    (lambda u, k: long_conv(u.numpy(), k), TypeError, "^u: expected a tensor"),
    (lambda u, k: long_conv(u[0], k), ValueError, r"^u: expected \[B, L, C\]"),
    (lambda u, k: long_conv(u, k[:, :50]), ValueError, r"^kernel: expected \[C, L\] = \[16, 100\]"),
    (lambda u, k: long_conv(u, k.t()), ValueError, r"^kernel: expected \[C, L\]"),
    (lambda u, k: long_conv(u.int(), k), TypeError, "^u: expected a floating-point tensor"),
    (lambda u, k: long_conv(u, k.int()), TypeError, "^kernel: expected a floating-point tensor"),
    (lambda u, k: gated_long_conv(u[:, :50], u, u, k), ValueError, "^q: expected k's shape"),
    (lambda u, k: gated_long_conv(u, u, u.double(), k), ValueError, "^v: expected k's shape .* and dtype"),
    (lambda u, k: gated_long_conv(u, u[0], u, k), ValueError, r"^k: expected \[B, L, C\]"),
])
def test_argument_errors_name_the_argument(call, error, message):
    u, kernel = _inputs(1, 100, 16)
    with pytest.raises(error, match=message):
        call(u, kernel)


@torch.no_grad()
def test_layer_matches_its_projections_and_the_reference():
    layer = H3Conv(dim=32, max_len=128).double()
    x = torch.randn(2, 100, 32, dtype=torch.float64)
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    expected = layer.out(torch.from_numpy(reference.gated_long_conv(q, k, v, layer.kernel[:, :100])))
    assert rel_err(layer(x), expected.numpy()) <= 1e-12


def test_layer_trains():
    torch.manual_seed(0)
    layer, x = H3Conv(dim=32, max_len=128), torch.randn(2, 100, 32)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = (layer(x) - x.roll(1, 1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="^x: 200 tokens, more than the filters' max_len = 128"):
        layer(torch.randn(1, 200, 32))


@pytest.mark.parametrize("name", ["long_conv", "long_conv-bwd"])
def test_bench_rows_run(name):
    """The rows' timed calls and the torch-fft peer on the CPU at a small shape: they agree."""
    from tilemix.bench import bench

    ours, peer, peer_name, nbytes, flops, shape = bench.CASES[name](1, 100, 1, 16, torch.float32, device="cpu")
    assert peer_name == "torch-fft" and shape == dict(B=1, T=100, C=16)
    mine, theirs = ours(), peer()
    if bench.direction(name) == "bwd":  # du [B, L, C] beside the peer's [B, C, L]; dkernel alike
        assert rel_err(mine[0], theirs[0].transpose(1, 2).numpy()) <= 1e-5
        assert rel_err(mine[1], theirs[1].numpy()) <= 1e-5
    else:
        assert rel_err(mine, theirs.transpose(1, 2).numpy()) <= 1e-5
    assert bench.default_rows([name])[0][1:] == (8, 4096, 12, 64)


# (arch, program) -> local memory bytes measured: a pair's two gated tiles feeding eight matmuls
# (gated_long_conv's step 1) cost sm_90a's block DFT two spilled registers (with their A operands
# staged where they are made, Schedule.stage_a; one gated tile no longer spills); sm_80 holds a
# pair's eight accumulator and operand tiles in 255 registers less two (the ungated pair's DFT)
SPILLING = {("sm_90a", "cols-pair-gated"): 8, ("sm_80", "cols-pair"): 8}


def _specs(B=8, L=4096, C=768) -> dict:
    """Each program's arguments at the bench's shape (bf16: plain phases, as the GPU runs them)."""
    blocks = {n: TensorSpec((B, L // 64, C, 64), "bfloat16") for n in ("er", "ei", "odd_r", "odd_i")}
    rows = {n: TensorSpec((B, L, C // 64, 64), "bfloat16") for n in ("re", "im", "hr", "hi")}
    steps = dict(period=2.0 * L / 64, turn=3.14159 * 64 / L, scale=1.0)
    return {
        "cols": (long_conv_cols, dict(x=blocks["er"], **steps)),
        "cols-gated": (long_conv_cols, dict(x=blocks["er"], gate=blocks["ei"], **steps)),
        "cols-pair": (long_conv_cols, dict(x=blocks["er"], x_im=blocks["ei"], **steps)),
        "cols-pair-gated": (long_conv_cols, dict(x=blocks["er"], x_im=blocks["ei"], gate=blocks["odd_r"],
                                                 gate_im=blocks["odd_i"], **steps)),
        "rows": (long_conv_rows, dict(rows, turn=1e-3, parity=0.0, scale=1.0)),
        "rows-conjugate": (long_conv_rows, dict(rows, turn=1e-3, parity=1.0, scale=1.0, conjugate=True)),
        "spectrum": (long_conv_spectrum_rows, dict(re=rows["re"], im=rows["im"], turn=1e-3, parity=0.0)),
        "inverse": (long_conv_cols_inverse, dict(blocks, **steps)),
        "inverse-gated": (long_conv_cols_inverse, dict(blocks, gate=blocks["er"], **steps)),
        "inverse-pair": (long_conv_cols_inverse_pair, dict(blocks, **steps)),
        "inverse-pair-gated": (long_conv_cols_inverse_pair, dict(blocks, gate=blocks["er"], gate_im=blocks["ei"],
                                                                 **steps)),
    }


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("program", list(_specs()))
def test_compiles_with_tensor_cores_and_no_local_memory(arch, program):
    pytest.importorskip("cuda.bindings", reason="compiling needs the codegen extra")
    kernel, args = _specs()[program]
    binding = kernel.bind({**kernel.consts_for(arch, args), **args})
    check_compiled(kernel, binding, arch, (arch, program), SPILLING)


@pytest.mark.parametrize("L, B, axis", [(4096, 8, "heads"), (16384, 8, "blocks"), (4096, 1, "blocks")])
def test_one_block_grid_runs_two_heads_per_cta(L, B, axis, monkeypatch):
    """Step 1 at L = 4096 is one 64-row grid block per head: its second consumer would take the
    block past the end, so the launch runs two heads per CTA; at L = 16384 (four blocks) each
    consumer keeps a block of its own, and with fewer than two heads per SM (132 SMs: an H100) the
    CTAs stay as many as the heads."""
    from tilemix.codegen import schedule

    monkeypatch.setattr(schedule, "sm_count", lambda device_index: 132)
    kernel, args = _specs(B=B, L=L, C=256 if B == 1 else 768)["cols-pair"]
    binding = kernel.bind({**kernel.consts_for("sm_90a", args), **args})
    assert schedule.launch_schedule(kernel, binding, 0, "sm_90a").consumer_axis == axis


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 100, 4096, 16384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_matches_float64(L, dtype):
    """Forward and both gradients on the GPU against float64 (the gradients by the float64
    interpreter's op, itself gradchecked above)."""
    u, kernel = _inputs(2, L, 192, dtype=torch.float64, seed=L)
    dy = torch.randn(2, L, 192, dtype=torch.float64)
    gpu = [t.to("cuda", dtype).requires_grad_() for t in (u, kernel)]
    y = long_conv(*gpu)
    y.backward(dy.to("cuda", dtype))
    exact = [t.clone().requires_grad_() for t in (u, kernel)]
    long_conv(*exact).backward(dy)
    assert rel_err(y.float().cpu(), reference.long_conv(u, kernel)) <= bound(dtype)
    for g, e in zip(gpu, exact):
        assert rel_err(g.grad.float().cpu(), e.grad.numpy()) <= bound(dtype)


@pytest.mark.gpu
def test_gpu_gated_matches_float64():
    """Forward against float64, the four gradients against the float64 interpreter's."""
    u, kernel = _inputs(2, 1000, 128, dtype=torch.float64)
    q, v = torch.randn(2, 1000, 128, dtype=torch.float64), torch.randn(2, 1000, 128, dtype=torch.float64)
    dy = torch.randn(2, 1000, 128, dtype=torch.float64)
    gpu = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, u, v, kernel)]
    y = gated_long_conv(*gpu)
    y.backward(dy.to("cuda", torch.bfloat16))
    exact = [t.clone().requires_grad_() for t in (q, u, v, kernel)]
    gated_long_conv(*exact).backward(dy)
    assert rel_err(y.float().cpu(), reference.gated_long_conv(q, u, v, kernel)) <= bound(torch.bfloat16)
    for g, e in zip(gpu, exact):
        assert rel_err(g.grad.float().cpu(), e.grad.numpy()) <= bound(torch.bfloat16)


@pytest.mark.gpu
def test_gpu_odd_batch_matches_float64():
    """Three rows: a pair and a row beside a zero row; forward and both gradients in bf16 against the
    float64 interpreter's."""
    u, kernel = _inputs(3, 300, 128, dtype=torch.float64)
    dy = torch.randn(3, 300, 128, dtype=torch.float64)
    gpu = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (u, kernel)]
    y = long_conv(*gpu)
    y.backward(dy.to("cuda", torch.bfloat16))
    exact = [t.clone().requires_grad_() for t in (u, kernel)]
    long_conv(*exact).backward(dy)
    assert rel_err(y.float().cpu(), reference.long_conv(u, kernel)) <= bound(torch.bfloat16)
    for g, e in zip(gpu, exact):
        assert rel_err(g.grad.float().cpu(), e.grad.numpy()) <= bound(torch.bfloat16)


@pytest.mark.gpu
def test_gpu_float32_is_refused_by_name():
    u, kernel = (t.cuda() for t in _inputs(1, 100, 64))
    with pytest.raises(TypeError, match="^u: the GPU kernels take bfloat16 or float16"):
        long_conv(u, kernel)
