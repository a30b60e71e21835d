// bf16 GEMMs for the MoE experts on CPUs with AVX512_BF16 (Zen 4, Cooper Lake, Sapphire Rapids
// and later): out[m, n] = sum_k a[m, k] * w[n, k] with a [M, K] and w [N, K] (HF's [out, in]
// layout) both bf16, products exact and sums in fp32 (vdpbf16ps), the result rounded to bf16.
//
// Dot-product form: each vdpbf16ps multiplies 32 consecutive k of one row of a with 32 of one row
// of w, so both operands are read in place, in their own row-major layout, with no packing of the
// weights (a packed panel is a 32-bit transpose of every weight row: as much work as the GEMM
// itself at the ~50 rows per expert of a 512-token MoE call). A register tile of 4 rows of a by
// 6 rows of w keeps 24 accumulators of 16 fp32 lanes (10 loads per 24 vdpbf16ps); the lanes are
// summed once per output at the end (8 accumulators at a time by a transposing add tree).
// K is not blocked: the 6 weight rows of a tile column stay in L1 / L2 while every row block of
// a passes over them, so each weight byte comes from memory once. Rows of a must not be 4 KiB
// apart (callers pad them: lda = K + 32 elements) or they would share L1 sets with the weight
// rows. Measured single-threaded on a Zen 4 (2048 x 2816 and 1408 x 2048 weights from memory,
// 48 rows): 165-174 GFLOP/s, where torch.mm (oneDNN) does 159 and the core's vdpbf16ps peak is
// 230. Masked loads take the k tail, so any K works; sums run in a fixed order (bitwise
// deterministic whatever the thread count or the column range a call computes).
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/settings.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace latentmoe::cpu::bf16dp {

#define LMOE_CPU_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define LMOE_BF16DP_INLINE inline __attribute__((always_inline))

constexpr int kMr = 4;       // rows of a per register tile
constexpr int kNr = 6;       // rows of w per register tile
constexpr int64_t kPad = 32; // row padding callers add to a's rows (elements)

// The CPU has AVX512F/BW/VL/DQ and AVX512_BF16, and LATENTMOE_CPU_ISA is neither `generic` nor
// `avx2` (tests run the other paths that way).
inline bool cpu_supported() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bf16");
  const char* env = settings::get("LATENTMOE_CPU_ISA");
  return has && !(env != nullptr && (std::strcmp(env, "generic") == 0 || std::strcmp(env, "avx2") == 0));
}

// Row stride (elements) for copies of a's rows: K rounded up to 32, plus kPad.
inline int64_t padded_stride(int64_t K) { return (K + 31) / 32 * 32 + kPad; }

// Rows of a per pass over the weights: about 512 KiB of a's rows (they stay in L2 while the
// weights stream past them once per pass), a multiple of kMr, at least kMr.
inline int64_t rows_per_pass(int64_t K) {
  return std::max<int64_t>(kMr, (int64_t{512} << 10) / (2 * padded_stride(K)) / kMr * kMr);
}

