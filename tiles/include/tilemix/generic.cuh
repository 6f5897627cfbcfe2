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
//
// Register tiles are shared with the Hopper target: per warp, the wgmma m64nN
// accumulator layout of hopper.cuh (warp w of a 128-thread group owns rows
// 16w..16w+15 of each 64-row block; lane 4g+t holds rows g, g+8 and columns
// 8j+2t, 8j+2t+1) *is* the m16n8 C fragment above repeated over N/8, and two
// neighbouring n8 C fragments, rounded to 16 bits, are one m16n8k16 A fragment.
// So this header includes hopper.cuh for tm::rt and everything that works on
// it (elementwise maps, masks, reductions, scans, transposes, shared-tile and
// fp32 global accessors); its wgmma/TMA/mbarrier functions are never called
// from generic kernels and so never reach ptxas. What differs is below, in
// namespace tm: cp.async tile loads into the same 128-byte-swizzled shared
// layout TMA writes (panels of 64 columns, 16-byte chunk (c%64)/8 ^ r%8 of
// row r), matmuls with ldmatrix(.trans) + mma.sync (A from shared memory or
// registers, B from shared memory), and stores through a swizzled shared panel
// with 16-byte global writes.
#pragma once

#include "hopper.cuh"

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

// ---- ldmatrix: four 8x8 16-bit matrices from shared memory, row addresses per lane (shared-window
// addresses; a memory clobber: never moved across the barriers and stores that make the tile ready)
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row) : "memory");
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

