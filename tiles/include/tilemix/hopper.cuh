// tilemix device tile library for Hopper (sm_90a).
//
// The code generator lowers every tile program to calls into this header; no
// op has a kernel of its own. NVRTC compiles it with no CUDA headers on the
// include path, so everything needed is declared here.
//
// Register tiles (rt<R, C>) hold fp32 in the wgmma accumulator layout of one
// warpgroup: rows in blocks of 64 (one m64 block per 64 rows), columns in n8
// blocks. Thread t of the warpgroup (warp w = t/32, lane l) holds, in block
// (mb, nb), rows mb*64 + 16w + l/4 + {0, 8} and columns nb*8 + 2(l%4) + {0, 1}.
// A tile with R == 1 (row vector) or C == 1 (column vector) keeps only the
// coordinates it has, so broadcasting is index arithmetic.
//
// Shared tiles hold bf16/fp16 rows of 128 bytes in panels of 64 columns with
// the 128-byte swizzle that TMA writes and wgmma reads: element (r, c) of a
// tile of R rows sits in panel c/64 at row r, 16-byte chunk ((c%64)/8) ^ (r%8).
#pragma once

namespace tm {

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// ---------------------------------------------------------------- basics ----
struct alignas(64) TMap { u64 d[16]; };  // a CUtensorMap, passed by value as __grid_constant__

__device__ __forceinline__ int lane_id() { return threadIdx.x % 32; }
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// bar.sync on a named barrier for the `count` threads of one role (warpgroup = 128)
__device__ __forceinline__ void sync_threads(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
template <int N> __device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N)); }
template <int N> __device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N)); }

