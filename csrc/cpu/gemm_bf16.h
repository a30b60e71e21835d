// bf16 GEMMs for the MoE experts on CPUs with AVX512_BF16 (Zen 4, Cooper Lake, Sapphire Rapids
// and later), products exact and sums in fp32 (vdpbf16ps). Two forms:
// - gemm / gemm_gate_up (the forward): out[m, n] = sum_k a[m, k] * w[n, k], a [M, K] and w [N, K]
//   (HF's [out, in] layout), below;
// - gemm_kn (the backward): out[r, n] = sum_k A(r, k) * B[k, n] with B [K, N], further down.
//
// Forward, dot-product form: each vdpbf16ps multiplies 32 consecutive k of one row of a with 32 of one row
// of w, so both operands are read in place, in their own row-major layout, with no packing of the
// weights (a packed panel is a 32-bit transpose of every weight row: as much work as the GEMM
// itself at the ~50 rows per expert of a 512-token MoE call). A register tile of 4 rows of a by
// 6 rows of w keeps 24 accumulators of 16 fp32 lanes (10 loads per 24 vdpbf16ps); the lanes are
// summed once per output at the end (8 accumulators at a time by a transposing add tree).
// K is not blocked: the 6 weight rows of a tile column stay in L1 / L2 while every row block of
// a passes over them, so each weight byte comes from memory once. Rows of a must not be 4 KiB
// apart (callers pad them: lda = K + 32 elements) or they would share L1 sets with the weight
// rows. Measured single-threaded on a Zen 4 (weights from memory, 48 rows): 165-185 GFLOP/s at
// K = 704-2048, where torch.mm (oneDNN) does 159 and the core's vdpbf16ps peak is 230. Masked loads take the k tail, so any K works; sums run in a fixed order (bitwise
// deterministic whatever the thread count or the column range a call computes).
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/vec8.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace latentmoe::cpu::bf16dp {

#define LMOE_CPU_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define LMOE_BF16DP_INLINE inline __attribute__((always_inline))

constexpr int kMr = 4;       // rows of a per register tile
constexpr int kNr = 6;       // rows of w per register tile
constexpr int64_t kPad = 32; // row padding callers add to a's rows (elements)

// The CPU runs vec8's AVX-512 code (AVX512F/VL/BW/DQ; LATENTMOE_CPU_ISA neither `generic` nor
// `avx2`: tests run the other paths that way) and has AVX512_BF16.
inline bool cpu_supported() {
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  return bf16 && vec8::use_avx512();
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

// Weight rows to prefetch (to L2) during a tile: two rows of the next column block (or fewer, the
// others pointing at a row the tile reads anyway, so the step has no branch and no loop: a loop over
// a row range here kept 5 more registers live, and the tile spilled its row pointers). One 64-byte
// line of each per step of 32 k, so the next block's weights arrive from memory while this one
// computes (+15-25% at K = 704-1024 and 48 rows on a Zen 4: the hardware prefetcher alone left the
// first tile of each block waiting; prefetching into L1 instead gained about half as much).
struct Prefetch {
  const uint16_t* r0 = nullptr;
  const uint16_t* r1 = nullptr;
};
constexpr int64_t kPfRows = 2;  // rows a tile prefetches

// One step of 32 k (m: the k lanes to load) for MR rows of a and NA + NB rows of w (NA from w0,
// NB from w1, ldw apart): acc[i * (NA + NB) + j] += a_i . w_j over those k.
template <int MR, int NA, int NB>
LMOE_CPU_AVX512BF16 LMOE_BF16DP_INLINE void tile_step(__m512* acc, const uint16_t* a, int64_t lda,
                                                     const uint16_t* w0, const uint16_t* w1, int64_t ldw,
                                                     int64_t k, __mmask32 m, const Prefetch& pf) {
  constexpr int NR = NA + NB;
  _mm_prefetch(reinterpret_cast<const char*>(pf.r0 + k), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(pf.r1 + k), _MM_HINT_T1);
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
// kPfRows per tile; rows beyond what the tiles take (fewer than n_rows / kPfRows tiles: at most
// 8 rows of a) are asked for up front, a line per 32 k.
inline void column_block(const uint16_t* a, int64_t lda, int64_t M, const uint16_t* w0, const uint16_t* w1,
                         int64_t ldw, int64_t K, int64_t h, bool paired, float* r0, float* r1, int64_t ldr,
                         const uint16_t* next0, const uint16_t* next1, int64_t split, int64_t n_rows) {
  const int64_t tiles = (M + kMr - 1) / kMr;
  auto next_row = [&](int64_t r) { return r < split ? next0 + r * ldw : next1 + (r - split) * ldw; };
  for (int64_t r = tiles * kPfRows; r < n_rows; ++r)
    for (int64_t k = 0; k < K; k += 32) _mm_prefetch(reinterpret_cast<const char*>(next_row(r) + k), _MM_HINT_T1);
  // Tile t prefetches rows kPfRows * t + [0, kPfRows) where they exist; else its own first weight row
  // (read anyway: the prefetch costs a load slot, no memory traffic).
  auto pf_of = [&](int64_t t) {
    Prefetch pf;
    pf.r0 = t * kPfRows < n_rows ? next_row(t * kPfRows) : w0;
    pf.r1 = t * kPfRows + 1 < n_rows ? next_row(t * kPfRows + 1) : w0;
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

// The driver of gemm and gemm_gate_up: for each pass of rows_per_pass(K) rows of a, spans of
// columns [c0, c0 + span) of [c_begin, c_end), each computed as column blocks of kW columns
// (rows c of w, and when kPaired rows off1 + c too, into res + c and res + ldr / 2 + c), then
// epi(m, c0, sums, span) for each row; the blocks kAhead on are prefetched.
template <bool kPaired, typename Epi>
inline void gemm_spans(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* w, int64_t ldw, int64_t off1,
                       int64_t M, int64_t K, int64_t c_begin, int64_t c_end, float* res, const Epi& epi) {
  constexpr int64_t kW = kPaired ? kNr / 2 : kNr, ldr = kSpan * kNr, kSpanCols = kPaired ? ldr / 2 : ldr;
  const int64_t mc = rows_per_pass(K);
  auto row1 = [&](int64_t c) { return kPaired ? bits(w + (off1 + c) * ldw) : nullptr; };
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t mr = std::min(mc, M - m0);
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kSpanCols) {
      const int64_t span = std::min(kSpanCols, c_end - c0);
      for (int64_t c = 0; c < span; c += kW) {
        const int64_t j = c0 + c, ja = j + kAhead * kW;  // ja: the block to prefetch
        const int64_t hn = std::max<int64_t>(0, std::min<int64_t>(kW, c_end - ja));  // its columns
        column_block(bits(a + m0 * lda), lda, mr, bits(w + j * ldw), row1(j), ldw, K, std::min(kW, span - c),
                     kPaired, res + c, kPaired ? res + kSpanCols + c : nullptr, ldr,
                     hn > 0 ? bits(w + ja * ldw) : nullptr, hn > 0 ? row1(ja) : nullptr, hn, kPaired ? 2 * hn : hn);
      }
      for (int64_t m = 0; m < mr; ++m) epi(m0 + m, c0, res + m * ldr, span);
    }
  }
}

// out[m, n] = a[m, :K] . w[n, :K] for m < M and n in [n_begin, n_end): a [M, K] (row stride lda,
// see padded_stride), w [N, K] (ldw). The fp32 sums go to epi(m, n0, sums, count) a row at a time
// (count <= kSpan * kNr consecutive columns from n0). res: scratch_floats(M, K).
template <typename Epi>
inline void gemm(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* w, int64_t ldw, int64_t M, int64_t K,
                 int64_t n_begin, int64_t n_end, float* res, const Epi& epi) {
  gemm_spans<false>(a, lda, w, ldw, 0, M, K, n_begin, n_end, res, epi);
}

// The gate_up GEMM for gate columns j in [j_begin, j_end) of I: each column block pairs gate rows
// w[j, j + 3) with up rows w[I + j, I + j + 3) (w [2I, K], row stride K), so g and u of a column
// are computed together. epi(m, j0, g, u, count) gets a row's fp32 sums of count (<= kSpan * kNr
// / 2) consecutive gate columns from j0 and of the matching up columns. res: scratch_floats(M, K).
template <typename Epi>
inline void gemm_gate_up(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* w, int64_t K, int64_t I,
                         int64_t M, int64_t j_begin, int64_t j_end, float* res, const Epi& epi) {
  gemm_spans<true>(a, lda, w, K, I, M, K, j_begin, j_end, res, [&](int64_t m, int64_t j0, float* v, int64_t n) {
    epi(m, j0, v, v + kSpan * kNr / 2, n);
  });
}

// ---- [K, N]-layout GEMMs (the backward): out[r, n] = sum_k A(r, k) * B[k, n] ----------------
// Outer-product form: vdpbf16ps multiplies a broadcast pair A(r, 2p), A(r, 2p + 1) with 16
// columns of B's rows 2p and 2p + 1 interleaved ("pairs"), so B is repacked a panel at a time
// (kKcPairs pairs of rows by kNp columns, 24 KiB: L1) by interleaving two rows with one permute
// per 32 columns: cheap, unlike the 32-bit transpose the [N, K] layout would need. A is read as
// 32-bit words: word (r, p) at A[r * ars + p * aps] holds A(r, 2p) (low half) and A(r, 2p + 1)
// (high half): rows of a bf16 matrix (ars = row stride / 2, aps = 1), or pairs of rows of its
// transpose interleaved the same way (ars = 1, aps = row stride in words: a weight gradient
// sums over the expert's rows). For odd K the high half of each row's last word must be 0 (B's
// missing row K is packed as 0, and 0 * NaN would be NaN). An 8 x 48 register tile (24
// accumulators; 3 loads and 8 broadcasts per 24 vdpbf16ps). Sums in a fixed order: k blocks in
// turn, pairs in order; each output the same whatever the column range or row split.
constexpr int kKnMr = 8;            // rows of A per register tile
constexpr int64_t kNp = 48;         // columns of B per panel (3 vectors of 16)
constexpr int64_t kKcPairs = 128;   // pairs of B's rows per panel (256 k)

// panel[p * kNp + c] = B[k0 + 2p, n0 + c] | B[k0 + 2p + 1, n0 + c] << 16 for p < np, c < kNp: rows
// at or past K and columns at or past nb as 0.
LMOE_CPU_AVX512BF16 inline void pack_pairs(const uint16_t* b, int64_t ldb, int64_t K, int64_t k0, int64_t np,
                                          int64_t nb, uint32_t* panel) {
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                   24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  const __mmask32 m0 = static_cast<__mmask32>(nb >= 32 ? ~0ull : (1ull << nb) - 1);
  const __mmask32 m1 = static_cast<__mmask32>(nb <= 32 ? 0 : (1ull << (nb - 32)) - 1);
  for (int64_t p = 0; p < np; ++p) {
    const int64_t k = k0 + 2 * p;
    const uint16_t* r0 = b + k * ldb;
    const uint16_t* r1 = r0 + ldb;
    const bool has0 = k < K, has1 = k + 1 < K;
    if (has1) {  // the next panel's columns of both rows (gemm_kn walks B panel by panel)
      _mm_prefetch(reinterpret_cast<const char*>(r0 + kNp + 32), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(r1 + kNp + 32), _MM_HINT_T1);
    }
    const __m512i x0 = has0 ? _mm512_maskz_loadu_epi16(m0, r0) : _mm512_setzero_si512();
    const __m512i y0 = has1 ? _mm512_maskz_loadu_epi16(m0, r1) : _mm512_setzero_si512();
    const __m512i x1 = has0 ? _mm512_maskz_loadu_epi16(m1, r0 + 32) : _mm512_setzero_si512();
    const __m512i y1 = has1 ? _mm512_maskz_loadu_epi16(m1, r1 + 32) : _mm512_setzero_si512();
    uint32_t* dst = panel + p * kNp;
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(x0, lo, y0));
    _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(x0, hi, y0));
    _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(x1, lo, y1));
  }
}

