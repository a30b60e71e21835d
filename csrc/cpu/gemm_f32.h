// fp32 GEMM on the CPU with this project's own register tiles: C = A B (+ bias, or + C), A
// [M, K] row-major, B either [K, N] row-major ("kn") or the transpose of a row-major [N, K] matrix
// ("nk": nn.Linear's weight, a key tile), packed first into panels of 64 columns, each panel four
// [K, 16] column strips one after the other (every strip one sequential stream: rows of a panel
// 256 bytes apart would use a quarter of L1's sets). Used by linear_f32 (large projections) and
// by mla_prefill's per-tile products.
//
// Why not ATen's at::mm: the fp32 GEMM of PyTorch's x86 builds is MKL's sgemm, which runs its
// AVX2 code on AMD CPUs, AVX-512 ones included (measured on 2 Zen 5 cores: 208 GFLOP/s for
// every shape from 128 x 512 x 128 to 4096 x 2048 x 3072, about half of their 16-lane FMA
// peak). A 6 x 64 tile of 16-lane FMAs (24 accumulators; per k, 4 panel loads and 6 broadcasts
// for 24 FMAs) runs near the peak with its panel in L1/L2.
//
// Blocking: K in blocks of kKc (a panel's [kKc, 64] slab is 64 KiB), rows in blocks of kMc (an A
// block of kMc x kKc floats, packed k-major per 6-row group, stays in L2 while every panel passes
// over it). The accumulators of a
// tile start at 0, at the bias, or at C (a later k block, or the caller's accumulate mode), and
// are stored back in fp32: each output is the sum in k order, the bias (or C) first; the result
// is bitwise the same at any thread count and whatever the blocking.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/vec8.h"