// ----------------------------------------------------------- elementwise ----
__device__ __forceinline__ float ex2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ float lg2(float x) { float y; asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ float f_exp(float x) { return ex2(x * 1.4426950408889634f); }
__device__ __forceinline__ float f_log(float x) { return lg2(x) * 0.6931471805599453f; }
__device__ __forceinline__ float f_sqrt(float x) { float y; asm("sqrt.rn.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ float f_tanh(float x) { float y; asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ float f_sigmoid(float x) { return 0.5f * (1.0f + f_tanh(0.5f * x)); }
__device__ __forceinline__ float f_softplus(float x) { return fmaxf(x, 0.0f) + f_log(1.0f + f_exp(-fabsf(x))); }
// sine / cosine: the argument reduced to [-pi, pi] (2 pi split in two floats), then the fast
// hardware approximation, which is accurate only on that range
__device__ __forceinline__ float reduce_2pi(float x) {
  float k = rintf(x * 0.15915494309189535f);
  return fmaf(k, 1.7484556e-07f, fmaf(-k, 6.2831854820251465f, x));
}
__device__ __forceinline__ float f_sin(float x) { return __sinf(reduce_2pi(x)); }
__device__ __forceinline__ float f_cos(float x) { return __cosf(reduce_2pi(x)); }
__device__ __forceinline__ float f_neg_inf() { return __int_as_float(0xff800000); }

// rounding to the 16-bit operand types: bf16 (is_bf16) or fp16
template <bool is_bf16> __device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
  if (is_bf16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <bool is_bf16> __device__ __forceinline__ float unpack(u16 h) {
  if (is_bf16) return __uint_as_float(((u32)h) << 16);
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
template <bool is_bf16> __device__ __forceinline__ float round16(float x) {
  u32 p = pack2<is_bf16>(x, 0.0f);
  return unpack<is_bf16>((u16)(p & 0xffff));
}

// ---------------------------------------------------------- register tiles ----
template <int R_, int C_> struct rt {
  static constexpr int R = R_, C = C_;
  static constexpr int MB = R == 1 ? 1 : R / 64;  // m64 blocks
  static constexpr int NB = C == 1 ? 1 : C / 8;   // n8 blocks
  static constexpr int HR = R == 1 ? 1 : 2;       // rows per thread per block
  static constexpr int CP = C == 1 ? 1 : 2;       // columns per thread per block
  static_assert(R == 1 || R % 64 == 0, "register tiles have 1 or a multiple of 64 rows on sm_90a");
  static_assert(C == 1 || C % 8 == 0, "register tile columns are 1 or a multiple of 8");
  float v[MB][NB][HR][CP];
};

// the element of `t` that broadcasts to coordinate (mb, nb, hr, cp) of a larger tile
template <class T> __device__ __forceinline__ float at(const T& t, int mb, int nb, int hr, int cp) {
  return t.v[T::R == 1 ? 0 : mb][T::C == 1 ? 0 : nb][T::R == 1 ? 0 : hr][T::C == 1 ? 0 : cp];
}
__device__ __forceinline__ float at(float x, int, int, int, int) { return x; }

// row / column of coordinate (mb, nb, hr, cp) within the tile
__device__ __forceinline__ int row_of(int mb, int hr) { return mb * 64 + (threadIdx.x % 128) / 32 * 16 + lane_id() / 4 + 8 * hr; }
__device__ __forceinline__ int col_of(int nb, int cp) { return nb * 8 + (lane_id() % 4) * 2 + cp; }
// the row of coordinate (mb, hr) in a tile of R rows: 0 in a row vector (a one-token chunk's tile)
template <int R> __device__ __forceinline__ int row_in(int mb, int hr) { return R == 1 ? 0 : row_of(mb, hr); }

#define TM_FOR_EACH(T) \
  _Pragma("unroll") for (int mb = 0; mb < T::MB; ++mb) \
  _Pragma("unroll") for (int nb = 0; nb < T::NB; ++nb) \
  _Pragma("unroll") for (int hr = 0; hr < T::HR; ++hr) \
  _Pragma("unroll") for (int cp = 0; cp < T::CP; ++cp)

template <class T> __device__ __forceinline__ void fill(T& t, float x) { TM_FOR_EACH(T) t.v[mb][nb][hr][cp] = x; }

// out(row, col) = f(row, col) at every entry the thread holds (row / col 0 along a dim of size 1)
template <class T, class F> __device__ __forceinline__ void generate(T& out, F f) {
  TM_FOR_EACH(T) out.v[mb][nb][hr][cp] = f(T::R == 1 ? 0 : row_of(mb, hr), T::C == 1 ? 0 : col_of(nb, cp));
}
template <class T, class F, class A> __device__ __forceinline__ void map1(T& out, F f, const A& a) {
  TM_FOR_EACH(T) out.v[mb][nb][hr][cp] = f(at(a, mb, nb, hr, cp));
}
template <class T, class F, class A, class B> __device__ __forceinline__ void map2(T& out, F f, const A& a, const B& b) {
  TM_FOR_EACH(T) out.v[mb][nb][hr][cp] = f(at(a, mb, nb, hr, cp), at(b, mb, nb, hr, cp));
}
template <class T, class F, class A, class B, class C>
__device__ __forceinline__ void map3(T& out, F f, const A& a, const B& b, const C& c) {
  TM_FOR_EACH(T) out.v[mb][nb][hr][cp] = f(at(a, mb, nb, hr, cp), at(b, mb, nb, hr, cp), at(c, mb, nb, hr, cp));
}

// keep(row, col) decides which entries survive; others become `fill`
template <class T, class Keep> __device__ __forceinline__ void mask(T& out, const T& in, Keep keep, float fillv) {
  TM_FOR_EACH(T) {
    bool k = keep(row_of(mb, hr), col_of(nb, cp));
    out.v[mb][nb][hr][cp] = k ? in.v[mb][nb][hr][cp] : fillv;
  }
}

// blocks of a register tile at row R0 (a multiple of 64) and column C0 (a multiple of 8): the same
// registers renamed, no data moves. slice reads out's block of `in`; place writes `in` into out's.
template <int R0, int C0, class T, class S> __device__ __forceinline__ void slice(T& out, const S& in) {
  static_assert(R0 % 64 == 0 && C0 % 8 == 0, "slices start on a register block");
  TM_FOR_EACH(T) out.v[mb][nb][hr][cp] = in.v[mb + R0 / 64][nb + C0 / 8][hr][cp];
}
template <int R0, int C0, class T, class S> __device__ __forceinline__ void place(T& out, const S& in) {
  static_assert(R0 % 64 == 0 && C0 % 8 == 0, "blocks are placed on a register block");
  TM_FOR_EACH(S) out.v[mb + R0 / 64][nb + C0 / 8][hr][cp] = in.v[mb][nb][hr][cp];
}

// ------------------------------------------------------------- reductions ----
struct op_sum { __device__ float operator()(float a, float b) const { return a + b; } };
struct op_max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

// along each row: R x C -> R x 1 (the 4 lanes of a quad share a row)
template <class Op, int R, int C> __device__ __forceinline__ void reduce_rows(rt<R, 1>& out, const rt<R, C>& in, Op op) {
  using T = rt<R, C>;
#pragma unroll
  for (int mb = 0; mb < T::MB; ++mb)
#pragma unroll
    for (int hr = 0; hr < T::HR; ++hr) {
      float acc = in.v[mb][0][hr][0];
#pragma unroll
      for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
        for (int cp = 0; cp < T::CP; ++cp)
          if (nb || cp) acc = op(acc, in.v[mb][nb][hr][cp]);
      if (C > 1) {
        acc = op(acc, __shfl_xor_sync(0xffffffff, acc, 1));
        acc = op(acc, __shfl_xor_sync(0xffffffff, acc, 2));
      }
      out.v[mb][0][hr][0] = acc;
    }
}

// Cross-warp exchanges go through per-consumer shared buffers the code generator sizes for its
// program: column reductions and scans through one (they write, sync, read, and sync again before
// returning, so the next may write at once), transposes through another (they sync before writing,
// and return right after reading: the next transpose's first barrier frees the buffer). Sharing
// one buffer, a reduction could overwrite a transpose that a slower warp was still reading.

// down each column: R x C -> 1 x C, across the warpgroup through `scratch` (4 * C floats)
template <class Op, int R, int C>
__device__ __forceinline__ void reduce_cols(rt<1, C>& out, const rt<R, C>& in, Op op, float* scratch, int bar) {
  using T = rt<R, C>;
  const int warp = (threadIdx.x % 128) / 32;
#pragma unroll
  for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
    for (int cp = 0; cp < T::CP; ++cp) {
      float acc = in.v[0][nb][0][cp];
#pragma unroll
      for (int mb = 0; mb < T::MB; ++mb)
#pragma unroll
        for (int hr = 0; hr < T::HR; ++hr)
          if (mb || hr) acc = op(acc, in.v[mb][nb][hr][cp]);
      if (R > 1) {
        acc = op(acc, __shfl_xor_sync(0xffffffff, acc, 4));
        acc = op(acc, __shfl_xor_sync(0xffffffff, acc, 8));
        acc = op(acc, __shfl_xor_sync(0xffffffff, acc, 16));
      }
      if (lane_id() < 4 || C == 1) scratch[warp * C + (C == 1 ? 0 : col_of(nb, cp))] = acc;
    }
  sync_threads(bar, 128);
#pragma unroll
  for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
    for (int cp = 0; cp < T::CP; ++cp) {
      int c = C == 1 ? 0 : col_of(nb, cp);
      float acc = scratch[c];
      if (R > 1)
        for (int w = 1; w < 4; ++w) acc = op(acc, scratch[w * C + c]);
      out.v[0][nb][0][cp] = acc;
    }
  sync_threads(bar, 128);
}

// a row vector as a column vector and back, through `scratch` (N floats)
template <int N> __device__ __forceinline__ void transpose(rt<N, 1>& out, const rt<1, N>& in, float* scratch, int bar) {
  sync_threads(bar, 128);  // earlier readers of scratch are done
  if ((threadIdx.x % 128) < 4)
#pragma unroll
    for (int nb = 0; nb < rt<1, N>::NB; ++nb)
#pragma unroll
      for (int cp = 0; cp < 2; ++cp) scratch[col_of(nb, cp)] = in.v[0][nb][0][cp];
  sync_threads(bar, 128);
#pragma unroll
  for (int mb = 0; mb < rt<N, 1>::MB; ++mb)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) out.v[mb][0][hr][0] = scratch[row_of(mb, hr)];
}
template <int N> __device__ __forceinline__ void transpose(rt<1, N>& out, const rt<N, 1>& in, float* scratch, int bar) {
  sync_threads(bar, 128);
  if (lane_id() % 4 == 0)
#pragma unroll
    for (int mb = 0; mb < rt<N, 1>::MB; ++mb)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) scratch[row_of(mb, hr)] = in.v[mb][0][hr][0];
  sync_threads(bar, 128);
#pragma unroll
  for (int nb = 0; nb < rt<1, N>::NB; ++nb)
#pragma unroll
    for (int cp = 0; cp < 2; ++cp) out.v[0][nb][0][cp] = scratch[col_of(nb, cp)];
}

// -------------------------------------------------- scans over a chunk's rows ----
// Inclusive prefix sums down the rows of every column of x (R x C; C == 1 for a column vector):
// a shuffle scan over the 16 rows each warp holds, then warp totals through `scratch` (4 * C
// floats, two barriers per 64 rows). `total` gets each column's sum.
template <int R, int C>
__device__ __forceinline__ void scan_rows(rt<R, C>& inc, rt<1, C>& total, const rt<R, C>& x, float* scratch, int bar) {
  using T = rt<R, C>;
  const int warp = (threadIdx.x % 128) / 32, g = lane_id() / 4, q = lane_id() % 4;
  float carry[T::NB][T::CP];
#pragma unroll
  for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
    for (int cp = 0; cp < T::CP; ++cp) carry[nb][cp] = 0.0f;
#pragma unroll
  for (int mb = 0; mb < T::MB; ++mb) {
#pragma unroll
    for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
      for (int cp = 0; cp < T::CP; ++cp) {
        float a = x.v[mb][nb][0][cp], b = x.v[mb][nb][1][cp];  // rows 16w + g and 16w + g + 8
#pragma unroll
        for (int d = 1; d < 8; d *= 2) {
          float ya = __shfl_up_sync(0xffffffff, a, 4 * d), yb = __shfl_up_sync(0xffffffff, b, 4 * d);
          if (g >= d) { a += ya; b += yb; }
        }
        b += __shfl_sync(0xffffffff, a, 28 + q);  // the warp's first 8 rows come before its last 8
        inc.v[mb][nb][0][cp] = a;
        inc.v[mb][nb][1][cp] = b;
        if (g == 7) scratch[warp * C + (C == 1 ? 0 : col_of(nb, cp))] = b;
      }
    sync_threads(bar, 128);
#pragma unroll
    for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
      for (int cp = 0; cp < T::CP; ++cp) {
        const int c = C == 1 ? 0 : col_of(nb, cp);
        float before = carry[nb][cp], block = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          float t = scratch[w * C + c];
          before += w < warp ? t : 0.0f;
          block += t;
        }
        inc.v[mb][nb][0][cp] += before;
        inc.v[mb][nb][1][cp] += before;
        carry[nb][cp] += block;
      }
    sync_threads(bar, 128);  // scratch is free again
  }
#pragma unroll
  for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
    for (int cp = 0; cp < T::CP; ++cp) total.v[0][nb][0][cp] = carry[nb][cp];
}

// The linear recurrence h_t = a_t h_{t-1} + b_t down the rows (REV: h_t = a_t h_{t+1} + b_t, from
// the last row up) from the row h0; EXCL: each row gets the state before it. The scan of scan_rows
// with affine maps (a, b) composed in place of sums: shuffles over each warp's 16 rows, then warp
// maps through `scratch` (8 * C floats, two barriers per 64 rows). a, b, h0 may broadcast. `carry`
// (if given) receives the state after the last row in scan order, which every thread holds at the end.
template <bool REV, bool EXCL, int R, int C, class A, class B, class H>
__device__ __forceinline__ void linrec_rows(rt<R, C>& out, const A& a, const B& b, const H& h0, float* scratch,
                                            int bar, rt<1, C>* carry = nullptr) {
  using T = rt<R, C>;
  const int warp = (threadIdx.x % 128) / 32, g = lane_id() / 4, q = lane_id() % 4;
  const int gs = REV ? 7 - g : g;            // the row's place in scan order within its 8-row half
  const int first = REV ? 1 : 0;             // the half scanned first
  const int edge = REV ? q : 28 + q;         // the lane holding the first half's last row in scan order
  auto up = [](float x, int d) { return REV ? __shfl_down_sync(0xffffffff, x, 4 * d) : __shfl_up_sync(0xffffffff, x, 4 * d); };
  float h[T::NB][T::CP], m[T::NB][T::CP][2];
#pragma unroll
  for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
    for (int cp = 0; cp < T::CP; ++cp) h[nb][cp] = at(h0, 0, nb, 0, cp);
#pragma unroll
  for (int i = 0; i < T::MB; ++i) {
    const int mb = REV ? T::MB - 1 - i : i;
#pragma unroll
    for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
      for (int cp = 0; cp < T::CP; ++cp) {
        float ma[2], mc[2];  // the map of the rows from the warp's first (in scan order) to this one
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          ma[hr] = at(a, mb, nb, hr, cp);
          mc[hr] = at(b, mb, nb, hr, cp);
#pragma unroll
          for (int d = 1; d < 8; d *= 2) {
            float ya = up(ma[hr], d), yc = up(mc[hr], d);
            if (gs >= d) { mc[hr] = fmaf(ma[hr], yc, mc[hr]); ma[hr] *= ya; }
          }
        }
        float ea = __shfl_sync(0xffffffff, ma[first], edge), ec = __shfl_sync(0xffffffff, mc[first], edge);
        mc[1 - first] = fmaf(ma[1 - first], ec, mc[1 - first]);
        ma[1 - first] *= ea;
        m[nb][cp][0] = ma[0];
        m[nb][cp][1] = ma[1];
        out.v[mb][nb][0][cp] = mc[0];
        out.v[mb][nb][1][cp] = mc[1];
        const int c = C == 1 ? 0 : col_of(nb, cp);
        if (gs == 7 && (q == 0 || C > 1)) {
          scratch[warp * C + c] = ma[1 - first];
          scratch[(4 + warp) * C + c] = mc[1 - first];
        }
      }
    sync_threads(bar, 128);
#pragma unroll
    for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
      for (int cp = 0; cp < T::CP; ++cp) {
        const int c = C == 1 ? 0 : col_of(nb, cp);
        float before = h[nb][cp], all = h[nb][cp];  // the state before this warp's rows, after the block's
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const int ww = REV ? 3 - w : w;
          const float wa = scratch[ww * C + c], wc = scratch[(4 + ww) * C + c];
          if (REV ? ww > warp : ww < warp) before = fmaf(wa, before, wc);
          all = fmaf(wa, all, wc);
        }
        h[nb][cp] = all;
        float v[2];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) v[hr] = fmaf(m[nb][cp][hr], before, out.v[mb][nb][hr][cp]);
        if (EXCL) {  // the previous row in scan order
          float p0 = up(v[first], 1), p1 = up(v[1 - first], 1), e = __shfl_sync(0xffffffff, v[first], edge);
          v[1 - first] = gs == 0 ? e : p1;
          v[first] = gs == 0 ? before : p0;
        }
        out.v[mb][nb][0][cp] = v[0];
        out.v[mb][nb][1][cp] = v[1];
      }
    sync_threads(bar, 128);  // scratch is free again
  }
  if (carry)
