// tilemix generic tensor-core target (sm_80/86/89, and sm_90 when forced): the
// warp-level primitives the generic lowering is built from. Small and general:
// no op-specific code lives here.
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for
// mma.m16n8k16"); lane = 4 * g + t with g = lane / 4 (0..7), t = lane % 4:
//   A 16x16 (row-major, 4 x b32 of two 16-bit values each)
//     a0: row g,   cols 2t, 2t+1      a1: row g+8, cols 2t, 2t+1
//     a2: row g,   cols 2t+8, 2t+9    a3: row g+8, cols 2t+8, 2t+9
//   B 16x8 (k x n, "col": each b32 holds two consecutive k of one column)
//     b0: k 2t, 2t+1, col g           b1: k 2t+8, 2t+9, col g
//   C/D 16x8 fp32 (4 floats)
//     c0, c1: row g, cols 2t, 2t+1    c2, c3: row g+8, cols 2t, 2t+1
// ldmatrix.x4 loads four 8x8 16-bit matrices; lanes 8i..8i+7 give the row
// addresses of matrix i, and each lane receives, per matrix, the two values of
// row g at cols 2t, 2t+1 (with .trans: of the transposed matrix). Addressing
// matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
// (rows 8-15, k 8-15) therefore yields a0..a3 of an A fragment directly.
#pragma once

// NVRTC runs without the CUDA toolkit's include path: 16-bit values travel as
// unsigned short / packed unsigned, and the dtype is a template flag.

namespace tilemix {
namespace generic {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// ---- cp.async: 16-byte global → shared copies, grouped and awaited per stage
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}
// zero-fills the 16 bytes when `valid` is false (masked tail rows)
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 ::"r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory"); }

// ---- ldmatrix: four 8x8 16-bit matrices from shared memory, row addresses per lane
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}

// ---- mma.sync m16n8k16, 16-bit inputs, fp32 accumulate in place: d += a @ b
template <bool Bf16>  // true: bf16 operands, false: fp16
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    if constexpr (Bf16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

}  // namespace generic
}  // namespace tilemix