namespace latentmoe::cpu::gemm_f32 {

constexpr int64_t kNr = 64;   // output columns per panel (4 vectors of 16 fp32)
constexpr int64_t kSub = 16;  // columns per strip of a panel
constexpr int kMr = 6;        // rows per register tile
constexpr int64_t kKc = 256;  // k per block
constexpr int64_t kMc = 144;  // rows per block (a multiple of kMr)

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How a tile's accumulators start.
enum class Init { kZero, kBias, kLoad };

// c[i * ldc + col] = init + sum over k < K of A(i, k) * B(k, col), i < MR, col < 64, the sums in k
// order, with
//   A(i, k) = a[k * kMr + i] (kPackedA: the tile's rows packed k-major, kMr floats per k) or
//   a[i * lda + k] (row-major rows, lda apart);
//   B(k, col) = b[(col / kStrip) * ss + k * kStrip + col % kStrip]: strips of kStrip columns, ss
//   floats apart (kStrip = 16: this file's panels of four [K, 16] strips; kStrip = 64: one [K, 64]
//   panel, moe_packed.cpp's layout, ss unused);
// all 64 columns of c exist; init = 0, bias[col] or c's own value. W = 16: the 64 columns in one
// pass (MR x 4 accumulators); W = 8 (16 registers): NV vectors per pass, all 64 columns at one
// row and 32 at two (a pass of 16 columns at one row read a quarter of each 256-byte row of a
// [K, 64] panel and left a decode step's panels streaming at a fraction of the memory's rate).
// Every loop over NV (up to 8) is unrolled whole: with 4 of 8 unrolled, GCC kept the one-row
// tile's accumulators and panel row on the stack (a load, FMA and store per vector; a decode step
// of moe_experts_packed, T = 1, fp32, h1024 / i704, 2 Zen 1 cores, took 1.13-1.8x the
// weight-streaming floor against 1.0-1.08x unrolled). kPrefetch: n_pf 64-byte lines from pf are
// prefetched to L2 during the first pass, spread evenly over its K steps.
template <int W, int MR, bool kPackedA, int64_t kStrip, bool kPrefetch>
LMOE_V8_INLINE void tile_body(const float* a, int64_t lda, const float* b, int64_t ss, int64_t K, float* c,
                              int64_t ldc, Init init, const float* bias, const char* pf, int64_t n_pf) {
  using V = vec8::vf<W>;
  constexpr int NV = W == 16 ? 4 : MR == 1 ? 8 : MR == 2 ? 4 : 2;
  for (int64_t c0 = 0; c0 < kNr; c0 += NV * W) {
    V acc[MR][NV];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        acc[i][v] = init == Init::kZero   ? V{}
                    : init == Init::kBias ? vec8::loadw<W>(bias + c0 + v * W)
                                          : vec8::loadw<W>(c + i * ldc + c0 + v * W);
    const float* bp[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bp[v] = b + (c0 + v * W) / kStrip * ss + (c0 + v * W) % kStrip;
    int64_t credit = 0;
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (kPrefetch) {
        if (c0 == 0)
          for (credit += n_pf; credit >= K; credit -= K, pf += 64) __builtin_prefetch(pf, 0, 2);
      }
      V bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = vec8::loadw<W>(bp[v] + k * kStrip);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const V av = vec8::splatw<W>(kPackedA ? a[k * kMr + i] : a[i * lda + k]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) vec8::storew<W>(c + i * ldc + c0 + v * W, acc[i][v]);
  }
}

// tile_ISA<MR, kPackedA>: A packed (pack_a; lda unused) or its rows read in place, lda apart.
#define LMOE_GEMM_F32_TILE(ISA, ATTR, W)                                                                       \
  template <int MR, bool kPackedA>                                                                             \
  ATTR inline void tile_##ISA(const float* a, int64_t lda, const float* b, int64_t ss, int64_t K, float* c,  \
                              int64_t ldc, Init init, const float* bias) {                                   \
    tile_body<W, MR, kPackedA, kSub, false>(a, lda, b, ss, K, c, ldc, init, bias, nullptr, 0);               \
  }
LMOE_GEMM_F32_TILE(avx512, LMOE_CPU_AVX512, 16)
LMOE_GEMM_F32_TILE(avx2, LMOE_CPU_AVX2, 8)
LMOE_GEMM_F32_TILE(generic, , 8)
#undef LMOE_GEMM_F32_TILE

enum class Isa { kAvx512, kAvx2, kGeneric };

// The instantiation this CPU runs (LATENTMOE_CPU_ISA narrows it, as for the other kernels).
inline Isa isa() { return vec8::use_avx512() ? Isa::kAvx512 : vec8::use_avx2() ? Isa::kAvx2 : Isa::kGeneric; }

template <int MR, bool kPackedA>
inline void tile_mr(Isa isa, const float* a, int64_t lda, const float* b, int64_t ss, int64_t K, float* c,
                    int64_t ldc, Init init, const float* bias) {
  switch (isa) {
    case Isa::kAvx512: return tile_avx512<MR, kPackedA>(a, lda, b, ss, K, c, ldc, init, bias);
    case Isa::kAvx2: return tile_avx2<MR, kPackedA>(a, lda, b, ss, K, c, ldc, init, bias);
    default: return tile_generic<MR, kPackedA>(a, lda, b, ss, K, c, ldc, init, bias);
  }
}

template <bool kPackedA>
inline void tile(Isa isa, int mr, const float* a, int64_t lda, const float* b, int64_t ss, int64_t K, float* c,
                 int64_t ldc, Init init, const float* bias) {
  switch (mr) {
    case 6: return tile_mr<6, kPackedA>(isa, a, lda, b, ss, K, c, ldc, init, bias);
    case 5: return tile_mr<5, kPackedA>(isa, a, lda, b, ss, K, c, ldc, init, bias);
    case 4: return tile_mr<4, kPackedA>(isa, a, lda, b, ss, K, c, ldc, init, bias);
    case 3: return tile_mr<3, kPackedA>(isa, a, lda, b, ss, K, c, ldc, init, bias);
    case 2: return tile_mr<2, kPackedA>(isa, a, lda, b, ss, K, c, ldc, init, bias);
    default: return tile_mr<1, kPackedA>(isa, a, lda, b, ss, K, c, ldc, init, bias);
  }
}

// Rows [m0, m1) x k [k0, k0 + kc) of A packed for the tiles: per group of kMr rows (the last one
// may have fewer), [kc, kMr] k-major at dst + group * kc * kMr. One L1-friendly stream per tile
// instead of kMr rows a row stride apart (rows of a power-of-two stride share L1 sets). A's
// element (i, k) is a[i * lda + k], or a[k * lda + i] with `trans` (A given as its transpose).
inline void pack_a(const float* a, int64_t lda, bool trans, int64_t m0, int64_t m1, int64_t k0, int64_t kc,
                   float* dst) {
  for (int64_t i = m0; i < m1; i += kMr) {
    const int mr = static_cast<int>(std::min<int64_t>(kMr, m1 - i));
    float* g = dst + (i - m0) * kc;
    if (trans) {
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = a + (k0 + k) * lda + i;
        for (int r = 0; r < mr; ++r) g[k * kMr + r] = src[r];
      }
      continue;
    }
    for (int r = 0; r < mr; ++r) {
      const float* src = a + (i + r) * lda + k0;
      for (int64_t k = 0; k < kc; ++k) g[k * kMr + r] = src[k];
    }
  }
}

// B packed as panels of 64 columns, [P, 4, K, 16]: element (k, col) of panel p at panel(p) +
// (col / 16) * ss() + k * 16 + col % 16; columns past N are 0.
struct Panels {
  int64_t N = 0, K = 0, P = 0;
  const float* packed = nullptr;
  const float* panel(int64_t p) const { return packed + p * K * kNr; }
  int64_t ss() const { return K * kSub; }
};