#pragma unroll
    for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
      for (int cp = 0; cp < T::CP; ++cp) carry->v[0][nb][0][cp] = h[nb][cp];
}

// The substitution of (I + tril(l, -1)) x = b (TRANS: its transpose, from the last row up), four rows
// (a quad) at a time, so that each solved value read serves four rows' sums: x_j at x[j * stride], the
// coefficient of x_j in x_i's equation at coef[i * R + j] (16-byte aligned rows). Quads are numbered in
// solving order; quad_row is the first row of quad p. Host functions too: tests/test_trisolve_host.py
// checks them without a GPU.
template <bool TRANS, int R> __host__ __device__ __forceinline__ int quad_row(int p) {
  static_assert(R % 4 == 0, "trisolve: rows in multiples of 4");
  return 4 * (TRANS ? R / 4 - 1 - p : p);
}

// acc[r] -= the terms of the solved quads p - 1 - skip, p - 1 - skip - step, ... in quad p's rows
template <bool TRANS, int R>
__host__ __device__ __forceinline__ void subtract_solved(float (&acc)[4], const float* x, int stride, const float* coef,
                                                         int p, int skip, int step) {
  const int i0 = quad_row<TRANS, R>(p);
#pragma unroll 1
  for (int q = p - 1 - skip; q >= 0; q -= step) {
    const int j0 = quad_row<TRANS, R>(q);
    float xj[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) xj[e] = x[(j0 + e) * stride];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float4 l4 = *reinterpret_cast<const float4*>(coef + (i0 + r) * R + j0);
      acc[r] = fmaf(-l4.x, xj[0], acc[r]);
      acc[r] = fmaf(-l4.y, xj[1], acc[r]);
      acc[r] = fmaf(-l4.z, xj[2], acc[r]);
      acc[r] = fmaf(-l4.w, xj[3], acc[r]);
    }
  }
}

