"""Gradients whose backward kernels are tile programs (gemm, linear attention, softmax attention).
float64 gradcheck on CPU through the interpreter; on an H100 the same programs as sm_90a kernels
against float64 autograd of the reference."""

from __future__ import annotations

import pytest
import torch

from tilemix import ops, reference
from tilemix.ops.examples import example_specs
from tilemix.reference.tolerance import bound, rel_err


@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (20, 12, 9), (70, 33, 65)])
def test_gemm_gradcheck(M, K, N):
    g = torch.Generator().manual_seed(M + K + N)
    a = torch.randn(M, K, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(K, N, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.gemm, (a, b), fast_mode=True)


def test_gemm_grad_of_one_input_only():
    a = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64)
    ops.gemm(a, b).sum().backward()
    assert torch.allclose(a.grad, torch.ones(8, 3, dtype=torch.float64) @ b.T)


@pytest.mark.parametrize("program", [ops.gemm_nt, ops.gemm_tn])
def test_backward_programs_lower_to_wgmma(program):
    pytest.importorskip("cuda.bindings")
    from tilemix.codegen.compile import compile_cuda, sass
    from tilemix.codegen.schedule import default_source

    specs = example_specs("gemm")
    source = default_source(program, program.bind(specs))
    assert "HGMMA" in sass(compile_cuda(source.source, "sm_90a", source.name))


@pytest.mark.gpu
@pytest.mark.parametrize("M, K, N", [(300, 200, 264), (1024, 512, 768)])
def test_gpu_gemm_gradients(M, K, N):
    g = torch.Generator().manual_seed(0)
    a, b, dc = (torch.randn(*s, generator=g).bfloat16() for s in ((M, K), (K, N), (M, N)))
    ga, gb = (t.cuda().requires_grad_() for t in (a, b))
    ops.gemm(ga, gb).backward(dc.cuda())
    assert rel_err(ga.grad.cpu(), reference.gemm(dc, b.T.contiguous())) <= bound(torch.bfloat16)
    assert rel_err(gb.grad.cpu(), reference.gemm(a.T.contiguous(), dc)) <= bound(torch.bfloat16)


def _la(q, k, v, s0, scale=None):
    """Linear attention in plain torch (float64 autograd ground truth): S_t = S_0 + Σ_{j≤t} k_j v_jᵀ."""
    states = torch.cumsum(torch.einsum("bthk,bthv->bthkv", k, v), dim=1) + s0[:, None]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return scale * torch.einsum("bthk,bthkv->bthv", q, states), states[:, -1]


@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("with_state", [False, True])
def test_linear_attention_gradcheck(T, with_state):
    """Four programs, all forward in time: dq (transposed state), pass 1 summing q doᵀ, then dv and dk
    from the negated sum plus the final state's gradient; D_0 is the initial state's gradient.
    (fast_mode: random directions; the full Jacobian would run the interpreter per input element.)"""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, T, 2, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    if with_state:
        s0 = torch.randn(1, 2, 16, 16, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda q, k, v, s0: ops.linear_attention(q, k, v, initial_state=s0, output_final_state=True), (q, k, v, s0),
            fast_mode=True)
    else:
        assert torch.autograd.gradcheck(lambda q, k, v: ops.linear_attention(q, k, v)[0], (q, k, v), fast_mode=True)