// The outer-product register tile (also the prepacked experts', cpu/moe_packed.cpp):
// res[i * LD + c] (+ if accumulate) = sum over pairs p < np of A(i, p) . panel[p * LD + c] for
// i < MR and c < 16 * NV, A(i, p) the word a[i * ars + p * aps]. kPrefetch: meanwhile n_pf 64-byte
// lines from pf on are prefetched to L2, spread evenly over the pairs (the next panel, a share per
// tile). (The stride and the prefetch are compile-time: as run-time values they cost the short
// tiles of the backward ~5%.)
template <int MR, int NV, int64_t LD, bool kPrefetch>
LMOE_CPU_AVX512BF16 void outer_tile(const uint32_t* a, int64_t ars, int64_t aps, const uint32_t* panel, int64_t np,
                                    float* res, bool accumulate, const char* pf = nullptr, int64_t n_pf = 0) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate ? _mm512_loadu_ps(res + i * LD + 16 * v) : _mm512_setzero_ps();
  int64_t credit = 0;
  for (int64_t p = 0; p < np; ++p) {
    if constexpr (kPrefetch)
      for (credit += n_pf; credit >= np; credit -= np, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(panel + p * LD + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * ars + p * aps]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(res + i * LD + 16 * v, acc[i][v]);
}

// res[i * kNp + c] (+ if accumulate) = sum over pairs p < np of A(i, p) . panel[p, c], i < MR.
template <int MR>
LMOE_CPU_AVX512BF16 void kn_tile(const uint32_t* a, int64_t ars, int64_t aps, const uint32_t* panel, int64_t np,
                                 float* res, bool accumulate) {
  outer_tile<MR, 3, kNp, false>(a, ars, aps, panel, np, res, accumulate);
}

// Floats of scratch `res` gemm_kn needs for M rows, K and columns [n_begin, n_end): one panel's
// sums per row when K fits one k block, else the whole range's.
inline int64_t kn_res_floats(int64_t M, int64_t K, int64_t n_begin, int64_t n_end) {
  const bool one_block = (K + 1) / 2 <= kKcPairs;
  return M * (one_block ? kNp : (n_end - n_begin + kNp - 1) / kNp * kNp);
}
constexpr int64_t kKnPanelWords = kKcPairs * kNp;

// out[r, n] = sum_k A(r, k) * B[k, n] for r < M and n in [n_begin, n_end), B bf16 [K, N] (row
// stride ldb), A as described above. k blocks outer, column panels inner: a k block's rows of B
// (256 of them) are read panel by panel while they stay in L2, where panel-outer order walked
// all of B once per panel (from memory when B is an expert's weight). The fp32 sums go to
// epi(r, n0, sums, count) a row and a panel at a time (count <= kNp columns from n0): after each
// panel when K is one k block, else at the end (the range's sums kept in res, panel j of row r
// at res + (j * M + r) * kNp). panel: kKnPanelWords words; res: kn_res_floats(M, K, n_begin, n_end).
template <typename Epi>
inline void gemm_kn(const uint32_t* a, int64_t ars, int64_t aps, const c10::BFloat16* b, int64_t ldb, int64_t M,
                    int64_t K, int64_t n_begin, int64_t n_end, uint32_t* panel, float* res, const Epi& epi) {
  const int64_t pairs = (K + 1) / 2;
  const bool one_block = pairs <= kKcPairs;
  auto panel_sums = [&](int64_t n0) { return one_block ? res : res + (n0 - n_begin) / kNp * M * kNp; };
  auto flush = [&](int64_t n0) {
    const float* rp = panel_sums(n0);
    for (int64_t r = 0; r < M; ++r) epi(r, n0, rp + r * kNp, std::min(kNp, n_end - n0));
  };
  for (int64_t p0 = 0; p0 < pairs; p0 += kKcPairs) {
    const int64_t np = std::min(kKcPairs, pairs - p0);
    const uint32_t* ap = a + p0 * aps;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kNp) {
      pack_pairs(bits(b) + n0, ldb, K, 2 * p0, np, std::min(kNp, n_end - n0), panel);
      float* rp = panel_sums(n0);
      int64_t r = 0;
      for (; r + kKnMr <= M; r += kKnMr) kn_tile<kKnMr>(ap + r * ars, ars, aps, panel, np, rp + r * kNp, p0 > 0);
      for (; r + 4 <= M; r += 4) kn_tile<4>(ap + r * ars, ars, aps, panel, np, rp + r * kNp, p0 > 0);
      for (; r + 2 <= M; r += 2) kn_tile<2>(ap + r * ars, ars, aps, panel, np, rp + r * kNp, p0 > 0);
      for (; r < M; ++r) kn_tile<1>(ap + r * ars, ars, aps, panel, np, rp + r * kNp, p0 > 0);
      if (one_block) flush(n0);
    }
  }
  if (!one_block)
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kNp) flush(n0);
}