// quad p's own triangle, once the solved quads' terms are off acc; the solution then goes to x
template <bool TRANS, int R>
__host__ __device__ __forceinline__ void finish_quad(float (&acc)[4], float* x, int stride, const float* coef, int p) {
  const int i0 = quad_row<TRANS, R>(p);
#pragma unroll
  for (int s = 1; s < 4; ++s) {
    const int r = TRANS ? 3 - s : s;
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (TRANS ? e > r : e < r) acc[r] = fmaf(-coef[(i0 + r) * R + i0 + e], acc[e], acc[r]);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) x[(i0 + r) * stride] = acc[r];
}

// one column solved in place over b by one thread
template <bool TRANS, int R>
__host__ __device__ __forceinline__ void solve_column(float* x, int stride, const float* coef) {
  for (int p = 0; p < R / 4; ++p) {
    float acc[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[r] = x[(quad_row<TRANS, R>(p) + r) * stride];
    subtract_solved<TRANS, R>(acc, x, stride, coef, p, 0, 1);
    finish_quad<TRANS, R>(acc, x, stride, coef, p);
  }
}

// one column solved by two threads, `half` 0 and 1 (threads t and t + 64 of the warpgroup, all 128
// calling, those past the columns with active = false): quad p's solved quads alternate between them
// from the newest, which half 0 solved itself; half 1 leaves its sum in `partial` (two slots of 4 x 64
// floats, by quad parity), which half 0 adds after the quad's barrier. Half 1 reads quads p - 2 and
// older only, stored before the previous barrier: one barrier a quad. The substitution's serial chain
// halves where a column a thread would leave half the warpgroup idle (64 columns or fewer).
template <bool TRANS, int R>
__device__ __forceinline__ void solve_column_halves(float* x, int stride, const float* coef, float* partial, bool active,
                                                    int bar) {
  const int half = threadIdx.x % 128 / 64, slot = threadIdx.x % 64;
  for (int p = 0; p < R / 4; ++p) {
    float acc[4];
    float* part = partial + (p % 2) * 256 + slot;
    if (active) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[r] = half ? 0.0f : x[(quad_row<TRANS, R>(p) + r) * stride];
      subtract_solved<TRANS, R>(acc, x, stride, coef, p, half, 2);
      if (half)
#pragma unroll
        for (int r = 0; r < 4; ++r) part[r * 64] = acc[r];
    }
    sync_threads(bar, 128);
    if (active && !half) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[r] += part[r * 64];
      finish_quad<TRANS, R>(acc, x, stride, coef, p);
    }
  }
}

// x solving (I + tril(l, -1)) x = b (TRANS: its transpose, by back substitution): the equations'
// coefficients (row i: x_i's; TRANS: l's column i) and b go to `scratch` (R * (R + C) floats, and 512
// more for 64 columns or fewer: codegen/layout.py sizes it), then the threads solve whole columns of x
// in place there, with no barrier between rows (columns are independent): a column a thread, or two
// (solve_column_halves) for 64 columns or fewer.

template <bool TRANS, int R, int C>
__device__ __forceinline__ void trisolve(rt<R, C>& x, const rt<R, R>& l, const rt<R, C>& b, float* scratch, int bar) {
  float* sl = scratch;
  float* sx = scratch + R * R;
  {
    using L = rt<R, R>;
    TM_FOR_EACH(L) {
      const int r = row_of(mb, hr), c = col_of(nb, cp);
      sl[TRANS ? c * R + r : r * R + c] = l.v[mb][nb][hr][cp];
    }
  }
  using T = rt<R, C>;
  TM_FOR_EACH(T) sx[row_of(mb, hr) * C + (C == 1 ? 0 : col_of(nb, cp))] = b.v[mb][nb][hr][cp];
  sync_threads(bar, 128);
  if constexpr (C <= 64) {
    const int c = threadIdx.x % 64;
    solve_column_halves<TRANS, R>(sx + (c < C ? c : 0), C, sl, sx + R * C, c < C, bar);
  } else {
    for (int c = threadIdx.x % 128; c < C; c += 128) solve_column<TRANS, R>(sx + c, C, sl);
  }
  sync_threads(bar, 128);
  TM_FOR_EACH(T) x.v[mb][nb][hr][cp] = sx[row_of(mb, hr) * C + (C == 1 ? 0 : col_of(nb, cp))];
  sync_threads(bar, 128);  // scratch is free again
}

// row by row outer product, out[r][i * CY + j] = x[r][i] * y[r][j] (CY a multiple of 8): y[r][j] is
// the thread's own (column j % 8 of out's block is j's), x[r][i] comes from the lane of the quad that
// holds column i (the quad's four lanes hold a row between them)
template <int R, int CX, int CY>
__device__ __forceinline__ void outer_rows(rt<R, CX * CY>& out, const rt<R, CX>& x, const rt<R, CY>& y) {
  static_assert(CY % 8 == 0, "outer_rows: y's columns in multiples of 8");
  using T = rt<R, CX * CY>;
  TM_FOR_EACH(T) {
    const int i = nb * 8 / CY, jb = (nb * 8 % CY) / 8;
    const float xi = CX == 1 ? at(x, mb, 0, hr, 0)
                             : __shfl_sync(0xffffffff, at(x, mb, i / 8, hr, i % 2), (lane_id() & ~3) | (i % 8) / 2);
    out.v[mb][nb][hr][cp] = xi * y.v[mb][jb][hr][cp];
  }
}