// The lane sums of v[0..8) into out[0..8): a tree of two-source shuffles (vector extensions; the
// unpack intrinsics trip GCC 12's -Wmaybe-uninitialized), halving the lanes per vector each level.
typedef float v16f __attribute__((vector_size(64)));
LMOE_CPU_AVX512BF16 LMOE_BF16DP_INLINE void hsum8(const __m512* v, float* out) {
  v16f x[4];  // x[p]: lanes 0-7 partial sums of v[2p], 8-15 of v[2p + 1]
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    const v16f a = (v16f)v[2 * p], b = (v16f)v[2 * p + 1];
    x[p] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  v16f y[2];  // y[q]: 4 lanes each of v[4q .. 4q + 4)
#pragma GCC unroll 2
  for (int q = 0; q < 2; ++q)
    y[q] = __builtin_shufflevector(x[2 * q], x[2 * q + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(x[2 * q], x[2 * q + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  // z: 2 lanes each of v[0 .. 8)
  const v16f z = __builtin_shufflevector(y[0], y[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                 __builtin_shufflevector(y[0], y[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  const v16f t = __builtin_shufflevector(z, z, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14) +
                 __builtin_shufflevector(z, z, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
  std::memcpy(out, &t, 8 * sizeof(float));
}

// Weight rows to prefetch (to L2) during a tile: rows [r_begin, r_end) of the next column block,
// row r at p0 + r * ldw for r < split, else p1 + (r - split) * ldw. One 64-byte line (32 k) of each
// per step of 32 k, so the next block's weights arrive from memory while this one computes
// (+15-25% at K = 704-1024 and 48 rows on a Zen 4: the hardware prefetcher alone left the first
// tile of each block waiting; prefetching into L1 instead gained about half as much).
struct Prefetch {
  const uint16_t* p0 = nullptr;
  const uint16_t* p1 = nullptr;
  int64_t split = 0, r_begin = 0, r_end = 0;
};

// One step of 32 k (m: the k lanes to load) for MR rows of a and NA + NB rows of w (NA from w0,
// NB from w1, ldw apart): acc[i * (NA + NB) + j] += a_i . w_j over those k.
template <int MR, int NA, int NB>
LMOE_CPU_AVX512BF16 LMOE_BF16DP_INLINE void tile_step(__m512* acc, const uint16_t* a, int64_t lda,
                                                     const uint16_t* w0, const uint16_t* w1, int64_t ldw,
                                                     int64_t k, __mmask32 m, const Prefetch& pf) {
  constexpr int NR = NA + NB;
  for (int64_t r = pf.r_begin; r < pf.r_end; ++r)
    _mm_prefetch(reinterpret_cast<const char*>((r < pf.split ? pf.p0 + r * ldw : pf.p1 + (r - pf.split) * ldw) + k),
                 _MM_HINT_T1);
  __m512bh av[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) av[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, a + i * lda + k);
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    const uint16_t* wr = j < NA ? w0 + j * ldw : w1 + (j - NA) * ldw;
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, wr + k);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[i * NR + j] = _mm512_dpbf16_ps(acc[i * NR + j], av[i], wv);
  }
}

// a_i . w_j over k < K for i < MR: res0[i * ldr + j] for the NA rows of w0, res1[i * ldr + j] for
// the NB rows of w1.
template <int MR, int NA, int NB>
LMOE_CPU_AVX512BF16 LMOE_BF16DP_INLINE void tile(const uint16_t* a, int64_t lda, const uint16_t* w0,
                                                const uint16_t* w1, int64_t ldw, int64_t K, float* res0,
                                                float* res1, int64_t ldr, const Prefetch& pf) {
  constexpr int NR = NA + NB, n = MR * NR, n8 = (n + 7) / 8 * 8;  // (n8: whole groups for hsum8)
  __m512 acc[n8];
#pragma GCC unroll 32
  for (int i = 0; i < n8; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) tile_step<MR, NA, NB>(acc, a, lda, w0, w1, ldw, k, static_cast<__mmask32>(~0u), pf);
  if (k < K)
    tile_step<MR, NA, NB>(acc, a, lda, w0, w1, ldw, k, static_cast<__mmask32>((1ull << (K - k)) - 1), pf);
  float s[n8];
#pragma GCC unroll 4
  for (int g = 0; g < n8; g += 8) hsum8(acc + g, s + g);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) (j < NA ? res0[i * ldr + j] : res1[i * ldr + j - NA]) = s[i * NR + j];
}

// tile<MR, NA, NB> with MR = mr (1..4) and NA = NB = h (1..3) or NA = h (1..6), NB = 0.
template <int MR>
LMOE_CPU_AVX512BF16 void tile_mr(int64_t h, bool paired, const uint16_t* a, int64_t lda, const uint16_t* w0,
                                 const uint16_t* w1, int64_t ldw, int64_t K, float* r0, float* r1, int64_t ldr,
                                 const Prefetch& pf) {
  if (paired) {
    switch (h) {
      case 3: tile<MR, 3, 3>(a, lda, w0, w1, ldw, K, r0, r1, ldr, pf); break;
      case 2: tile<MR, 2, 2>(a, lda, w0, w1, ldw, K, r0, r1, ldr, pf); break;
      default: tile<MR, 1, 1>(a, lda, w0, w1, ldw, K, r0, r1, ldr, pf); break;
    }
    return;
  }
  switch (h) {
    case 6: tile<MR, 6, 0>(a, lda, w0, w1, ldw, K, r0, r1, ldr, pf); break;
    case 5: tile<MR, 5, 0>(a, lda, w0, w1, ldw, K, r0, r1, ldr, pf); break;
    case 4: tile<MR, 4, 0>(a, lda, w0, w1, ldw, K, r0, r1, ldr, pf); break;
    case 3: tile<MR, 3, 0>(a, lda, w0, w1, ldw, K, r0, r1, ldr, pf); break;
    case 2: tile<MR, 2, 0>(a, lda, w0, w1, ldw, K, r0, r1, ldr, pf); break;
    default: tile<MR, 1, 0>(a, lda, w0, w1, ldw, K, r0, r1, ldr, pf); break;
  }
}

// The dot products of all M rows of a with one column block of w (rows w0[0, h) and, when paired,
// w1[0, h)): into r0[m * ldr + j] (and r1[m * ldr + j]), fp32. next: the rows of the column block
// that follows (n_rows of them, the first `split` from next0, the rest from next1), prefetched
// a share per tile.
inline void column_block(const uint16_t* a, int64_t lda, int64_t M, const uint16_t* w0, const uint16_t* w1,
                         int64_t ldw, int64_t K, int64_t h, bool paired, float* r0, float* r1, int64_t ldr,
                         const uint16_t* next0, const uint16_t* next1, int64_t split, int64_t n_rows) {
  const int64_t tiles = (M + kMr - 1) / kMr;
  const int64_t share = (n_rows + tiles - 1) / tiles;  // rows each tile prefetches
  auto pf_of = [&](int64_t t) {
    Prefetch pf;
    pf.p0 = next0;
    pf.p1 = next1;
    pf.split = split;
    pf.r_begin = std::min(n_rows, t * share);
    pf.r_end = std::min(n_rows, (t + 1) * share);
    return pf;
  };
  int64_t m = 0;
  for (; m + kMr <= M; m += kMr)
    tile_mr<kMr>(h, paired, a + m * lda, lda, w0, w1, ldw, K, r0 + m * ldr, r1 + m * ldr, ldr, pf_of(m / kMr));
  const uint16_t* at = a + m * lda;
  float* t0 = r0 + m * ldr;
  float* t1 = r1 + m * ldr;
  const Prefetch pf = pf_of(m / kMr);
  switch (M - m) {
    case 3: tile_mr<3>(h, paired, at, lda, w0, w1, ldw, K, t0, t1, ldr, pf); break;
    case 2: tile_mr<2>(h, paired, at, lda, w0, w1, ldw, K, t0, t1, ldr, pf); break;
    case 1: tile_mr<1>(h, paired, at, lda, w0, w1, ldw, K, t0, t1, ldr, pf); break;
    default: break;
  }
}

inline const uint16_t* bits(const c10::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }

// Output columns per epilogue call: kSpan column blocks' sums are gathered in `res` (row-major,
// kSpan * kNr floats per row) before the caller's epilogue converts them a row at a time, with
// vectors (one scalar epilogue per output cost ~20% of the GEMM).
constexpr int64_t kSpan = 8;
// Column blocks ahead whose weight rows a block prefetches (2-core Zen 4, bf16, 512 tokens: at
// h512 / i256, E = 256 (12 rows per expert, weights from memory) 15.9 -> 13.5 ms from 1 block
// ahead to 2; 3 no better).
constexpr int64_t kAhead = 2;
// Floats of scratch `res` a call needs for M rows of a of length K.
inline int64_t scratch_floats(int64_t M, int64_t K) { return std::min(M, rows_per_pass(K)) * kSpan * kNr; }

// out[m, n] = a[m, :K] . w[n, :K] for m < M and n in [n_begin, n_end): a [M, K] (row stride lda,
// see padded_stride), w [N, K] (ldw). The fp32 sums go to epi(m, n0, sums, count) a row at a time
// (count <= kSpan * kNr consecutive columns from n0). res: scratch_floats(M, K).
template <typename Epi>
inline void gemm(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* w, int64_t ldw, int64_t M, int64_t K,
                 int64_t n_begin, int64_t n_end, float* res, const Epi& epi) {
  const int64_t mc = rows_per_pass(K), ldr = kSpan * kNr;
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t mr = std::min(mc, M - m0);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += ldr) {
      const int64_t span = std::min(ldr, n_end - n0);
      for (int64_t c = 0; c < span; c += kNr) {
        const int64_t n = n0 + c, na = n + kAhead * kNr;  // na: the block to prefetch
        const int64_t nn = std::max<int64_t>(0, std::min<int64_t>(kNr, n_end - na));  // its rows
        column_block(bits(a + m0 * lda), lda, mr, bits(w + n * ldw), nullptr, ldw, K,
                     std::min<int64_t>(kNr, span - c), false, res + c, nullptr, ldr, nn > 0 ? bits(w + na * ldw) : nullptr,
                     nullptr, nn, nn);
      }
      for (int64_t m = 0; m < mr; ++m) epi(m0 + m, n0, res + m * ldr, span);
    }
  }
}

// The gate_up GEMM for gate columns j in [j_begin, j_end) of I: each column block pairs gate rows
// w[j, j + 3) with up rows w[I + j, I + j + 3) (w [2I, K], row stride K), so g and u of a column
// are computed together. epi(m, j0, g, u, count) gets a row's fp32 sums of count (<= kSpan * kNr
// / 2) consecutive gate columns from j0 and of the matching up columns. res: scratch_floats(M, K).
template <typename Epi>
inline void gemm_gate_up(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* w, int64_t K, int64_t I,
                         int64_t M, int64_t j_begin, int64_t j_end, float* res, const Epi& epi) {
  constexpr int64_t kHalf = kNr / 2;
  const int64_t mc = rows_per_pass(K), ldr = kSpan * kNr, half = ldr / 2;
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t mr = std::min(mc, M - m0);
    for (int64_t j0 = j_begin; j0 < j_end; j0 += half) {
      const int64_t span = std::min(half, j_end - j0);
      for (int64_t c = 0; c < span; c += kHalf) {
        const int64_t j = j0 + c, ja = j + kAhead * kHalf;  // ja: the block to prefetch
        const int64_t hn = std::max<int64_t>(0, std::min<int64_t>(kHalf, j_end - ja));  // its gate rows
        column_block(bits(a + m0 * lda), lda, mr, bits(w + j * K), bits(w + (I + j) * K), K, K,
                     std::min<int64_t>(kHalf, span - c), true, res + c, res + half + c, ldr,
                     hn > 0 ? bits(w + ja * K) : nullptr, hn > 0 ? bits(w + (I + ja) * K) : nullptr, hn, 2 * hn);
      }
      for (int64_t m = 0; m < mr; ++m) epi(m0 + m, j0, res + m * ldr, res + m * ldr + half, span);
    }
  }
}

}  // namespace latentmoe::cpu::bf16dp