// Where B's element (k, col) of a panel goes (K rows per strip).
inline int64_t packed_at(int64_t K, int64_t k, int64_t col) { return col / kSub * K * kSub + k * kSub + col % kSub; }

// Packs w [N, K] (row stride ldw; B = w^T) into dst [P, 4, K, 16] (Panels), panels [p0, p1) only.
inline void pack_nk(const float* w, int64_t ldw, int64_t N, int64_t K, float* dst, int64_t p0, int64_t p1) {
  constexpr int64_t kKb = 64;  // transpose in 64 x 64 blocks
  for (int64_t p = p0; p < p1; ++p) {
    float* panel = dst + p * K * kNr;
    const int64_t n0 = p * kNr, nc = std::min(kNr, N - n0);
    for (int64_t k0 = 0; k0 < K; k0 += kKb) {
      const int64_t kb = std::min(kKb, K - k0);
      for (int64_t col = 0; col < nc; ++col) {
        const float* src = w + (n0 + col) * ldw + k0;
        for (int64_t k = 0; k < kb; ++k) panel[packed_at(K, k0 + k, col)] = src[k];
      }
      for (int64_t col = nc; col < kNr; ++col)
        for (int64_t k = 0; k < kb; ++k) panel[packed_at(K, k0 + k, col)] = 0.f;
    }
  }
}

// Panels of B = w^T (w [N, K], row stride ldw), packed into buf.
inline Panels panels_nk(const float* w, int64_t ldw, int64_t N, int64_t K, std::vector<float>& buf, bool parallel) {
  Panels pn;
  pn.N = N, pn.K = K, pn.P = cdiv(N, kNr);
  buf.resize(static_cast<size_t>(pn.P * K * kNr));
  if (parallel && pn.P > 1)
    at::parallel_for(0, pn.P, 1, [&](int64_t p0, int64_t p1) { pack_nk(w, ldw, N, K, buf.data(), p0, p1); });
  else
    pack_nk(w, ldw, N, K, buf.data(), 0, pn.P);
  pn.packed = buf.data();
  return pn;
}

// Panels of B [K, N] (row stride ldb), packed into buf.
inline Panels panels_kn(const float* b, int64_t ldb, int64_t N, int64_t K, std::vector<float>& buf) {
  Panels pn;
  pn.N = N, pn.K = K, pn.P = cdiv(N, kNr);
  buf.resize(static_cast<size_t>(pn.P * K * kNr));
  for (int64_t p = 0; p < pn.P; ++p) {
    float* panel = buf.data() + p * K * kNr;
    const int64_t n0 = p * kNr, nc = std::min(kNr, N - n0);
    for (int64_t s = 0; s < kNr / kSub; ++s) {
      const int64_t cs = std::clamp<int64_t>(nc - s * kSub, 0, kSub);  // columns of strip s that exist
      for (int64_t k = 0; k < K; ++k) {
        float* dst = panel + packed_at(K, k, s * kSub);
        if (cs > 0) std::memcpy(dst, b + k * ldb + n0 + s * kSub, cs * sizeof(float));
        std::fill(dst + cs, dst + kSub, 0.f);
      }
    }
  }
  pn.packed = buf.data();
  return pn;
}

// How gemm_block reads A: packed per block (pack_a) from row-major rows or from A's transpose,
// or in place (row-major rows lda apart, no copy: for small products whose A is used once per
// call, where the packing cost ~5% of the time, and strides that do not put the tile's rows in
// the same L1 sets, i.e. not a multiple of 1 KiB).
enum class ARead { kPackRows, kPackTrans, kInPlace };

