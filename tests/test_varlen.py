"""Packed variable-length batches (``cu_seqlens``, ``ops/varlen.py``): a packed call of linear
attention, SSD, the mixer ops and attention equals running each sequence on its own, outputs, final
states and gradients (float64, the interpreter); bad offsets are errors naming the argument; the
varlen kernels lower and compile for sm_90a and sm_80 and launch one instance per sequence; on a
GPU (``gpu``) the generated kernels match the per-sequence calls, and a CUDA graph captures one."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from compile_checks import check_compiled
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gpu_paths import fake_device, launched_params  # noqa: F401 (a fixture: launches recorded, the device stubbed)

from tilemix.ops import attention, gla, linear_attention, retention, rwkv6, ssd
from tilemix.ops.examples import kernel_specs
from tilemix.reference.tolerance import bound, rel_err
from tilemix.tiles import TileError

linear_attention_programs = importlib.import_module("tilemix.ops.linear_attention")
ssd_programs = importlib.import_module("tilemix.ops.ssd")
ssd_backward_programs = importlib.import_module("tilemix.ops.ssd_backward")
attention_programs = importlib.import_module("tilemix.ops.attention")

# lengths that are and are not multiples of 64, a one-token sequence, an empty one, one sequence (N = 1)
LENGTHS = [[64, 128], [100, 1, 37, 0, 64], [130]]


def offsets(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def linear_attention_inputs(lengths, dtype=torch.float64, device="cpu", D=16, H=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, N = sum(lengths), len(lengths)
    q, k, v = (torch.randn(1, T, H, D, generator=g).to(device, dtype) for _ in range(3))
    state = torch.randn(N, H, D, D, generator=g).to(device, torch.float32 if dtype != torch.float64 else dtype)
    return dict(q=q, k=k, v=v, initial_state=state)


def ssd_inputs(lengths, dtype=torch.float64, device="cpu", P=16, N=16, H=4, G=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, count = sum(lengths), len(lengths)
    state_dtype = torch.float32 if dtype != torch.float64 else dtype
    return dict(x=torch.randn(1, T, H, P, generator=g).to(device, dtype),
                dt=(torch.rand(1, T, H, generator=g) * 0.5 + 0.05).to(device, state_dtype),
                A=(-torch.rand(H, generator=g) - 0.1).to(device, state_dtype),
                B=torch.randn(1, T, G, N, generator=g).to(device, dtype),
                C=torch.randn(1, T, G, N, generator=g).to(device, dtype),
                D=torch.randn(H, generator=g).to(device, state_dtype),
                initial_state=torch.randn(count, H, N, P, generator=g).to(device, state_dtype))


def one_by_one(op, inputs, lengths, **options):
    """``op`` on each sequence's slice, packed as a varlen call returns: outputs along T, states stacked."""
    cu = offsets(lengths).tolist()
    outs, states = [], []
    for n in range(len(lengths)):
        sliced = {name: (t[:, cu[n]:cu[n + 1]] if t.dim() >= 3 and t.shape[0] == 1 and name != "initial_state"
                         else t[n:n + 1] if name == "initial_state" else t) for name, t in inputs.items()}
        out, state = op(**sliced, output_final_state=True, **options)
        outs.append(out)
        states.append(state)
    return torch.cat(outs, 1), torch.cat(states)


def gradients(outputs, inputs):
    """Gradients of a fixed float64 functional of the output and the final states."""
    out, state = outputs
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).view(out.shape)
    loss = (out.double() * weights).sum() + (state.double() ** 2).sum()
    return torch.autograd.grad(loss, list(inputs.values()))


def assert_packed_within_bf16(op, inputs, lengths, **options):
    """The packed GPU call against the float64 interpreter on the same rounded inputs (which the tests
    above show equals each sequence alone): outputs, final states and every gradient within the bf16
    bound, as relative Frobenius errors. Elementwise tolerances do not suit bf16: the CPU's own bf16
    emulation misses rtol = atol = 2e-2 against float64 while its relative errors are 0.1-0.4%."""
    exact = {n: t.detach().cpu().double().requires_grad_() for n, t in inputs.items()}
    packed = op(**inputs, output_final_state=True, cu_seqlens=offsets(lengths, "cuda"), **options)
    want = op(**exact, output_final_state=True, cu_seqlens=offsets(lengths))
    names = ["output", "final state", *(f"d_{n}" for n in inputs)]
    for name, got, ref in zip(names, (*packed, *gradients(packed, inputs)), (*want, *gradients(want, exact))):
        assert rel_err(got.float().cpu(), ref.detach().numpy()) <= bound(torch.bfloat16), name