// dst rows (bf16, row stride ldd elements, even) = src rows (fp32 holding bf16 values: exact),
// cols of each, plus a 0 at column `cols` when it is odd (the zero half gemm_kn wants).
LMOE_CPU_AVX512BF16 inline void rows_to_bf16(const float* src, int64_t lds, int64_t rows, int64_t cols,
                                            c10::BFloat16* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    uint16_t* d = reinterpret_cast<uint16_t*>(dst + r * ldd);
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32)
      _mm512_storeu_si512(d + c, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + c + 16), _mm512_loadu_ps(s + c)));
    for (; c < cols; ++c) d[c] = c10::BFloat16(s[c]).x;
    if (cols % 2 == 1) d[cols] = 0;
  }
}

// dst[p * ldd + c] = bf16(src[2p, c]) | bf16(src[2p + 1, c]) << 16 for c < cols, 2p < rows (row
// 2p + 1 past the last: 0): src (fp32 holding bf16 values, row stride lds) with its pairs of rows
// interleaved, the A operand of a weight gradient (ars = 1, aps = ldd).
LMOE_CPU_AVX512BF16 inline void row_pairs_to_bf16(const float* src, int64_t lds, int64_t rows, int64_t cols,
                                                 uint32_t* dst, int64_t ldd) {
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const float* s0 = src + 2 * p * lds;
    const float* s1 = 2 * p + 1 < rows ? s0 + lds : nullptr;
    uint32_t* d = dst + p * ldd;
    int64_t c = 0;
    typedef uint32_t v16u __attribute__((vector_size(64), aligned(4), may_alias));  // (GCC 12 warns on
    for (; c + 16 <= cols; c += 16) {                                              //  the shift intrinsics)
      const v16u lo = *reinterpret_cast<const v16u*>(s0 + c) >> 16;
      const v16u hi = s1 ? *reinterpret_cast<const v16u*>(s1 + c) & 0xFFFF0000u : v16u{};
      *reinterpret_cast<v16u*>(d + c) = lo | hi;
    }
    for (; c < cols; ++c) {
      uint32_t x0, x1 = 0;
      std::memcpy(&x0, s0 + c, 4);
      if (s1) std::memcpy(&x1, s1 + c, 4);
      d[c] = (x0 >> 16) | (x1 & 0xFFFF0000u);
    }
  }
}

}  // namespace latentmoe::cpu::bf16dp