// one row of a tile as a row vector, through `scratch` (C floats)
template <int ROW, int R, int C> __device__ __forceinline__ void take_row(rt<1, C>& out, const rt<R, C>& in, float* scratch,
                                                                  int bar) {
  using T = rt<R, C>;
#pragma unroll
  for (int mb = 0; mb < T::MB; ++mb)
#pragma unroll
    for (int hr = 0; hr < T::HR; ++hr)
      if (row_of(mb, hr) == ROW && (lane_id() % 4 == 0 || C > 1))
#pragma unroll
        for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
          for (int cp = 0; cp < T::CP; ++cp) scratch[C == 1 ? 0 : col_of(nb, cp)] = in.v[mb][nb][hr][cp];
  sync_threads(bar, 128);
#pragma unroll
  for (int nb = 0; nb < T::NB; ++nb)
#pragma unroll
    for (int cp = 0; cp < T::CP; ++cp) out.v[0][nb][0][cp] = scratch[C == 1 ? 0 : col_of(nb, cp)];
  sync_threads(bar, 128);
}

// inclusive/exclusive, forward/reverse cumulative sum down the rows of every column
template <int R, int C>
__device__ __forceinline__ void cumsum_rows(rt<R, C>& out, const rt<R, C>& x, bool reverse, bool exclusive,
                                            float* scratch, int bar) {
  using T = rt<R, C>;
  rt<1, C> total;
  scan_rows(out, total, x, scratch, bar);
  TM_FOR_EACH(T) {
    float inclusive = out.v[mb][nb][hr][cp], before = inclusive - x.v[mb][nb][hr][cp], all = total.v[0][nb][0][cp];
    out.v[mb][nb][hr][cp] = reverse ? (exclusive ? all - inclusive : all - before) : (exclusive ? before : inclusive);
  }
}

// A column vector is scanned once into `scan` (2R floats of shared memory): x in [0, R), its
// inclusive prefix sums in [R, 2R). Every cumsum and segment sum of that vector then reads the
// scan; the GPU forms segment sums as prefix differences.
template <int R> __device__ __forceinline__ void prefix_scan(const rt<R, 1>& x, float* scan, float* scratch, int bar) {
  rt<R, 1> inc;
  rt<1, 1> total;
  scan_rows(inc, total, x, scratch, bar);  // its barriers also order this write after earlier reads
  if (lane_id() % 4 == 0)
#pragma unroll
    for (int mb = 0; mb < rt<R, 1>::MB; ++mb)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        scan[row_of(mb, hr)] = x.v[mb][0][hr][0];
        scan[R + row_of(mb, hr)] = inc.v[mb][0][hr][0];
      }
  sync_threads(bar, 128);
}

// inclusive/exclusive, forward/reverse cumulative sum of a column vector, from its prefix scan
template <int R>
__device__ __forceinline__ void cumsum(rt<R, 1>& out, const float* scan, bool reverse, bool exclusive) {
  const float total = scan[2 * R - 1];
#pragma unroll
  for (int mb = 0; mb < rt<R, 1>::MB; ++mb)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      int r = row_of(mb, hr);
      float inclusive = scan[R + r], before = inclusive - scan[r];
      out.v[mb][0][hr][0] = reverse ? (exclusive ? total - inclusive : total - before) : (exclusive ? before : inclusive);
    }
}

// out[i][j] = x[j+1] + ... + x[i] for j <= i, -inf above the diagonal, from a prefix scan
template <int R> __device__ __forceinline__ void segsum(rt<R, R>& out, const float* scan) {
  using T = rt<R, R>;
  TM_FOR_EACH(T) {
    int i = row_of(mb, hr), j = col_of(nb, cp);
    out.v[mb][nb][hr][cp] = j <= i ? scan[R + i] - scan[R + j] : f_neg_inf();
  }
}

// ------------------------------------------------------------ shared tiles ----
// byte offset of element (r, c) in a swizzled tile of R rows
template <int R> __device__ __forceinline__ u32 swz_offset(int r, int c) {
  return (u32)((c / 64) * R * 128 + r * 128 + ((((c % 64) / 8) ^ (r % 8)) * 16) + (c % 8) * 2);
}

// shared 16-bit tile -> fp32 register tile (each thread's column pair is one 32-bit word)
template <bool is_bf16, int R, int C> __device__ __forceinline__ void load_shared(rt<R, C>& out, const char* tile) {
  static_assert(C % 8 == 0, "shared tiles are read in column pairs");
#pragma unroll
  for (int mb = 0; mb < rt<R, C>::MB; ++mb)
#pragma unroll
    for (int nb = 0; nb < rt<R, C>::NB; ++nb)
#pragma unroll
      for (int hr = 0; hr < rt<R, C>::HR; ++hr) {
        u32 w = *(const u32*)(tile + swz_offset<R>(row_in<R>(mb, hr), col_of(nb, 0)));
        out.v[mb][nb][hr][0] = unpack<is_bf16>((u16)(w & 0xffff));
        out.v[mb][nb][hr][1] = unpack<is_bf16>((u16)(w >> 16));
      }
}

// fp32 register tile -> shared 16-bit tile (then readable by wgmma after fence + barrier)
template <bool is_bf16, int R, int C> __device__ __forceinline__ void store_shared(char* tile, const rt<R, C>& in) {
#pragma unroll
  for (int mb = 0; mb < rt<R, C>::MB; ++mb)
#pragma unroll
    for (int nb = 0; nb < rt<R, C>::NB; ++nb)
#pragma unroll
      for (int hr = 0; hr < rt<R, C>::HR; ++hr)
        *(u32*)(tile + swz_offset<R>(row_in<R>(mb, hr), col_of(nb, 0))) = pack2<is_bf16>(in.v[mb][nb][hr][0], in.v[mb][nb][hr][1]);
}

// columns [64P, 64P + 64) of a register tile -> one swizzled 64-column shared panel of R rows (the
// source of a TMA store)
template <bool is_bf16, int P, int R, int C> __device__ __forceinline__ void store_panel(char* panel, const rt<R, C>& in) {
  static_assert(C % 64 == 0 && P < C / 64, "a panel is 64 columns of the tile");
#pragma unroll
  for (int mb = 0; mb < rt<R, C>::MB; ++mb)
#pragma unroll
    for (int nb = P * 8; nb < P * 8 + 8; ++nb)
#pragma unroll
      for (int hr = 0; hr < rt<R, C>::HR; ++hr)
        *(u32*)(panel + swz_offset<R>(row_in<R>(mb, hr), col_of(nb, 0) - P * 64)) =
            pack2<is_bf16>(in.v[mb][nb][hr][0], in.v[mb][nb][hr][1]);
}

// --------------------------------------------------------------- mbarrier ----
__device__ __forceinline__ void mbar_init(u64* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* bar, int phase) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)), "r"(phase) : "memory");
}
__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

// -------------------------------------------------------------------- TMA ----
// 4-D tiled load of box (c0.., c1, c2, c3) (innermost first) into shared memory, completing on `bar`
__device__ __forceinline__ void tma_load_4d(void* dst, const TMap* map, u64* bar, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];"
      ::"r"(smem_addr(dst)), "l"((u64)map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3) : "memory");
}
__device__ __forceinline__ void tma_load_2d(void* dst, const TMap* map, u64* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
      ::"r"(smem_addr(dst)), "l"((u64)map), "r"(smem_addr(bar)), "r"(c0), "r"(c1) : "memory");
}