OPS = {"linear_attention": (linear_attention, linear_attention_inputs),
       "ssd": (ssd, ssd_inputs)}


def mixer_inputs(name, lengths, D=16, H=2, seed=0):
    """Inputs of the ``mixer`` ops (backward derived from the program), float64."""
    g = torch.Generator().manual_seed(seed)
    T, N = sum(lengths), len(lengths)

    def seq():
        return torch.randn(1, T, H, D, generator=g, dtype=torch.float64)
    gates = torch.nn.functional.logsigmoid(seq()) / 4
    state = torch.randn(N, H, D, D, generator=g, dtype=torch.float64)
    if name == "retention":
        return dict(q=seq(), k=seq(), v=seq(), initial_state=state)
    if name == "gla":
        return dict(q=seq(), k=seq(), v=seq(), g=gates, initial_state=state)
    return dict(r=seq(), k=seq(), v=seq(), w=gates, u=torch.randn(H, D, generator=g, dtype=torch.float64),
                initial_state=state)


MIXERS = {"retention": retention, "gla": gla, "rwkv6": rwkv6}


@pytest.mark.parametrize("backward", ["hand-written", "derived"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_packed_equals_each_sequence_alone(name, lengths, backward):
    op, make = OPS[name]
    inputs = {n: t.requires_grad_() for n, t in make(lengths).items()}
    packed = op(**inputs, output_final_state=True, cu_seqlens=offsets(lengths), backward=backward)
    alone = one_by_one(op, inputs, lengths)
    assert packed[0].shape == alone[0].shape and packed[1].shape == (len(lengths), *alone[1].shape[1:])
    torch.testing.assert_close(packed[0], alone[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed[1], alone[1], rtol=1e-12, atol=1e-12)
    for got, want in zip(gradients(packed, inputs), gradients(alone, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lengths", [[100, 1, 64], [70]], ids=str)
@pytest.mark.parametrize("name", MIXERS)
def test_mixers_packed_equal_each_sequence_alone(name, lengths):
    """Every ``mixer`` op takes cu_seqlens: the forward as the shipped scans, the derived backward
    sequence by sequence (a per-head input's gradient summed over them)."""
    op = MIXERS[name]
    inputs = {n: t.requires_grad_() for n, t in mixer_inputs(name, lengths).items()}
    packed = op(**inputs, output_final_state=True, cu_seqlens=offsets(lengths))
    alone = one_by_one(op, inputs, lengths)
    for got, want in zip(packed, alone):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(gradients(packed, inputs), gradients(alone, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def attention_inputs(lengths, kv_heads=2, dtype=torch.float64, device="cpu", D=16, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    return dict(q=torch.randn(1, T, heads, D, generator=g).to(device, dtype),
                k=torch.randn(1, T, kv_heads, D, generator=g).to(device, dtype),
                v=torch.randn(1, T, kv_heads, D, generator=g).to(device, dtype))


def attention_one_by_one(inputs, lengths, **options):
    cu = offsets(lengths).tolist()
    return torch.cat([attention(**{n: t[:, cu[i]:cu[i + 1]] for n, t in inputs.items()}, **options)
                      for i in range(len(lengths))], 1)


@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=False), dict(causal=True, window=20)], ids=str)
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_attention_packed_attends_within_each_sequence(options, kv_heads):
    """FlashAttention's varlen with one cu_seqlens for queries and keys: each sequence attends within
    itself (causal, not, a sliding window; grouped k and v); gradients too."""
    lengths = [100, 1, 64, 0, 37]
    inputs = {n: t.requires_grad_() for n, t in attention_inputs(lengths, kv_heads).items()}
    packed = attention(**inputs, cu_seqlens=offsets(lengths), **options)
    alone = attention_one_by_one(inputs, lengths, **options)
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(packed)
    for got, want in zip(torch.autograd.grad((packed * weights).sum(), list(inputs.values())),
                         torch.autograd.grad((alone * weights).sum(), list(inputs.values()))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_packed_op_passes_opcheck():
    """The custom op's fake kernel shapes a packed call's results as the real one (torch.compile)."""
    inputs = linear_attention_inputs([70, 1, 64])
    torch.library.opcheck(torch.ops.tilemix.linear_attention.default,
                          (*(inputs[n] for n in ("q", "k", "v")), 0.25, inputs["initial_state"], True,
                           offsets([70, 1, 64])))


def test_ssd_packed_gradient_of_the_decays_counts_chunks_per_sequence():
    """The hand-written SSD backward's per-chunk term, gradcheck'd: sequences whose chunks do not
    line up with the packed row's 64-token grid, no initial state."""
    lengths = [70, 90]
    inputs = {n: t for n, t in ssd_inputs(lengths, P=16, N=16, H=2, G=1).items() if n != "initial_state"}
    cu = offsets(lengths)
    dt, A = inputs.pop("dt").requires_grad_(), inputs.pop("A").requires_grad_()
    torch.autograd.gradcheck(lambda dt, A: ssd(dt=dt, A=A, **inputs, output_final_state=True, cu_seqlens=cu),
                             (dt, A), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, error, words", [
    (torch.tensor([0, 64, 128]), TypeError, "int32"),
    ([0, 64, 128], TypeError, "int32 tensor"),
    (torch.tensor([[0, 64, 128]], dtype=torch.int32), ValueError, "1-D"),
    (torch.tensor([0, 100, 64, 128], dtype=torch.int32), ValueError, "non-decreasing"),
    (torch.tensor([0, 64, 100], dtype=torch.int32), ValueError, "end at T = 128"),
    (torch.tensor([1, 64, 128], dtype=torch.int32), ValueError, "start at 0"),
])
@pytest.mark.parametrize("name", OPS)
def test_bad_offsets_name_the_argument(name, bad, error, words):
    op, make = OPS[name]
    inputs = {n: t for n, t in make([64, 64]).items() if n != "initial_state"}
    with pytest.raises(error, match="cu_seqlens") as caught:
        op(**inputs, cu_seqlens=bad)
    assert words in str(caught.value)


@pytest.mark.parametrize("name, packed", [("linear_attention", "q"), ("ssd", "x")])
def test_a_packed_batch_is_one_row(name, packed):
    op, make = OPS[name]
    inputs = {n: (t.expand(2, *t.shape[1:]) if n == packed else t) for n, t in make([64, 64]).items()
              if n != "initial_state"}
    with pytest.raises(ValueError, match=f"^{packed}: .*one row"):
        op(**inputs, cu_seqlens=offsets([64, 64]))


@pytest.mark.parametrize("name", OPS)
def test_one_initial_state_per_sequence(name):
    op, make = OPS[name]
    inputs = make([64, 64])
    inputs["initial_state"] = inputs["initial_state"][:1]
    with pytest.raises(ValueError, match="^initial_state: .*2 sequences"):
        op(**inputs, cu_seqlens=offsets([64, 64]))


def test_bidirectional_takes_no_offsets():
    inputs = {n: t for n, t in linear_attention_inputs([64]).items() if n != "initial_state"}
    with pytest.raises(ValueError, match="cu_seqlens"):
        linear_attention(**inputs, causal=False, cu_seqlens=offsets([64]))


def test_varlen_lowering_refuses_a_matrix_program():
    """gemm (no sequence) has no packed-batch kernel: a clear error, not wrong code."""
    from tilemix.codegen.schedule import default_schedule
    from tilemix.codegen.specialise import kernel_source
    from tilemix.ops import gemm_fwd

    binding = gemm_fwd.bind(kernel_specs(gemm_fwd, size=64))
    with pytest.raises(TileError, match="packed sequences"):
        kernel_source(gemm_fwd, binding, default_schedule(gemm_fwd, binding, "sm_90a"), "sm_90a", True)


VARLEN_PROGRAMS = {
    "linear_attention_fwd": (linear_attention_programs.linear_attention_fwd, 128),
    "linear_attention_bwd_dq": (linear_attention_programs.linear_attention_bwd_dq, 128),
    "linear_attention_bwd_dv": (linear_attention_programs.linear_attention_bwd_dv, 128),
    "linear_attention_bwd_dk": (linear_attention_programs.linear_attention_bwd_dk, 128),
    "linear_attention_bwd_total": (linear_attention_programs.linear_attention_bwd_total, 128),
    "ssd_fwd": (ssd_programs.ssd_fwd, 128),
    "ssd_bwd_dc": (ssd_backward_programs.ssd_bwd_dc, 64),  # the op runs them on 64-wide blocks of P
    "ssd_bwd_dx": (ssd_backward_programs.ssd_bwd_dx, 64),
    **{name: (getattr(attention_programs, name), 128) for name in (
        "attention_fwd", "attention_fwd_lse", "attention_bwd_dq", "attention_bwd_dkdv", "attention_fwd_gqa",
        "attention_fwd_lse_gqa", "attention_bwd_dq_gqa", "attention_bwd_dkdv_gqa")},
}
# local memory measured in the kernels without varlen too (tests/test_generic.py's SPILLING): bytes
VARLEN_SPILLING = {("attention_bwd_dkdv", "sm_80"): 8, ("attention_bwd_dkdv_gqa", "sm_80"): 8}


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("program", VARLEN_PROGRAMS)
def test_varlen_kernels_compile_without_local_memory(program, arch):
    pytest.importorskip("cuda.bindings")
    kernel, size = VARLEN_PROGRAMS[program]
    binding = kernel.bind({**kernel_specs(kernel, size=size),
                           **({"is_causal": True} if "is_causal" in kernel.specs else {})})
    check_compiled(kernel, binding, arch, (program, arch), VARLEN_SPILLING, varlen=True)


def test_varlen_grid_spans_the_longest_sequence():
    """Attention's query blocks: the grid is sized by T_max, a CTA past its sequence's end returns
    before anything else, and a query block the sequence ends inside is zeroed past it."""
    from tilemix.codegen.schedule import default_schedule
    from tilemix.codegen.specialise import kernel_source

    kernel = attention_programs.attention_fwd
    binding = kernel.bind({**kernel_specs(kernel, size=128), "is_causal": True})
    source = kernel_source(kernel, binding, default_schedule(kernel, binding, "sm_90a"), "sm_90a", True)
    assert source.size_args[-1] == "T_max" and "(((T_max) + 127) / 128)" in source.source
    returns, barriers = source.source.index(">= T) return;"), source.source.index("tm::mbar_init")
    assert returns < barriers
    assert "tm::mbar_wait(prologue, 0);\n      if (blk0 * 64 + 64 > T)" in source.source


def test_grid_length_rounds_the_longest_sequence_up():
    from tilemix.ops.varlen import grid_length

    assert grid_length(offsets([100, 1, 1000])) == 1024 and grid_length(offsets([1, 3])) == 64
    assert grid_length(offsets([4096, 17])) == 4096


def test_varlen_kernel_reads_offsets_and_guards_the_partial_chunk():
    """The sm_90a varlen kernel: T is the sequence's (from cu_seqlens), the partial chunk's rows past it
    zeroed in the stage and its store clipped; the kernel without varlen has none of it."""
    from tilemix.codegen.schedule import default_schedule
    from tilemix.codegen.source import ParamKind
    from tilemix.codegen.specialise import kernel_source

    kernel = linear_attention_programs.linear_attention_fwd
    binding = kernel.bind(kernel_specs(kernel, size=128))
    schedule = default_schedule(kernel, binding, "sm_90a")
    packed, plain = (kernel_source(kernel, binding, schedule, "sm_90a", varlen) for varlen in (True, False))
    assert "T = cu_seqlens[b + 1] - bos" in packed.source and "int T_packed" in packed.source
    assert "tm::zero_rows<64>" in packed.source and "tm::copy_panel_out<64>(out_o" in packed.source
    assert (ParamKind.OFFSETS, "cu_seqlens") in packed.params and (ParamKind.PTR_OUT, "o") in packed.params
    assert "cu_seqlens" not in plain.source and "zero_rows" not in plain.source


# -- on a GPU ------------------------------------------------------------------------------------------
GPU_LENGTHS = [[1000, 64, 1, 4095, 300, 2048], [4096], [17, 0, 64, 129]]


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["hopper", "generic"])
@pytest.mark.parametrize("lengths", GPU_LENGTHS, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_gpu_packed_equals_each_sequence_alone(name, lengths, target):
    if target == "hopper" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90a GPU")
    op, make = OPS[name]
    sizes = dict(D=128, H=4) if name == "linear_attention" else dict(P=64, N=128, H=4, G=1)
    inputs = {n: t.requires_grad_() for n, t in make(lengths, torch.bfloat16, "cuda", **sizes).items()}
    assert_packed_within_bf16(op, inputs, lengths, target=target)


@pytest.mark.parametrize("name", ["linear_attention-varlen", "ssd-varlen", "linear_attention-bwd-varlen",
                                  "ssd-bwd-varlen", "attention-varlen", "attention-bwd-varlen"])
def test_varlen_bench_rows_run_on_the_interpreter(name):
    """Each row's timed call at a small shape: 3 sequences of random lengths about 70 tokens packed into
    one row; its peer is fla's kernel given the offsets, or cuDNN attention on the padded batch."""
    from tilemix.bench import bench
    from tilemix.bench.varlen import packed_lengths

    ours, peer, peer_name, nbytes, flops, shape = bench.CASES[name](3, 70, 2, 16, torch.float32, device="cpu")
    out = ours()
    tokens = sum(packed_lengths(3, 70))
    if bench.direction(name) == "bwd":
        assert len(out) >= 3 and all(g.isfinite().all() for g in out)
    else:
        assert out.shape == (1, tokens, 2, 16) and out.isfinite().all()
    assert peer_name.startswith(("fla-", "sdpa-cudnn")) and callable(peer) and nbytes > 0 and flops > 0
    assert shape["T"] == tokens and shape["sequences"] == 3


def test_varlen_rows_default_to_the_bar():
    """Issue 24's bar: 64 sequences of 64 to 8192 tokens (the same seed every run), H = 16, D = 128."""
    from tilemix.bench import bench
    from tilemix.bench.varlen import packed_lengths

    assert bench.default_rows(["ssd-varlen"]) == [("ssd-varlen", 64, 4096, 16, 128)]
    lengths = packed_lengths(64, 4096)
    assert len(lengths) == 64 and 64 <= min(lengths) and max(lengths) <= 8128 and len(set(lengths)) > 32
    assert packed_lengths(64, 4096) == lengths


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_varlen_launch_packs_offsets_and_runs_an_instance_per_sequence(request, arch):
    """The launch of a packed batch (device stubbed, kernel compiled): one CTA per (sequence, head)
    and column block, the offsets' address, the output's address beside its tensor map on sm_90a
    (for a partial last chunk's plain stores), the packed row's length as T."""
    from tilemix.codegen import launch, schedule
    from tilemix.codegen.source import ParamKind
    from tilemix.ops.varlen import packed_binding

    device = request.getfixturevalue("fake_device")
    kernel = linear_attention_programs.linear_attention_fwd
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 200, 2, 64, generator=g).bfloat16() for _ in range(3))
    args = dict(q=q, k=k, v=v, scale=0.25, s=torch.randn(3, 2, 64, 64, generator=g))
    binding = packed_binding(kernel, args, None, 3)
    prepared = launch.prepare_launch(kernel, binding, args, schedule.default_schedule(kernel, binding, arch), arch, 0,
                                     varlen=True)
    source = prepared.plan.source
    kinds = [kind for kind, _ in source.params]
    tiles = [ParamKind.TMAP] * 3 if arch == "sm_90a" else [ParamKind.PTR] * 3
    out = [ParamKind.TMAP_OUT] if arch == "sm_90a" else [ParamKind.PTR_OUT]
    plain_out = [ParamKind.PTR_OUT] if arch == "sm_90a" else []
    assert kinds == [*tiles, ParamKind.SCALAR, *out, ParamKind.STATE, ParamKind.OFFSETS, *plain_out]
    cu = offsets([100, 1, 99])
    outputs = dict(o=torch.empty(1, 200, 2, 64, dtype=torch.bfloat16), s=torch.empty(3, 2, 64, 64))
    prepared({**args, "cu_seqlens": cu}, outputs)
    call = device.launches[0]
    assert call.grid == (source.column_ctas * 3 * 2, 1, 1)
    params = launched_params(prepared, call.pointers)
    offsets_at = kinds.index(ParamKind.OFFSETS) + 1  # the state's kind passes two addresses
    assert params[offsets_at] == cu.data_ptr() and params[len(kinds) + 1] == 200  # T: the packed row's
    if arch == "sm_90a":
        assert params[offsets_at + 1] == outputs["o"].data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("name", MIXERS)
def test_gpu_mixers_packed_equal_each_sequence_alone(name):
    """The packed forward kernel of each mixer, and its derived backward run sequence by sequence."""
    lengths = [100, 1, 64, 300]
    per_token = {n for n, t in mixer_inputs(name, lengths, D=64).items() if t.dim() == 4 and n != "initial_state"}
    inputs = {n: t.to("cuda", torch.bfloat16 if n in per_token else torch.float32)
              for n, t in mixer_inputs(name, lengths, D=64).items()}
    inputs = {n: t.requires_grad_() for n, t in inputs.items()}
    assert_packed_within_bf16(MIXERS[name], inputs, lengths)


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["hopper", "generic"])
@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=False), dict(causal=True, window=300)], ids=str)
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_gpu_attention_packed_attends_within_each_sequence(kv_heads, options, target):
    if target == "hopper" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90a GPU")
    lengths = GPU_LENGTHS[0] + [0, 17]
    inputs = {n: t.requires_grad_() for n, t in attention_inputs(lengths, kv_heads, torch.bfloat16, "cuda", D=128,
                                                                  heads=4).items()}
    packed = attention(**inputs, cu_seqlens=offsets(lengths, "cuda"), target=target, **options)
    alone = attention_one_by_one(inputs, lengths, target=target, **options)
    torch.testing.assert_close(packed.float(), alone.float(), rtol=2e-2, atol=2e-2)
    weights = torch.randn_like(packed)
    for got, want in zip(torch.autograd.grad((packed * weights).sum(), list(inputs.values())),
                         torch.autograd.grad((alone * weights).sum(), list(inputs.values()))):
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
def test_gpu_packed_call_is_captured_by_a_cuda_graph():
    """No host sync in a packed call once its signature ran: a CUDA graph captures it, and a replay
    on new offsets of the same count gives what the op gives on them."""
    lengths, other = [300, 64, 1000], [1, 700, 663]
    inputs = linear_attention_inputs(lengths, torch.bfloat16, "cuda", D=128, H=4)
    cu = offsets(lengths, "cuda")
    linear_attention(**inputs, output_final_state=True, cu_seqlens=cu)  # compiled, its launch remembered
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = linear_attention(**inputs, output_final_state=True, cu_seqlens=cu)
    cu.copy_(offsets(other, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    expected = linear_attention(**inputs, output_final_state=True, cu_seqlens=offsets(other, "cuda"))
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(0, 150), min_size=1, max_size=4), name=st.sampled_from(list(OPS)),
       seed=st.integers(0, 2 ** 16))
