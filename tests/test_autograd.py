"""Gradients whose backward kernels are tile programs (so far: gemm's two transposed products).
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
    from tilemix.codegen.launch import hopper_source

    specs = example_specs("gemm")
    source = hopper_source(program, program.bind(specs))
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


def _la(q, k, v, s0):
    """Linear attention in plain torch (float64 autograd ground truth): S_t = S_0 + Σ_{j≤t} k_j v_jᵀ."""
    states = torch.cumsum(torch.einsum("bthk,bthv->bthkv", k, v), dim=1) + s0[:, None]
    return q.shape[-1] ** -0.5 * torch.einsum("bthk,bthkv->bthv", q, states), states[:, -1]


@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("with_state", [False, True])
def test_linear_attention_gradcheck(T, with_state):
    """dq runs forward in time, dk and dv over the reversed sequence (two tile programs); the final
    state's gradient seeds the reversed pass and what it reaches is the initial state's gradient.
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


@pytest.mark.parametrize("program", ["linear_attention_bwd_dq", "linear_attention_bwd_dkdv"])
def test_linear_attention_backward_programs_lower(program):
    pytest.importorskip("cuda.bindings")
    from tilemix.codegen.compile import compile_cuda, sass
    from tilemix.codegen.launch import hopper_source
    from tilemix.ops.linear_attention import linear_attention_bwd_dkdv, linear_attention_bwd_dq
    from tilemix.tiles import TensorSpec

    kernel = {"linear_attention_bwd_dq": linear_attention_bwd_dq,
              "linear_attention_bwd_dkdv": linear_attention_bwd_dkdv}[program]
    seq = TensorSpec((2, 4096, 16, 128), "bfloat16")
    args = dict(do=seq, k=seq, v=seq, scale=0.1) if program.endswith("dq") else dict(q=seq, k=seq, v=seq, do=seq,
                                                                                     scale=0.1)
    source = hopper_source(kernel, kernel.bind(args))
    assert "HGMMA" in sass(compile_cuda(source.source, "sm_90a", source.name))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [100, 300])
def test_gpu_linear_attention_gradients(T):
    g = torch.Generator().manual_seed(T)
    q, k, v, do = (torch.randn(2, T, 3, 64, generator=g).bfloat16() for _ in range(4))
    s0 = torch.randn(2, 3, 64, 64, generator=g)
    gpu = [t.cuda().requires_grad_() for t in (q, k, v, s0)]
    o, _ = ops.linear_attention(*gpu[:3], initial_state=gpu[3])
    o.backward(do.cuda())
    ref = [t.double().requires_grad_() for t in (q, k, v, s0)]
    _la(*ref)[0].backward(do.double())
    for ours, expected in zip(gpu, ref):
        assert rel_err(ours.grad.cpu(), expected.grad.numpy()) <= bound(torch.bfloat16)