namespace tm {

// ------------------------------------------------------------ cp.async loads ----
// Global R x C 16-bit tile (row stride `ld` elements, 16-byte aligned rows) -> swizzled shared
// tile, by the NT threads of the CTA (thread `tid`), as 16-byte cp.async copies. Rows at or past
// `rows_left` and columns at or past `cols_left` (a multiple of 8) read as zeros. Not committed:
// the caller commits one group per ring stage.
template <int R, int C, int NT>
__device__ __forceinline__ void load_tile_async(char* tile, const u16* src, long ld, int rows_left, int cols_left,
                                                int tid) {
  static_assert(C % 64 == 0, "shared tiles are whole 64-column panels");
  constexpr int PER_ROW = C / 8;
  if constexpr (NT % PER_ROW == 0) {
    // Each thread copies one 16-byte column chunk j of rows r, r + STEP, ...: its column, panel and
    // bounds test are fixed, the source advances by a constant (recomputing (row, chunk) from a
    // flat index took ~45 instructions a copy and made the loads half of a generic gemm's issued
    // instructions).
    constexpr int STEP = NT / PER_ROW;
    // tid through an opaque move: what derives from it is recomputed per load, not hoisted out of
    // the chunk loop and kept live beside the program's tiles (ssd_fwd spilled on sm_80 without it)
    asm volatile("mov.b32 %0, %0;" : "+r"(tid));
    const unsigned j = tid % PER_ROW, r0 = tid / PER_ROW;
    const bool col_ok = j * 8 < cols_left;
    const u16* from = src + (long)r0 * ld + j * 8;
    char* to = tile + (j / 8) * R * 128 + r0 * 128 + (((j % 8) ^ (r0 % 8)) * 16);
    const long step = (long)STEP * ld;
    // Up to 4 steps unrolled: straight-line copies, ~5 instructions each where the loop took ~15
    // (bench/NOTES.md, "Generic target"); more steps,
    // and the addresses ptxas computes ahead make programs at 255 registers spill. A copy of 0
    // bytes reads nothing, so masked copies keep their (out-of-range) source.
    constexpr int STEPS = (R + STEP - 1) / STEP;
#pragma unroll(STEPS <= 4 ? STEPS : 1)
    for (int i = 0; i < STEPS; ++i, from += step) {
      const unsigned r = r0 + i * STEP;
      if (R % STEP != 0 && r >= R) continue;  // the last step's rows past the tile
      if constexpr (STEP % 8 == 0)  // the row's swizzle (r % 8) is the same on every step
        tilemix::generic::cp_async_16_zfill(to + i * STEP * 128, from, col_ok && (int)r < rows_left);
      else
        tilemix::generic::cp_async_16_zfill(tile + (j / 8) * R * 128 + r * 128 + (((j % 8) ^ (r % 8)) * 16), from,
                                            col_ok && (int)r < rows_left);
    }
  } else {  // rows of a width that does not divide the threads (C = 192 with 128 threads)
    constexpr int CHUNKS = R * PER_ROW;
#pragma unroll 1
    for (int i0 = 0; i0 < CHUNKS; i0 += NT) {
      const int i = i0 + tid;
      if (CHUNKS % NT == 0 || i < CHUNKS) {
        const int r = i / PER_ROW, j = i % PER_ROW;
        const bool valid = r < rows_left && j * 8 < cols_left;
        const u16* from = valid ? src + (long)r * ld + j * 8 : src;
        char* to = tile + (j / 8) * R * 128 + r * 128 + (((j % 8) ^ (r % 8)) * 16);
        tilemix::generic::cp_async_16_zfill(to, from, valid);
      }
    }
  }
}
__device__ __forceinline__ void cp_async_commit() { tilemix::generic::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { tilemix::generic::cp_async_wait<N>(); }

// --------------------------------------------------------------- mma.sync ----
// Fragment addresses. Lane l of an ldmatrix.x4 gives a row address of matrix l / 8 of a 16 x 16
// block: row half and column half (i % 2, i / 2) of the block when `rows_first` (A stored M x K,
// B stored K x N), (i / 2, i % 2) otherwise (the transposed storages). In a swizzled tile
// (tm::swz_offset) a block at row r0 % 8 == 0 and column c0 % 16 == 0 moves the lane's 16-byte
// chunk by XOR with ((c0 % 64) / 8), and tiles start on 128-byte rows (the lowering places them
// at 1024-byte boundaries), so the address splits into a per-lane base, computed once per matmul,
// and a compile-time part:
//   address = (base ^ ((c0 % 64) / 8 * 16)) + (c0 / 64) * R * 128 + r0 * 128
// one LOP3 per ldmatrix, where deriving row, panel and swizzle per load took ~5 integer
// instructions (the generic gemm's chunk loop: 460 -> 348 SASS instructions for 128 HMMAs; with
// the unrolled copies above, 305). (row0, col0): a run-time origin of the blocks (row0 % 8 == 0;
// col0 % 16 == 0 and col0 < 64), e.g. the warp's rows.
__device__ __forceinline__ unsigned frag_base(const char* tile, bool rows_first, int row0, int col0) {
  const int l = lane_id(), i = l / 8;
  const int r = (rows_first ? i % 2 : i / 2) * 8 + l % 8, half = rows_first ? i / 2 : i % 2;
  return tilemix::generic::smem_addr(tile) + (row0 + r) * 128 + (((col0 / 8) ^ half ^ (r % 8)) * 16);
}
template <int rows> __device__ __forceinline__ unsigned frag_addr(unsigned base, int r0, int c0) {
  return (base ^ (((c0 % 64) / 8) * 16)) + (c0 / 64) * rows * 128 + r0 * 128;
}
// A fragment (16 x 16 at rows m0.., k k0.. past the base's origin) from a tile of `rows` rows
// holding A (rows are M) or, TA, its transpose (rows are K)
template <int rows, bool TA> __device__ __forceinline__ void frag_a(u32 (&a)[4], unsigned base, int m0, int k0) {
  if (TA) tilemix::generic::ldmatrix_x4_trans(a, frag_addr<rows>(base, k0, m0));
  else tilemix::generic::ldmatrix_x4(a, frag_addr<rows>(base, m0, k0));
}
// B fragments of the two n8 blocks n0.. and n0+8.. at k k0..k0+15 ({b[0], b[1]} and {b[2], b[3]})
// from a tile holding B (K x N: rows are K) or, TB, its transpose (rows are N)
template <int rows, bool TB> __device__ __forceinline__ void frag_b(u32 (&b)[4], unsigned base, int n0, int k0) {
  if (TB) tilemix::generic::ldmatrix_x4(b, frag_addr<rows>(base, n0, k0));
  else tilemix::generic::ldmatrix_x4_trans(b, frag_addr<rows>(base, k0, n0));
}

// the m16n8 C fragment of block (mb, nb) of a register tile: floats [hr][cp] = c0..c3
template <int M, int N> __device__ __forceinline__ float (&c_frag(rt<M, N>& c, int mb, int nb))[4] {
  return *reinterpret_cast<float(*)[4]>(&c.v[mb][nb][0][0]);
}

// one k16 step of this warp's rows (16 per 64-row block): c += A(rows x 16) B(16 x N), each B
// fragment loaded once for all of the warp's row blocks
template <bool is_bf16, bool TB, int b_rows, int M, int N>
__device__ __forceinline__ void mma_k_step(rt<M, N>& c, const u32 (&a)[M / 64][4], unsigned b, int k0) {
#pragma unroll
  for (int n0 = 0; n0 < N; n0 += 16) {
    u32 f[4];
    frag_b<b_rows, TB>(f, b, n0, k0);
    const u32 lo[2] = {f[0], f[1]}, hi[2] = {f[2], f[3]};
#pragma unroll
    for (int mb = 0; mb < M / 64; ++mb) {
      tilemix::generic::mma_16816<is_bf16>(c_frag(c, mb, n0 / 8), a[mb], lo);
      tilemix::generic::mma_16816<is_bf16>(c_frag(c, mb, n0 / 8 + 1), a[mb], hi);
    }
  }
}

// C[M x N] (ACC: +)= A[M x K] B[K x N], A and B from swizzled shared tiles (A K-major unless TA,
// B K x N unless TB; `a_rows`/`b_rows` the stored tiles' rows): the template arguments of
// tm::matmul_ss. Synchronous (mma.sync): C is ready when it returns.
template <bool is_bf16, bool TA, bool TB, bool ACC, int a_rows, int b_rows, int M, int N, int K>
__device__ __forceinline__ void matmul_sync_ss(rt<M, N>& c, const char* a, const char* b) {
  static_assert(M % 64 == 0 && N % 16 == 0 && K % 16 == 0, "mma.sync tiles: M of 64, N and K of 16");
  if (!ACC) fill(c, 0.0f);
  const int warp_row = (threadIdx.x % 128) / 32 * 16;
  const unsigned a_base = frag_base(a, !TA, TA ? 0 : warp_row, TA ? warp_row : 0), b_base = frag_base(b, !TB, 0, 0);
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 16) {
    u32 fa[M / 64][4];
#pragma unroll
    for (int mb = 0; mb < M / 64; ++mb) frag_a<a_rows, TA>(fa[mb], a_base, mb * 64, k0);
    mma_k_step<is_bf16, TB, b_rows>(c, fa, b_base, k0);
  }
}

// the same with A an fp32 register tile, rounded to 16 bits here: two neighbouring n8 blocks of
// its C layout are one A fragment (the template arguments of tm::matmul_rs)
template <bool is_bf16, bool TB, bool ACC, int b_rows, int M, int N, int K>
__device__ __forceinline__ void matmul_sync_rs(rt<M, N>& c, const rt<M, K>& a, const char* b) {
  static_assert(M % 64 == 0 && N % 16 == 0 && K % 16 == 0, "mma.sync tiles: M of 64, N and K of 16");
  if (!ACC) fill(c, 0.0f);
  const unsigned b_base = frag_base(b, !TB, 0, 0);
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    u32 fa[M / 64][4];
#pragma unroll
    for (int mb = 0; mb < M / 64; ++mb) {
      fa[mb][0] = pack2<is_bf16>(a.v[mb][2 * kk][0][0], a.v[mb][2 * kk][0][1]);
      fa[mb][1] = pack2<is_bf16>(a.v[mb][2 * kk][1][0], a.v[mb][2 * kk][1][1]);
      fa[mb][2] = pack2<is_bf16>(a.v[mb][2 * kk + 1][0][0], a.v[mb][2 * kk + 1][0][1]);
      fa[mb][3] = pack2<is_bf16>(a.v[mb][2 * kk + 1][1][0], a.v[mb][2 * kk + 1][1][1]);
    }
    mma_k_step<is_bf16, TB, b_rows>(c, fa, b_base, kk * 16);
  }
}

}  // namespace tm
