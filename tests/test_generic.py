"""Target selection for CUDA devices (issue 5): capability 9.0 → Hopper, 8.x → the generic
mma.sync target for the exact arch, forced by target= or $TILEMIX_TARGET; no GPU needed."""

import pytest

from tilemix.ops._dispatch import select_arch


@pytest.mark.parametrize("cc, arch", [((9, 0), "sm_90a"), ((8, 0), "sm_80"), ((8, 6), "sm_86"), ((8, 9), "sm_89")])
def test_automatic(cc, arch, monkeypatch):
    monkeypatch.delenv("TILEMIX_TARGET", raising=False)
    assert select_arch(cc) == arch


def test_forced_generic_on_hopper(monkeypatch):
    monkeypatch.delenv("TILEMIX_TARGET", raising=False)
    assert select_arch((9, 0), "generic") == "sm_90"
    monkeypatch.setenv("TILEMIX_TARGET", "generic")
    assert select_arch((9, 0)) == "sm_90"
    assert select_arch((9, 0), "hopper") == "sm_90a"  # the argument wins over the environment
    assert select_arch((8, 6)) == "sm_86"


@pytest.mark.parametrize("cc, target, words", [
    ((7, 5), None, "capability 7.5"), ((10, 0), None, "capability 10.0"),
    ((8, 0), "hopper", "needs compute capability 9.0"), ((9, 0), "volta", "not one of"),
])
def test_errors(cc, target, words, monkeypatch):
    monkeypatch.delenv("TILEMIX_TARGET", raising=False)
    with pytest.raises(ValueError, match=words):
        select_arch(cc, target)


# --- the generic device library compiles for every generic arch: HMMA, no HGMMA, no local memory
PROBE = r"""
#include <tilemix/generic.cuh>
using namespace tilemix::generic;
// one warp: C[16x8] = A[16x16] @ B[16x8], A row-major, B stored k-major (row k holds 8 columns)
template <bool Bf16>
__device__ void probe(const unsigned short* a, const unsigned short* b, float* c) {
    typedef unsigned short T;
    __shared__ __align__(16) T sa[16 * 16], sb[16 * 8];
    int lane = threadIdx.x;
    cp_async_16(sa + lane * 8, a + lane * 8);               // 32 lanes x 8 values = 256
    if (lane < 16) cp_async_16(sb + lane * 8, b + lane * 8); // 16 x 8 = 128
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();  // other lanes' copies visible
    unsigned fa[4], fb4[4];
    // matrix i = lane / 8: rows (i % 2) * 8 + lane % 8, k offset (i / 2) * 8
    ldmatrix_x4(fa, sa + ((lane / 8) % 2 * 8 + lane % 8) * 16 + (lane / 16) * 8);
    // B through .trans: matrices (k 0-7) and (k 8-15) of the k-major tile, x4 repeats them
    ldmatrix_x4_trans(fb4, sb + ((lane / 8) % 2 * 8 + lane % 8) * 8);
    unsigned fb[2] = {fb4[0], fb4[1]};
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_16816<Bf16>(d, fa, fb);
    int g = lane / 4, t = lane % 4;
    c[g * 8 + 2 * t] = d[0]; c[g * 8 + 2 * t + 1] = d[1];
    c[(g + 8) * 8 + 2 * t] = d[2]; c[(g + 8) * 8 + 2 * t + 1] = d[3];
}
typedef const unsigned short* In;
extern "C" __global__ void generic_probe_bf16(In a, In b, float* c) { probe<true>(a, b, c); }
extern "C" __global__ void generic_probe_f16(In a, In b, float* c) { probe<false>(a, b, c); }
"""


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_library_compiles(arch):
    pytest.importorskip("cuda.bindings")
    from tilemix.codegen.compile import compile_cuda, resources, sass

    compiled = compile_cuda(PROBE, arch, "generic_probe")
    code = sass(compiled)
    assert "HMMA" in code and "HGMMA" not in code
    assert "LDL" not in code and "STL" not in code
    res = resources(compiled)
    assert res["local"] == 0 and res["stack"] == 0, res


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_library_probe_on_gpu(dtype):
    """One warp's cp.async → ldmatrix(.trans) → mma.sync, against torch: localises a fragment-layout bug."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tilemix.codegen.compile import compile_cuda

    cc = torch.cuda.get_device_capability()
    compiled = compile_cuda(PROBE, f"sm_{cc[0]}{cc[1]}", "generic_probe")
    dt = getattr(torch, dtype)
    a = torch.randn(16, 16, device="cuda", dtype=dt)
    b = torch.randn(16, 8, device="cuda", dtype=dt)
    c = torch.full((16, 8), float("nan"), device="cuda")
    fn = _kernel(compiled.cubin, f"generic_probe_{'bf16' if dtype == 'bfloat16' else 'f16'}")
    fn(a, b, c)
    torch.cuda.synchronize()
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-3, atol=1e-3)


def _kernel(cubin: bytes, name: str):
    """A launcher for a one-warp probe kernel taking three pointers (cuda.bindings driver API)."""
    import ctypes

    import torch
    from cuda.bindings import driver

    torch.cuda.init()
    err, module = driver.cuModuleLoadData(cubin)
    assert err == driver.CUresult.CUDA_SUCCESS, err
    err, fn = driver.cuModuleGetFunction(module, name.encode())
    assert err == driver.CUresult.CUDA_SUCCESS, err

    def launch(*tensors):
        ptrs = [ctypes.c_void_p(t.data_ptr()) for t in tensors]
        args = (ctypes.c_void_p * len(ptrs))(*[ctypes.addressof(p) for p in ptrs])
        stream = torch.cuda.current_stream().cuda_stream
        err, = driver.cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, stream, ctypes.addressof(args), 0)
        assert err == driver.CUresult.CUDA_SUCCESS, err
    return launch