// TMA stores of a swizzled shared panel: elements past the tensor's edges are not written. Each is
// one bulk group of the issuing thread once committed; wait (.read: until its shared memory may be
// reused) before rewriting the panel, and for all before the CTA exits.
__device__ __forceinline__ void tma_store_4d(const TMap* map, const void* src, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];"
               ::"l"((u64)map), "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3) : "memory");
}
__device__ __forceinline__ void tma_store_2d(const TMap* map, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];"
               ::"l"((u64)map), "r"(smem_addr(src)), "r"(c0), "r"(c1) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory"); }
template <int N> __device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory"); }

// ------------------------------------------------------------------ wgmma ----
// Shared-memory matrix descriptor for a 128B-swizzled operand. K-major: rows are the
// M/N dim, 8-row groups 1024 bytes apart (the leading offset is unused). MN-major: rows
// are the K dim, 64 M/N elements per 128-byte row, 8-row K groups 1024 bytes apart and
// successive 64-element M/N panels `lbo` bytes apart (instructions wider than 64).
__device__ __forceinline__ u64 make_desc(const void* p, u32 lbo) {
  u64 addr = smem_addr(p);
  u64 desc = (addr & 0x3FFFF) >> 4;
  desc |= (u64)((lbo >> 4) & 0x3FFF) << 16;  // leading byte offset
  desc |= (u64)(1024 >> 4) << 32;            // stride byte offset: next 8-row group
  desc |= (u64)1 << 62;                      // 128-byte swizzle
  return desc;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// wait until at most N committed wgmma groups of this warpgroup are still in flight
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// Accumulator operands of one m64nNk16 instruction: N/2 fp32 registers per thread.
#define TM_D8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                    "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define TM_D32(d, i) TM_D8(d, i), TM_D8(d, i + 8), TM_D8(d, i + 16), TM_D8(d, i + 24)
#define TM_D64(d) TM_D32(d, 0), TM_D32(d, 32)
#define TM_D128(d) TM_D32(d, 0), TM_D32(d, 32), TM_D32(d, 64), TM_D32(d, 96)
#define TM_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define TM_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define TM_R128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"

// One instruction, A and B from shared memory. DREGS/DOPS: the accumulator list; A, B, P, TA, TB:
// the operand numbers (after the accumulators) of the descriptors, the accumulate flag, transposes.
#define TM_WGMMA_SS(SHAPE, TY, DREGS, DOPS, A, B, P, TA, TB)                                              \
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %" P ", 0;\n wgmma.mma_async.sync.aligned." SHAPE     \
               ".f32." TY "." TY " " DREGS ", %" A ", %" B ", p, 1, 1, %" TA ", %" TB ";\n}\n"            \
               : DOPS : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(trans_a), "n"(trans_b))
// One instruction, A from registers (4 x 16-bit pairs), B from shared memory.
#define TM_WGMMA_RS(SHAPE, TY, DREGS, DOPS, A0, A1, A2, A3, B, P, TB)                                     \
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %" P ", 0;\n wgmma.mma_async.sync.aligned." SHAPE     \
               ".f32." TY "." TY " " DREGS ", {%" A0 ", %" A1 ", %" A2 ", %" A3 "}, %" B ", p, 1, 1, %" TB  \
               ";\n}\n"                                                                                  \
               : DOPS : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(trans_b))

// d[64 x N fp32] (+)= A[64x16] B[16xN], N in {64, 128, 256}, A and B from shared memory
template <bool is_bf16, int N, int trans_a, int trans_b>
__device__ __forceinline__ void mma_ss(float* d, u64 desc_a, u64 desc_b, int accumulate) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma widths used here: 64, 128, 256");
  if constexpr (N == 64) {
    if (is_bf16) TM_WGMMA_SS("m64n64k16", "bf16", TM_R32, TM_D32(d, 0), "32", "33", "34", "35", "36");
    else TM_WGMMA_SS("m64n64k16", "f16", TM_R32, TM_D32(d, 0), "32", "33", "34", "35", "36");
  } else if constexpr (N == 128) {
    if (is_bf16) TM_WGMMA_SS("m64n128k16", "bf16", TM_R64, TM_D64(d), "64", "65", "66", "67", "68");
    else TM_WGMMA_SS("m64n128k16", "f16", TM_R64, TM_D64(d), "64", "65", "66", "67", "68");
  } else {
    if (is_bf16) TM_WGMMA_SS("m64n256k16", "bf16", TM_R128, TM_D128(d), "128", "129", "130", "131", "132");
    else TM_WGMMA_SS("m64n256k16", "f16", TM_R128, TM_D128(d), "128", "129", "130", "131", "132");
  }
}

// d[64 x N fp32] (+)= A[64x16] B[16xN], A from registers, B from shared memory
template <bool is_bf16, int N, int trans_b>
__device__ __forceinline__ void mma_rs(float* d, const u32* a, u64 desc_b, int accumulate) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma widths used here: 64, 128, 256");
  if constexpr (N == 64) {
    if (is_bf16) TM_WGMMA_RS("m64n64k16", "bf16", TM_R32, TM_D32(d, 0), "32", "33", "34", "35", "36", "37", "38");
    else TM_WGMMA_RS("m64n64k16", "f16", TM_R32, TM_D32(d, 0), "32", "33", "34", "35", "36", "37", "38");
  } else if constexpr (N == 128) {
    if (is_bf16) TM_WGMMA_RS("m64n128k16", "bf16", TM_R64, TM_D64(d), "64", "65", "66", "67", "68", "69", "70");
    else TM_WGMMA_RS("m64n128k16", "f16", TM_R64, TM_D64(d), "64", "65", "66", "67", "68", "69", "70");
  } else {
    if (is_bf16) TM_WGMMA_RS("m64n256k16", "bf16", TM_R128, TM_D128(d), "128", "129", "130", "131", "132", "133", "134");
    else TM_WGMMA_RS("m64n256k16", "f16", TM_R128, TM_D128(d), "128", "129", "130", "131", "132", "133", "134");
  }
}

// the widest instruction (256, 128 or 64 columns) that tiles N
template <int N> __host__ __device__ constexpr int mma_width() { return N % 256 == 0 ? 256 : N % 128 == 0 ? 128 : 64; }