@pytest.mark.parametrize("T", [1, 64, 65, 200])
@pytest.mark.parametrize("scale", [0.3, 0.0])
def test_linear_attention_gradients_match_torch(T, scale):
    """Every gradient (q, k, v, initial state; the final state's gradient seeding dk, dv) against
    float64 torch autograd, K != V; scale 0 (D_t is the final state's gradient throughout) too."""
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(2, T, 3, 32, generator=g, dtype=torch.float64) for _ in range(2))
    v, do = (torch.randn(2, T, 3, 16, generator=g, dtype=torch.float64) for _ in range(2))
    s0, ds = (torch.randn(2, 3, 32, 16, generator=g, dtype=torch.float64) for _ in range(2))
    grads = []
    for forward in (lambda q, k, v, s0: ops.linear_attention(q, k, v, scale, s0, output_final_state=True),
                    lambda q, k, v, s0: _la(q, k, v, s0, scale)):
        xs = [t.clone().requires_grad_() for t in (q, k, v, s0)]
        o, state = forward(*xs)
        grads.append(torch.autograd.grad((o * do).sum() + (state * ds).sum(), xs))
    for ours, ref in zip(*grads):
        assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_linear_attention_segmented_backward_matches_sequential():
    """The three backward scans in segments (what long sequences with few heads run on a GPU; forced
    here on CPU tensors) give the sequential scans' outputs and final states."""
    import importlib

    la = importlib.import_module("tilemix.ops.linear_attention")
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(2, 256, 2, 16, generator=g, dtype=torch.float64) for _ in range(4))
    s0 = torch.randn(2, 2, 16, 16, generator=g, dtype=torch.float64)
    for scan, args in ((la.linear_attention_bwd_dq_scan, dict(do=do, k=k, v=v, scale=0.3, s=s0)),
                       (la.linear_attention_bwd_dv_scan, dict(q=q, k=k, do=do, scale=0.3, e=s0)),
                       (la.linear_attention_bwd_dk_scan, dict(q=q, v=v, do=do, scale=0.3, g=s0))):
        sequential, segmented = scan(args, segments=1), scan(args, segments=4)
        for name in sequential:
            assert torch.allclose(sequential[name], segmented[name], rtol=1e-12, atol=1e-12), name