// Rows [m0, m1) of C [M, N] (row stride ldc) = A B over panels [p0, p1), with `init` for the
// first k block (kBias: bias [N]; kLoad: C's values) and C's values for the later ones.
inline void gemm_block(Isa isa, const float* a, int64_t lda, const Panels& pn, float* c, int64_t ldc, int64_t m0,
                       int64_t m1, int64_t p0, int64_t p1, Init init, const float* bias,
                       ARead read = ARead::kPackRows) {
  if (bias == nullptr && init == Init::kBias) init = Init::kZero;
  static thread_local std::vector<float> a_pk;  // the A block, packed (pack_a)
  if (read != ARead::kInPlace && a_pk.size() < static_cast<size_t>(kMc * kKc)) a_pk.resize(kMc * kKc);
  alignas(64) float tmp[kMr * kNr];
  alignas(64) float bias_tmp[kNr];
  for (int64_t k0 = 0; k0 < pn.K || (k0 == 0 && pn.K == 0); k0 += kKc) {
    const int64_t kc = std::min(kKc, pn.K - k0);
    const Init in = k0 == 0 ? init : Init::kLoad;
    for (int64_t mb = m0; mb < m1; mb += kMc) {
      const int64_t me = std::min(m1, mb + kMc);
      if (read != ARead::kInPlace) pack_a(a, lda, read == ARead::kPackTrans, mb, me, k0, kc, a_pk.data());
      for (int64_t p = p0; p < p1; ++p) {
        const float* b = pn.panel(p) + k0 * kSub;
        const int64_t ss = pn.ss();
        const int64_t n0 = p * kNr, nc = std::min(kNr, pn.N - n0);
        const float* bias_p = bias != nullptr ? bias + n0 : nullptr;
        if (in == Init::kBias && nc < kNr && bias_p != nullptr) {
          std::fill(bias_tmp, bias_tmp + kNr, 0.f);
          std::memcpy(bias_tmp, bias_p, nc * sizeof(float));
          bias_p = bias_tmp;
        }
        for (int64_t i = mb; i < me; i += kMr) {
          const int mr = static_cast<int>(std::min<int64_t>(kMr, me - i));
          const bool packed = read != ARead::kInPlace;
          const float* ai = packed ? a_pk.data() + (i - mb) * kc : a + i * lda + k0;
          float* ci = c + i * ldc + n0;
          float* co = nc == kNr ? ci : tmp;  // the last, partial panel: through a 64-column buffer
          const int64_t ldo = nc == kNr ? ldc : kNr;
          if (nc < kNr && in == Init::kLoad)
            for (int r = 0; r < mr; ++r) std::memcpy(tmp + r * kNr, ci + r * ldc, nc * sizeof(float));
          if (packed) tile<true>(isa, mr, ai, 0, b, ss, kc, co, ldo, in, bias_p);
          else tile<false>(isa, mr, ai, lda, b, ss, kc, co, ldo, in, bias_p);
          if (nc < kNr)
            for (int r = 0; r < mr; ++r) std::memcpy(ci + r * ldc, tmp + r * kNr, nc * sizeof(float));
        }
      }
    }
    if (pn.K == 0) break;
  }
}

// C [M, N] = A [M, K] B (+ init), single-threaded (a caller inside a parallel region).
inline void gemm(Isa isa, int64_t M, const float* a, int64_t lda, const Panels& pn, float* c, int64_t ldc, Init init,
                 const float* bias = nullptr) {
  if (M > 0 && pn.N > 0) gemm_block(isa, a, lda, pn, c, ldc, 0, M, 0, pn.P, init, bias);
}

// The same reading A's rows in place (ARead::kInPlace), for small products that use A once: no
// packing (~5% of a 128 x 128 x 192 product). Where lda is a multiple of 1 KiB (the tile's rows
// in the same L1 sets) A is packed as gemm() does; the result is bitwise the same either way.
inline void gemm_in_place(Isa isa, int64_t M, const float* a, int64_t lda, const Panels& pn, float* c, int64_t ldc,
                          Init init) {
  const ARead read = lda % 256 == 0 ? ARead::kPackRows : ARead::kInPlace;
  if (M > 0 && pn.N > 0) gemm_block(isa, a, lda, pn, c, ldc, 0, M, 0, pn.P, init, nullptr, read);
}

// The same with A given as its transpose: A's element (i, k) at at[k * ldat + i] (at [K, M]).
inline void gemm_at(Isa isa, int64_t M, const float* at, int64_t ldat, const Panels& pn, float* c, int64_t ldc,
                    Init init) {
  if (M > 0 && pn.N > 0) gemm_block(isa, at, ldat, pn, c, ldc, 0, M, 0, pn.P, init, nullptr, ARead::kPackTrans);
}

// The same split across ATen's threads: work items are (row block, panel range), rows in blocks
// of kMc and panels cut into as many ranges as it takes to give every thread about two items.
inline void gemm_parallel(Isa isa, int64_t M, const float* a, int64_t lda, const Panels& pn, float* c, int64_t ldc,
                          Init init, const float* bias = nullptr) {
  if (M <= 0 || pn.N <= 0) return;
  const int64_t n_mb = cdiv(M, kMc);
  const int64_t threads = at::get_num_threads();
  const int64_t n_pg = std::min(pn.P, std::max<int64_t>(1, cdiv(2 * threads, n_mb)));
  at::parallel_for(0, n_mb * n_pg, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t mb = j / n_pg, pg = j % n_pg;
      const int64_t p0 = pn.P * pg / n_pg, p1 = pn.P * (pg + 1) / n_pg;
      gemm_block(isa, a, lda, pn, c, ldc, mb * kMc, std::min(M, (mb + 1) * kMc), p0, p1, init, bias);
    }
  });
}

}  // namespace latentmoe::cpu::gemm_f32