def test_any_packing_equals_each_sequence_alone(lengths, name, seed):
    """Any lengths (empty sequences, one token, tails past a chunk): outputs and final states."""
    op, make = OPS[name]
    inputs = make(lengths, seed=seed)
    packed = op(**inputs, output_final_state=True, cu_seqlens=offsets(lengths))
    for got, want in zip(packed, one_by_one(op, inputs, lengths)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(0, 150), min_size=1, max_size=4), kv_heads=st.sampled_from([1, 2]),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 100)), seed=st.integers(0, 2 ** 16))
def test_attention_any_packing_attends_within_each_sequence(lengths, kv_heads, causal, window, seed):
    options = dict(causal=True, window=window) if window is not None else dict(causal=causal)
    inputs = attention_inputs(lengths, kv_heads, seed=seed)
    torch.testing.assert_close(attention(**inputs, cu_seqlens=offsets(lengths), **options),
                               attention_one_by_one(inputs, lengths, **options), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("poison", [True, False])
def test_packed_outputs_start_as_nan_under_poison(monkeypatch, poison):
    """``TILEMIX_POISON`` reaches packed batches as it does ``run_kernel``: a row a varlen kernel
    leaves unwritten reads NaN, and initcheck sees no TMA-stored buffer as uninitialised."""
    from tilemix.ops import varlen

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    seen = []
    prepared = varlen._Prepared((("o", (1, 5, 2), torch.bfloat16, None),), lambda args, out: seen.append(out),
                                torch.device("cpu"), poison)
    out = prepared({})
    assert seen == [out] and out["o"].shape == (1, 5, 2) and out["o"].dtype == torch.bfloat16
    if poison:
        assert out["o"].isnan().all()
