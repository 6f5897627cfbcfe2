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
    assert torch.autograd.gradcheck(ops.gemm, (a, b))


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