// Operand views of a swizzled shared tile with `rows` rows. For a K-major view the tile's
// rows are the M (or N) dim and its columns K; for an MN-major view, the reverse.
template <int rows> __device__ __forceinline__ u64 desc_kmajor(const char* tile, int mn0, int k0) {
  return make_desc(tile + (k0 / 64) * rows * 128 + mn0 * 128 + (k0 % 64) * 2, 16);
}
template <int rows> __device__ __forceinline__ u64 desc_mnmajor(const char* tile, int mn0, int k0) {
  return make_desc(tile + (mn0 / 64) * rows * 128 + k0 * 128, rows * 128);
}

// C[M x N] (ACC: +)= A[M x K] B[K x N]: shared A (K-major unless TA) and shared B (MN-major unless
// TB); `a_rows`/`b_rows` are the stored tiles' row counts. Issued and committed as one wgmma
// group, not waited for: the code generator places `wgmma_wait` before C is read.
template <bool is_bf16, bool TA, bool TB, bool ACC, int a_rows, int b_rows, int M, int N, int K>
__device__ __forceinline__ void matmul_ss(rt<M, N>& c, const char* a, const char* b) {
  constexpr int W = mma_width<N>();
  wgmma_fence();
#pragma unroll
  for (int mb = 0; mb < M / 64; ++mb)
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += W)
#pragma unroll
      for (int k0 = 0; k0 < K; k0 += 16) {
        u64 da = TA ? desc_mnmajor<a_rows>(a, mb * 64, k0) : desc_kmajor<a_rows>(a, mb * 64, k0);
        u64 db = TB ? desc_kmajor<b_rows>(b, n0, k0) : desc_mnmajor<b_rows>(b, n0, k0);
        mma_ss<is_bf16, W, TA ? 1 : 0, TB ? 0 : 1>(&c.v[mb][n0 / 8][0][0], da, db, ACC || k0 > 0);
      }
  wgmma_commit();
}

// C[M x N] (ACC: +)= A[M x K] B[K x N] with A an fp32 register tile (rounded to 16 bits here);
// committed, not waited for, like matmul_ss
template <bool is_bf16, bool TB, bool ACC, int b_rows, int M, int N, int K>
__device__ __forceinline__ void matmul_rs(rt<M, N>& c, const rt<M, K>& a, const char* b) {
  constexpr int W = mma_width<N>();
  u32 frag[M / 64][K / 16][4];
#pragma unroll
  for (int mb = 0; mb < M / 64; ++mb)
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      frag[mb][kk][0] = pack2<is_bf16>(a.v[mb][2 * kk][0][0], a.v[mb][2 * kk][0][1]);
      frag[mb][kk][1] = pack2<is_bf16>(a.v[mb][2 * kk][1][0], a.v[mb][2 * kk][1][1]);
      frag[mb][kk][2] = pack2<is_bf16>(a.v[mb][2 * kk + 1][0][0], a.v[mb][2 * kk + 1][0][1]);
      frag[mb][kk][3] = pack2<is_bf16>(a.v[mb][2 * kk + 1][1][0], a.v[mb][2 * kk + 1][1][1]);
    }
  wgmma_fence();
#pragma unroll
  for (int mb = 0; mb < M / 64; ++mb)
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += W)
#pragma unroll
      for (int kk = 0; kk < K / 16; ++kk) {
        u64 db = TB ? desc_kmajor<b_rows>(b, n0, kk * 16) : desc_mnmajor<b_rows>(b, n0, kk * 16);
        mma_rs<is_bf16, W, TB ? 0 : 1>(&c.v[mb][n0 / 8][0][0], frag[mb][kk], db, ACC || kk > 0);
      }
  wgmma_commit();
}

// ------------------------------------------------------------ global memory ----
template <int R> __device__ __forceinline__ void load_col(rt<R, 1>& out, const float* base, long stride, int t0, int T) {
#pragma unroll
  for (int mb = 0; mb < rt<R, 1>::MB; ++mb)
#pragma unroll
    for (int hr = 0; hr < rt<R, 1>::HR; ++hr) {
      int t = t0 + row_in<R>(mb, hr);
      out.v[mb][0][hr][0] = t < T ? base[(long)t * stride] : 0.0f;
    }
}