def test_linear_attention_interpreter_bf16_gradients():
    """bf16 through the interpreter (the kernels' rounding) against float64 autograd, also where the
    later tokens' gradients are a thousandth of the earlier ones: dk and dv of the later half within
    the bf16 bound. (dv, dk run forward in time from the negated total; a chunk uses the state at its
    end, so rounding is relative to the later chunks' sum, as in a reverse scan.)"""
    g = torch.Generator().manual_seed(2)
    T = 300
    q, k, v, do = (torch.randn(1, T, 2, 64, generator=g) for _ in range(4))
    do[:, T // 2:] *= 1e-3
    q, k, v, do = (t.bfloat16() for t in (q, k, v, do))
    s0 = torch.randn(1, 2, 64, 64, generator=g)
    ours = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    ops.linear_attention(*ours[:3], initial_state=ours[3])[0].backward(do)
    ref = [t.double().requires_grad_() for t in (q, k, v, s0)]
    _la(*ref)[0].backward(do.double())
    for a, b in zip(ours, ref):
        assert rel_err(a.grad.float(), b.grad.numpy()) <= bound(torch.bfloat16)
    for a, b in zip(ours[:3], ref[:3]):
        assert rel_err(a.grad[:, T // 2:].float(), b.grad[:, T // 2:].numpy()) <= bound(torch.bfloat16)


LA_BACKWARD_PROGRAMS = ["linear_attention_bwd_dq", "linear_attention_bwd_dq_states", "linear_attention_bwd_total",
                        "linear_attention_bwd_dv", "linear_attention_bwd_dk", "linear_attention_bwd_dk_states"]


@pytest.mark.parametrize("head_dims", [(128, 128), (64, 128)])
def test_linear_attention_backward_programs_lower(head_dims):
    """Every backward program splits its state's columns (no matmul contracts them) and compiles for
    sm_90a at K = 128, 64 and V = 128: wgmma, no local memory, no wgmma serialisation (ptxas C7515)."""
    pytest.importorskip("cuda.bindings")
    import importlib

    from tilemix.codegen.compile import compile_cuda, ptxas_report, resources, sass
    from tilemix.codegen.schedule import default_schedule
    from tilemix.codegen.specialise import hopper_source
    from tilemix.tiles import TensorSpec

    la = importlib.import_module("tilemix.ops.linear_attention")
    K, V = head_dims
    seqs = dict(q=TensorSpec((2, 4096, 16, K), "bfloat16"), k=TensorSpec((2, 4096, 16, K), "bfloat16"),
                v=TensorSpec((2, 4096, 16, V), "bfloat16"), do=TensorSpec((2, 4096, 16, V), "bfloat16"))
    for name in LA_BACKWARD_PROGRAMS:
        kernel = getattr(la, name)
        binding = kernel.bind({n: (0.1 if n == "scale" else seqs[n]) for n in kernel.specs
                               if n in seqs or n == "scale"})
        schedule = default_schedule(kernel, binding)
        state_cols = next(p.spec.dims[1] for p in binding.params if p.spec.kind == "state")
        assert binding.extent(state_cols) == 64 or schedule.split == ((state_cols, 64),), (name, schedule)
        source = hopper_source(kernel, binding, schedule)
        binary = compile_cuda(source.source, "sm_90a", source.name)
        text, usage = sass(binary), resources(binary)
        assert "HGMMA" in text, name
        assert not ("LDL" in text or "STL" in text or usage["stack"] or usage["local"]), (name, usage)
        report = ptxas_report(source.source, "sm_90a", source.name)
        assert "Used" in report and "C7515" not in report, (name, report)


@pytest.mark.gpu
@pytest.mark.parametrize("T, H, D, paired", [(100, 3, 64, False), (300, 3, 64, False), (100, 4, 64, True),
                                             (1024, 4, 64, True), (300, 2, 256, False)])
def test_gpu_linear_attention_gradients(T, H, D, paired, monkeypatch):
    """Gradients against float64 autograd. ``paired``: at D = 64 the forward and backward programs are
    one-consumer scans; with the SM count lowered they all run two heads per CTA, as they do where
    the heads fill the GPU. D = 256: the states split into column blocks."""
    from tilemix.codegen import schedule

    if paired:
        monkeypatch.setattr(schedule, "sm_count", lambda device: 2)
    monkeypatch.setenv("TILEMIX_POISON", "1")
    g = torch.Generator().manual_seed(T + paired)
    q, k, v, do = (torch.randn(2, T, H, D, generator=g).bfloat16() for _ in range(4))
    s0 = torch.randn(2, H, D, D, generator=g)
    gpu = [t.cuda().requires_grad_() for t in (q, k, v, s0)]
    o, _ = ops.linear_attention(*gpu[:3], initial_state=gpu[3])
    o.backward(do.cuda())
    ref = [t.double().requires_grad_() for t in (q, k, v, s0)]
    _la(*ref)[0].backward(do.double())
    for ours, expected in zip(gpu, ref):
        assert rel_err(ours.grad.cpu(), expected.grad.numpy()) <= bound(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("T, K, segments", [(333, 128, None), (1024, 64, None), (1024, 128, "4")])
def test_gpu_linear_attention_backward_matches_interpreter(T, K, segments, monkeypatch):
    """The four backward kernels (K = 128: column-split states) against the same programs in the
    interpreter (bf16 rounding emulated), with initial and final-state gradients, outputs poisoned so an
    unwritten element fails; masked tail (T = 333) and forced segments (TILEMIX_SEGMENTS)."""
    monkeypatch.setenv("TILEMIX_POISON", "1")
    if segments:
        monkeypatch.setenv("TILEMIX_SEGMENTS", segments)
    g = torch.Generator().manual_seed(T + K)
    q, k = (torch.randn(1, T, 2, K, generator=g).bfloat16() for _ in range(2))
    v, do = (torch.randn(1, T, 2, 128, generator=g).bfloat16() for _ in range(2))
    s0, ds = (torch.randn(1, 2, K, 128, generator=g) for _ in range(2))
    results = []
    for device in ("cuda", "cpu"):
        xs = [t.to(device).requires_grad_() for t in (q, k, v, s0)]
        o, state = ops.linear_attention(*xs[:3], initial_state=xs[3], output_final_state=True)
        torch.autograd.backward([o, state], [do.to(device), ds.to(device)])
        results.append([t.grad.cpu() for t in xs])
    for ours, interp in zip(*results):
        assert not ours.isnan().any()
        assert rel_err(ours, interp.double().numpy()) <= bound(torch.bfloat16)


# -- softmax attention: FlashAttention-2-style backward programs ---------------------------------------
def _attention(q, k, v, causal, scale=None):
    """Softmax attention in plain torch (float64 autograd ground truth)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if causal:
        T = q.shape[1]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshv->bthv", s.softmax(-1), v)


@pytest.mark.parametrize("T", [1, 70, 130])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_gradcheck(T, causal):
    """dq from one program (per query block over key chunks), dk and dv from another (per key block
    over query chunks, causal: from the block's own chunk on), both recomputing the probabilities from
    the log-sum-exp the training forward saves. fast_mode, as for linear attention."""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, T, 2, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, causal=causal, scale=0.3), (q, k, v),
                                    fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_gradients_match_torch(causal):
    """Every gradient against torch autograd of the plain formula, through ``ops.attention`` (saves the
    log-sum-exp) and through ``torch.ops.tilemix.attention`` called directly (recomputes it)."""
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(2, 150, 3, 32, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.autograd.grad(_attention(*(t.requires_grad_() for t in (q, k, v)), causal), (q, k, v), do)
    for forward in (lambda *a: ops.attention(*a, causal=causal),
                    lambda *a: torch.ops.tilemix.attention(*a, causal, 32 ** -0.5)):
        grads = torch.autograd.grad(forward(q, k, v), (q, k, v), do)
        for ours, ref in zip(grads, expected):
            assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_attention_lse_saved():
    """The training forward's second output is each query's log-sum-exp of its scaled scores, float32."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=g) for _ in range(3))
    o, lse = torch.ops.tilemix.attention_lse(q, k, v, True, 0.5)
    s = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) * 0.5
    s = s.masked_fill(torch.ones(70, 70, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (1, 70, 2)
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1).transpose(1, 2), atol=1e-5)
    assert torch.equal(o, ops.attention(q, k, v, causal=True, scale=0.5))


@pytest.mark.parametrize("name", ["attention", "attention_lse"])
def test_attention_opcheck_with_gradients(name):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 70, 2, 32, generator=g, requires_grad=True) for _ in range(3))
    torch.library.opcheck(getattr(torch.ops.tilemix, name).default, (q, k, v, True, 0.2))


def test_attention_interpreter_bf16_gradients():
    """The backward programs in bf16 through the interpreter (what the sm_90a kernels compute) against
    float64 autograd: within the bf16 bound."""
    g = torch.Generator().manual_seed(6)
    q, k, v, do = (torch.randn(1, 130, 2, 64, generator=g).bfloat16() for _ in range(4))
    for causal in (False, True):
        ours = [t.clone().requires_grad_() for t in (q, k, v)]
        ops.attention(*ours, causal=causal).backward(do)
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        _attention(*ref, causal).backward(do.double())
        for a, b in zip(ours, ref):
            assert rel_err(a.grad.float(), b.grad.numpy()) <= bound(torch.bfloat16)


def _attention_backward_sources(causal):
    from tilemix.codegen.schedule import default_source
    from tilemix.ops.attention import attention_bwd_dkdv, attention_bwd_dq, attention_fwd_lse
    from tilemix.tiles import TensorSpec

    seq, vec = TensorSpec((2, 4096, 16, 128), "bfloat16"), TensorSpec((2, 4096, 16), "float32")
    args = dict(q=seq, k=seq, v=seq, do=seq, lse=vec, scale=0.1, is_causal=causal)
    return [default_source(kernel, kernel.bind(a)) for kernel, a in (
        (attention_fwd_lse, dict(q=seq, k=seq, v=seq, scale=0.1, is_causal=causal)),
        (attention_bwd_dq, dict(args, o=seq)),
        (attention_bwd_dkdv, dict(args, delta=vec)))]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_programs_lower(causal):
    """The training forward and both backward programs compile for sm_90a: wgmma, no local memory,
    no wgmma serialisation (ptxas C7515)."""
    pytest.importorskip("cuda.bindings")
    from tilemix.codegen.compile import compile_cuda, ptxas_report, resources, sass

    for source in _attention_backward_sources(causal):
        binary = compile_cuda(source.source, "sm_90a", source.name)
        text, usage = sass(binary), resources(binary)
        assert "HGMMA" in text, source.name
        assert not ("LDL" in text or "STL" in text or usage["stack"] or usage["local"]), (source.name, usage)
        report = ptxas_report(source.source, "sm_90a", source.name)
        assert "Used" in report and "C7515" not in report, report


@pytest.mark.gpu
@pytest.mark.parametrize("T", [100, 300, 1024])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 256])
def test_gpu_attention_gradients(T, causal, dtype, D):
    """Against float64 autograd of the plain formula (the interpreter, emulating the same rounding,
    measures 2.2-2.6e-3 in bf16 and 2.8-3.2e-4 in fp16 at these shapes: bounds 1e-2 and 3e-3). The
    generic target's dk/dv program carries 128 KiB at head dim 256, twice what its warps hold: an
    error saying so."""
    from tilemix.ops.runtime import device_arch
    from tilemix.tiles import TileError

    g = torch.Generator().manual_seed(T)
    q, k, v, do = (torch.randn(2, T, 3, D, generator=g).to(dtype) for _ in range(4))
    gpu = [t.cuda().requires_grad_() for t in (q, k, v)]
    o = ops.attention(*gpu, causal=causal)
    if D > 128 and device_arch(o.device) != "sm_90a":
        with pytest.raises(TileError, match="loop-carried state of 128 KiB .* exceeds the sm_.* budget of 66 KiB"):
            o.backward(do.cuda())
        return
    o.backward(do.cuda())
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    _attention(*ref, causal).backward(do.double())
    for ours, expected in zip(gpu, ref):
        assert rel_err(ours.grad.cpu(), expected.grad.numpy()) <= bound(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_attention_backward_matches_interpreter(causal, monkeypatch):
    """GPU kernels against the same programs in the interpreter (bf16 numerics emulated), head dims
    128, outputs poisoned so an unwritten element fails; also the saved log-sum-exp."""
    monkeypatch.setenv("TILEMIX_POISON", "1")
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(1, 333, 2, 128, generator=g).bfloat16() for _ in range(4))
    results = []
    for device in ("cuda", "cpu"):
        xs = [t.to(device).requires_grad_() for t in (q, k, v)]
        o, lse = torch.ops.tilemix.attention_lse(*xs, causal, 128 ** -0.5)
        o.backward(do.to(device))
        results.append([lse.detach().cpu()] + [t.grad.cpu() for t in xs])
    for ours, interp in zip(*results):
        assert not ours.isnan().any()
        assert rel_err(ours, interp.double().numpy()) <= bound(torch.bfloat16)


def test_attention_training_step_compiles_fullgraph():
    """The forward with saved log-sum-exp and both backward programs are custom ops: a compiled
    training step has no graph break and matches eager."""
    g = torch.Generator().manual_seed(8)
    q, k, v, do = (torch.randn(1, 70, 2, 32, generator=g) for _ in range(4))

    def loss(q, k, v):
        return (ops.attention(q, k, v, causal=True) * do).sum()

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):  # AOT traces the backward too
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*xs).backward()
        grads.append([t.grad for t in xs])
    for e, c in zip(*grads):
        assert torch.equal(e, c)


def test_attention_gradient_of_q_only():
    g = torch.Generator().manual_seed(9)
    q, k, v, do = (torch.randn(1, 70, 2, 16, generator=g, dtype=torch.float64) for _ in range(4))
    (dq,) = torch.autograd.grad(ops.attention(q.requires_grad_(), k, v, causal=True), (q,), do)
    (expected,) = torch.autograd.grad(_attention(q, k, v, True), (q,), do)
    assert torch.allclose(dq, expected, rtol=1e-10, atol=1e-12)