// Per-token vectors in the ring: rows t0 .. t0 + R of a strided fp32 sequence -> R floats of shared
// memory, as 4-byte cp.async copies by threads tid, tid + NT, ... (zeros at or past T: a 0-byte copy
// reads nothing, so the source past the end is never read). The chunk loop's column loads travel
// this way beside its tiles: a global load at the head of every chunk stalled the consumers on its
// latency (bench/NOTES.md, "Per-token vectors").
__device__ __forceinline__ void cp_async_4_zfill(float* smem, const float* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 4 : 0)
               : "memory");
}
template <int R, int NT>
__device__ __forceinline__ void load_col_async(float* dst, const float* base, long stride, int t0, int T, int tid) {
#pragma unroll
  for (int r = tid % NT; r < R; r += NT) cp_async_4_zfill(dst + r, base + (long)(t0 + r) * stride, t0 + r < T);
}
// this thread's cp.async copies so far arrive on mbarrier `bar` once they land (one of the arrivals
// the barrier was initialised to expect)
__device__ __forceinline__ void cp_async_arrive(u64* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// the column vector load_col_async left in shared memory
template <int R> __device__ __forceinline__ void load_col_shared(rt<R, 1>& out, const float* src) {
#pragma unroll
  for (int mb = 0; mb < rt<R, 1>::MB; ++mb)
#pragma unroll
    for (int hr = 0; hr < rt<R, 1>::HR; ++hr) out.v[mb][0][hr][0] = src[row_in<R>(mb, hr)];
}

// a per-token vector in shared memory seen as a row (its transpose: one value per column), for
// elementwise maps: each element is read where it is used, so no registers hold it and no
// exchange through scratch transposes it
template <int C_> struct shared_row {
  static constexpr int R = 1, C = C_;
  const float* p;
};
template <int C>
__device__ __forceinline__ float at(const shared_row<C>& t, int, int nb, int, int cp) { return t.p[col_of(nb, cp)]; }

// a loaded (swizzled 16-bit) shared tile seen by elementwise maps: each element read where it is
// used, so no register copy of it stays live until its last reader. The pair a thread holds is
// read as one 32-bit word (as load_shared reads it): the compiler merges the two reads of a pair.
template <bool is_bf16, int R_, int C_> struct shared_tile {
  static constexpr int R = R_, C = C_;
  const char* p;
};
template <bool is_bf16, int R, int C>
__device__ __forceinline__ float at(const shared_tile<is_bf16, R, C>& t, int mb, int nb, int hr, int cp) {
  const u32 w = *(const u32*)(t.p + swz_offset<R>(row_in<R>(mb, hr), col_of(nb, 0)));
  return unpack<is_bf16>((u16)(cp ? w >> 16 : w & 0xffff));
}

// a column vector (one value per row) -> rows t0.. of a strided fp32 sequence (element t at
// base[t * stride], e.g. a [B, T, H] tensor's (b, h) slice), rows at or past T not written;
// one lane of each quad (they hold the same rows) stores
template <int R> __device__ __forceinline__ void store_col(float* base, long stride, int t0, int T, const rt<R, 1>& x) {
  if (lane_id() % 4 == 0)
#pragma unroll
    for (int mb = 0; mb < rt<R, 1>::MB; ++mb)
#pragma unroll
      for (int hr = 0; hr < rt<R, 1>::HR; ++hr) {
        int t = t0 + row_in<R>(mb, hr);
        if (t < T) base[(long)t * stride] = x.v[mb][0][hr][0];
      }
}

// column COL of a tile as a column vector: from a shared tile, each row's element where it lies
template <int COL, bool is_bf16, int R, int C>
__device__ __forceinline__ void take_col(rt<R, 1>& out, const shared_tile<is_bf16, R, C>& in) {
  static_assert(COL >= 0 && COL < C, "the column lies in the tile");
#pragma unroll
  for (int mb = 0; mb < rt<R, 1>::MB; ++mb)
#pragma unroll
    for (int hr = 0; hr < rt<R, 1>::HR; ++hr) {
      const u32 w = *(const u32*)(in.p + swz_offset<R>(row_in<R>(mb, hr), COL & ~1));
      out.v[mb][0][hr][0] = unpack<is_bf16>((u16)(COL % 2 ? w >> 16 : w & 0xffff));
    }
}
// ... from a register tile, from the lane of each quad that holds the column (no barrier)
template <int COL, int R, int C> __device__ __forceinline__ void take_col(rt<R, 1>& out, const rt<R, C>& in) {
  static_assert(COL >= 0 && COL < C, "the column lies in the tile");
  const int holder = (lane_id() & ~3) | (COL % 8) / 2;
#pragma unroll
  for (int mb = 0; mb < rt<R, 1>::MB; ++mb)
#pragma unroll
    for (int hr = 0; hr < rt<R, 1>::HR; ++hr)
      out.v[mb][0][hr][0] = __shfl_sync(0xffffffff, in.v[mb][COL / 8][hr][COL % 2], holder);
}

// fp32 [R x C] matrix at base (row stride `ld`), e.g. a state
// (a vector tile's missing coordinate is 0; of the threads holding copies of an element, one stores it).
// Pairs: a thread's two adjacent columns move as one 8-byte access where base and ld keep them
// aligned, so a warp's access covers whole 32-byte sectors, not two halves of each: for kernels
// that move little but their state (decode steps); the scalar path keeps others' registers.
__device__ __forceinline__ bool pairs_aligned(const float* base, int ld) {
  return reinterpret_cast<unsigned long long>(base) % 8 == 0 && ld % 2 == 0;
}
template <bool Pairs = false, int R, int C>
__device__ __forceinline__ void load_f32(rt<R, C>& out, const float* base, int ld) {
  using T = rt<R, C>;
  if (Pairs && C > 1 && pairs_aligned(base, ld)) {
    TM_FOR_EACH(T) if (cp == 0) {
      const float2 x = *reinterpret_cast<const float2*>(base + row_in<R>(mb, hr) * ld + col_of(nb, 0));
      out.v[mb][nb][hr][0] = x.x;
      out.v[mb][nb][hr][C > 1 ? 1 : 0] = x.y;
    }
    return;
  }
  TM_FOR_EACH(T) out.v[mb][nb][hr][cp] = base[(R == 1 ? 0 : row_of(mb, hr)) * ld + (C == 1 ? 0 : col_of(nb, cp))];
}
// a read-only fp32 row (a head's parameters) read where it is used: volatile, so the compiler does
// not hoist a loop's reads of its slices out of the loop and hold every slice at once
template <int C> __device__ __forceinline__ void load_row_here(rt<1, C>& out, const float* base) {
  using T = rt<1, C>;
  TM_FOR_EACH(T) {
    float x;
    asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(x) : "l"(base + (C == 1 ? 0 : col_of(nb, cp))));
    out.v[mb][nb][hr][cp] = x;
  }
}
template <bool Pairs = false, int R, int C>
__device__ __forceinline__ void store_f32(float* base, int ld, const rt<R, C>& x) {
  using T = rt<R, C>;
  const int t = threadIdx.x % 128;
  if (Pairs && C > 1 && pairs_aligned(base, ld)) {
    if (R > 1 || t / 4 == 0)
      TM_FOR_EACH(T) if (cp == 0)
        *reinterpret_cast<float2*>(base + row_in<R>(mb, hr) * ld + col_of(nb, 0)) =
            make_float2(x.v[mb][nb][hr][0], x.v[mb][nb][hr][C > 1 ? 1 : 0]);
    return;
  }
  if ((R > 1 || t / 4 == 0) && (C > 1 || t % 4 == 0))
    TM_FOR_EACH(T) base[(R == 1 ? 0 : row_of(mb, hr)) * ld + (C == 1 ? 0 : col_of(nb, cp))] = x.v[mb][nb][hr][cp];
}

// ---------------------------------------------- plain stores, packed sequences' edges ----
struct alignas(16) u128 { u32 x, y, z, w; };

// One 64-column swizzled shared panel of R rows (tm::store_panel's output) -> global, by the 128
// threads of a group, 16 bytes per thread and row chunk; rows at or past `rows_left` and columns
// at or past `cols_left` (a multiple of 8) are not written. The generic target's tile stores, and a
// packed sequence's partial last chunk on sm_90a (a TMA store clips at the tensor's edge only).
template <int R>
__device__ __forceinline__ void copy_panel_out(u16* dst, long ld, int rows_left, int cols_left, const char* panel) {
  const int tid = threadIdx.x % 128;
#pragma unroll
  for (int i0 = 0; i0 < R * 8; i0 += 128) {
    const int i = i0 + tid, r = i / 8, j = i % 8;
    if ((R * 8 % 128 == 0 || i < R * 8) && r < rows_left && j * 8 < cols_left)
      *(u128*)(dst + (long)r * ld + j * 8) = *(const u128*)(panel + r * 128 + ((j ^ (r % 8)) * 16));
  }
}

// Rows `keep` and after of each of the `panels` R-row, 64-column swizzled panels from `tile` set to
// zero, by the 128 threads of a group: a packed sequence's partial last chunk, which TMA filled
// with the next sequence's tokens (a swizzled row stays within its own 128 bytes).
template <int R>
__device__ __forceinline__ void zero_rows(char* tile, int panels, int keep) {
  const int tid = threadIdx.x % 128;
  for (int i = tid; i < panels * R * 8; i += 128) {
    const int panel = i / (R * 8), r = i / 8 % R, j = i % 8;
    if (r >= keep) *(u128*)(tile + panel * R * 128 + r * 128 + j * 16) = u128{0, 0, 0, 0};
  }
}

}  // namespace tm
