// MLA CPU kernels: absorbed decode on the latent cache and the fused cache append.
//
// mla_decode: work items are (batch row, group of query rows, split of the keys), run with
// at::parallel_for. An item walks its keys in tiles of kTile cache rows; each tile is read once
// for all query rows of the group (query row = (s, h) pair) and stays in L2 between its two uses:
// scores and the weighted sum are register-blocked fp32 micro-kernels (vec8.h vectors; AVX-512,
// AVX2+FMA and portable instantiations picked by CPU feature), with an online softmax vectorised
// across query rows in between. On AVX512_BF16 CPUs the scores of bf16 rows read in place are
// vdpbf16ps dot products and their weighted sums vdpbf16ps outer products on bf16-rounded
// weights (gemm_bf16.h). fp32 accumulators; splits are merged by their LSE.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/linear_checks.h"
#include "common/math.h"
#include "common/mla_checks.h"
#include "common/mla_math.h"
#include "cpu/gemm_bf16.h"
#include "cpu/linear.h"
#include "cpu/vec8.h"

namespace latentmoe::cpu {
namespace {

namespace chk = latentmoe::checks;

constexpr int64_t kTile = 128;       // cache rows per tile (128 x 576 fp32 = 288 KiB: fits L2)
constexpr int64_t kRowGroup = 64;    // query rows per work item
constexpr int64_t kMinSplit = 256;   // fewest keys worth a split of its own

// One tile of n keys (fp32 rows k[n, D], row stride ldk) for the item's m query rows (query row
// = (s, h) pair). The scores and softmax weights are stored key-major, p[j, i], with mp = m
// rounded up to 8 (padding rows have an empty key range): the softmax runs across rows, 8 at a
// time, and the weighted sum broadcasts p[j, i].
struct TileArgs {
  int64_t m, mp, n, D, C;
  const float* q;     // [m, D]: the item's queries [q_latent | q_pe], times softmax_scale
  const float* qt;    // the first qt_rows of them (a multiple of 16) transposed, [qt_rows / 16][D][16],
  int64_t qt_rows;    // for the AVX-512 outer-product scores; 0: none
  const uint16_t* qb; // or, for bf16 scores: [m, D] bf16 queries, not scaled ...
  const uint16_t* kb; // ... and the tile's bf16 key rows in the cache (row stride ldkb); else null
  int64_t ldkb;
  float score_scale;  // scores are multiplied by this in the softmax (1, or softmax_scale for kb)
  const float* k;     // the tile's first key row (fp32; null where the weighted sum reads kb)
  int64_t ldk;
  uint32_t* pv_words; // bf16 weighted sum: scratch for the weights as bf16 pairs of keys ...
  uint32_t* pv_panel; // ... gemm_kn's packed panel ...
  float* pv_res;      // ... and its sums
  const char* next;   // the next tile's first key row in the cache, prefetched during the scores; or null
  int64_t next_ld;    // its row stride (bytes)
  int64_t next_elt;   // its element size (bytes)
  int64_t n_next;     // its key count
  int64_t t0;         // absolute position of the tile's first key
  const int32_t* lo;  // [mp] per row, the visible keys [lo, hi) in absolute positions
  const int32_t* hi;
  float* p;           // [n, mp] scratch: scores, then softmax weights
  float* alpha;       // [mp] scratch: the accumulators' rescale factors
  float* acc;         // [m, C] unnormalised accumulators
  float* m_run;       // [mp] online-softmax state per row: running max ...
  float* l_run;       // ... and running sum of exp(s - m)
};

using DecodeTileFn = void (*)(const TileArgs& a);

struct DecodeParams {
  int64_t B, Sq, H, C, R, D;
  int64_t lmax, page_size, max_pages, num_pages;
  int64_t kv_stride, pe_stride;  // row strides of the c_kv and k_pe sources
  bool split;                    // k_pe rows come from a separate pe_cache
  const int32_t* block_table;    // null: contiguous
  const int32_t* seqlens;
  float scale;
  bool causal;
  int64_t window;
  int64_t n_splits, split_len, n_groups;
  DecodeTileFn tile_fn;          // decode_tile_avx512, decode_tile_avx2 or decode_tile_generic
  bool outer_scores;             // decode_tile_avx512: fp32 scores of 16-row groups in outer-product form
  bool avx2;                     // AVX2+FMA(+F16C) cache-row widening
  bool bf16_scores;              // bf16 rows in place: scores by the AVX512_BF16 dot products
};

namespace v8 = latentmoe::cpu::vec8;
using v8::vf;
using v8::vi;

// ---- fp32 tile micro-kernels (vec8.h vectors), instantiated for AVX-512 (W = 16), AVX2 (W = 8)
// and portable code (W = 8) ----
// Scores, dot-product form: 4 query rows by kScoreKeys keys, 8-lane partial sums over D reduced
// at the end. With AVX-512, whole groups of 16 query rows take an outer-product form instead (the
// rows in the 16 lanes, scores_outer_block: no lane sums; 12% off the op at 16 heads and 4K keys
// on a Zen 4); with 8-lane vectors it was no faster at 16 to 128 rows. Weighted sum, outer-product form: kPvRows query rows by kPvVecs
// vectors of W latent columns; per key, kPvVecs vector loads of k[j, :C] and kPvRows broadcasts
// of weights. The blocks fill 32 vector registers with AVX-512, 16 with AVX2.
template <int W>
constexpr int kScoreKeys = W == 16 ? 6 : 3;
template <int W>
constexpr int kPvRows = W == 16 ? 8 : 4;
template <int W>
constexpr int kPvVecs = 3;

// p[j, i] = q[i, :D] . k[j, :D] for i < MR, j < NR.
// pf: null, or NR rows (pf_ld bytes apart, elements of pf_elt bytes) to prefetch into L2 meanwhile,
// at element d of each row every 16 d (a 64-byte line of fp32, half of one of a 16-bit type).
template <int MR, int NR>
LMOE_V8_INLINE void scores_dot_block(int64_t D, const float* q, const float* k, int64_t ldk, float* p,
                                     int64_t mp, const char* pf, int64_t pf_ld, int64_t pf_elt) {
  v8::v8f acc[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = v8::splat(0.f);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    if (pf != nullptr && (d & 15) == 0) {
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) __builtin_prefetch(pf + j * pf_ld + d * pf_elt, 0, 2);
    }
    v8::v8f kv[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) kv[j] = v8::load(k + j * ldk + d);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const v8::v8f qv = v8::load(q + i * D + d);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[i][j] += qv * kv[j];
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) {
    // The MR rows' lane sums for key j in one reduction (rows past MR padded with zeros).
    v8::v8f r4[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) r4[i] = i < MR ? acc[i < MR ? i : 0][j] : v8::splat(0.f);
    const v8::v4f t = v8::hsum4(r4[0], r4[1], r4[2], r4[3]);
    for (int i = 0; i < MR; ++i) {
      float u = t[i];
      for (int64_t dd = d; dd < D; ++dd) u += q[i * D + dd] * k[j * ldk + dd];
      p[j * mp + i] = u;
    }
  }
}

// Scores, outer-product form (AVX-512; 16 query rows in the lanes, no lane sums): p[j, :16] =
// sum over d of qt[d, :16] * k[j, d] for j < NR, summed in d order. One vector load of qt and NR
// broadcasts of key values per d. (On a Zen 4, 16 rows by 4K keys of 576 fp32 values: 115-117
// GFLOP/s single-threaded against 98-105 for the dot-product form, whose 4 x 6 blocks end in a
// lane sum per score.) pf: as scores_dot_block.
constexpr int kOuterKeys = 8;
template <int NR>
LMOE_V8_INLINE void scores_outer_block(int64_t D, const float* qt, const float* k, int64_t ldk, float* p,
                                       int64_t mp, const char* pf, int64_t pf_ld, int64_t pf_elt) {
  using V = vf<16>;
  V acc[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) acc[j] = v8::splatw<16>(0.f);
  for (int64_t d = 0; d < D; ++d) {
    if (pf != nullptr && (d & 15) == 0) {
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) __builtin_prefetch(pf + j * pf_ld + d * pf_elt, 0, 2);
    }
    const V qv = v8::loadw<16>(qt + d * 16);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[j] += qv * v8::splatw<16>(k[j * ldk + d]);
  }
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) v8::storew<16>(p + j * mp, acc[j]);
}

// The lambdas passed below are always inlined: as functions of their own they would be compiled
// without the caller's target ISA (the AVX-512 kernels as baseline SSE code).
#define LMOE_LAMBDA_INLINE __attribute__((always_inline))

// f.template operator()<MR>(i) for the blocks [i, i + MR) of rows [0, m), then one call for the tail
// (TAIL = 1 .. MR - 1 rows, when there is one).
template <int MR, int TAIL = MR - 1, typename F>
LMOE_V8_INLINE void for_row_blocks(int64_t m, const F& f, int64_t i = 0) {
  if constexpr (TAIL == MR - 1) {
    for (; i + MR <= m; i += MR) f.template operator()<MR>(i);
  }
  if constexpr (TAIL > 0) {
    if (m - i == TAIL) {
      f.template operator()<TAIL>(i);
    } else {
      for_row_blocks<MR, TAIL - 1>(m, f, i);
    }
  }
}

// f.template operator()<R>(j, pf) for the tile's keys [j, j + R) in blocks of R = NR keys, then
// fewer; with `prefetch`, pf is the same rows of the next tile where it has them (else null).
template <int NR, typename F>
LMOE_V8_INLINE void for_key_blocks(const TileArgs& a, bool prefetch, const F& f, int64_t j = 0) {
  for (; j + NR <= a.n; j += NR) {
    const char* pf = prefetch && a.next != nullptr && j + NR <= a.n_next ? a.next + j * a.next_ld : nullptr;
    f.template operator()<NR>(j, pf);
  }
  if constexpr (NR > 1) {
    if (j < a.n) for_key_blocks<NR - 1>(a, prefetch, f, j);
  }
}

// The first block of rows prefetches the next tile.
template <int W>
LMOE_V8_INLINE void scores(const TileArgs& a) {
  int64_t i = 0;
  if constexpr (W == 16) {  // whole groups of 16 rows: the outer-product form
    for (; i < a.qt_rows; i += 16) {
      const float* qt = a.qt + i * a.D;
      for_key_blocks<kOuterKeys>(a, i == 0, [&]<int NR>(int64_t j, const char* pf) LMOE_LAMBDA_INLINE {
        scores_outer_block<NR>(a.D, qt, a.k + j * a.ldk, a.ldk, a.p + j * a.mp + i, a.mp, pf, a.next_ld, a.next_elt);
      });
    }
  }
  const bool prefetched = i > 0;
  for_row_blocks<4>(a.m, [&]<int MR>(int64_t r) LMOE_LAMBDA_INLINE {
    const float* q = a.q + r * a.D;
    for_key_blocks<kScoreKeys<W>>(a, r == 0 && !prefetched, [&]<int NR>(int64_t j, const char* pf) LMOE_LAMBDA_INLINE {
      scores_dot_block<MR, NR>(a.D, q, a.k + j * a.ldk, a.ldk, a.p + j * a.mp + r, a.mp, pf, a.next_ld, a.next_elt);
    });
  }, i);
}

// Online softmax of the tile for the W rows at lane i, keys [0, n): a key outside a row's [lo, hi)
// gets weight 0 and leaves its state alone (kMasked; without it every key is visible to every
// row). A NaN score is skipped by the max (`s > m` is false) and turns the row's weights and sum
// into NaN. Overwrites p with the weights exp(s - m_new) and alpha with the factor each row's
// accumulator is multiplied by first (0 while the row has seen no key).
template <int W, bool kMasked>
LMOE_V8_INLINE void softmax_lanes(const TileArgs& a, int64_t i) {
  using V = vf<W>;
  using I = vi<W>;
  typedef uint32_t U __attribute__((vector_size(W * 4), aligned(4), may_alias));
  const V neg_inf = v8::splatw<W>(-INFINITY);
  // Key t is visible to a row iff t - lo < hi - lo as unsigned (hi >= lo): one compare.
  const I lo = v8::loadw<W>(a.lo + i);
  const U span = (U)(v8::loadw<W>(a.hi + i) - lo);  // same-size vector cast: the bits
  const auto visible = [&](int64_t j) {
    return (U)(v8::splatw<W>(static_cast<int32_t>(a.t0 + j)) - lo) < span;
  };
  const V sc = v8::splatw<W>(a.score_scale);
  V m_tile = neg_inf;
  for (int64_t j = 0; j < a.n; ++j) {
    V s = v8::loadw<W>(a.p + j * a.mp + i) * sc;
    if constexpr (kMasked) s = visible(j) ? s : neg_inf;
    m_tile = s > m_tile ? s : m_tile;
  }
  const V m_old = v8::loadw<W>(a.m_run + i);
  const V m_new = m_tile > m_old ? m_tile : m_old;
  const V alpha = m_old == neg_inf ? v8::splatw<W>(0.f) : v8::exp_nonpos_w<W>(m_old - m_new);
  V l = v8::splatw<W>(0.f);
  for (int64_t j = 0; j < a.n; ++j) {
    float* pj = a.p + j * a.mp + i;
    V w = v8::exp_nonpos_w<W>(v8::loadw<W>(pj) * sc - m_new);
    if constexpr (kMasked) w = visible(j) ? w : v8::splatw<W>(0.f);
    v8::storew<W>(pj, w);
    l += w;
  }
  v8::storew<W>(a.m_run + i, m_new);
  v8::storew<W>(a.l_run + i, v8::loadw<W>(a.l_run + i) * alpha + l);
  v8::storew<W>(a.alpha + i, alpha);
}

template <int W>
LMOE_V8_INLINE void softmax(const TileArgs& a) {
  for (int64_t i = 0; i < a.mp; i += W) {
    // Every key of the tile lies in every row's range (padding rows, never read, do not count).
    bool all_visible = true;
    for (int64_t l = i; l < std::min(i + W, a.m); ++l) all_visible &= a.lo[l] <= a.t0 && a.hi[l] >= a.t0 + a.n;
    if (all_visible) {
      softmax_lanes<W, false>(a, i);
    } else {
      softmax_lanes<W, true>(a, i);
    }
  }
}

// acc[i0 + r, c0 + :NC W] = alpha[r] acc[...] + sum_j p[j, i0 + r] k[j, c0 + ...] for r < MR.
template <int W, int MR, int NC>
LMOE_V8_INLINE void pv_block(const TileArgs& a, int64_t i0, int64_t c0) {
  using V = vf<W>;
  V o[MR][NC];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const float al = a.alpha[i0 + r];
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) o[r][c] = v8::loadw<W>(a.acc + (i0 + r) * a.C + c0 + c * W) * al;
  }
  const float* pj = a.p + i0;
  const float* kj = a.k + c0;
  for (int64_t j = 0; j < a.n; ++j, pj += a.mp, kj += a.ldk) {
    V kv[NC];
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) kv[c] = v8::loadw<W>(kj + c * W);
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V b = v8::splatw<W>(pj[r]);
      #pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) o[r][c] += kv[c] * b;
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) v8::storew<W>(a.acc + (i0 + r) * a.C + c0 + c * W, o[r][c]);
}

// Rows [i0, i0 + MR), every column: blocks of NC vectors, single vectors, then a scalar tail.
template <int W, int MR>
LMOE_V8_INLINE void pv_rows(const TileArgs& a, int64_t i0) {
  constexpr int NC = kPvVecs<W>;
  int64_t c = 0;
  for (; c + NC * W <= a.C; c += NC * W) pv_block<W, MR, NC>(a, i0, c);
  for (; c + W <= a.C; c += W) pv_block<W, MR, 1>(a, i0, c);
  for (int r = 0; r < MR; ++r) {
    const int64_t i = i0 + r;
    for (int64_t cc = c; cc < a.C; ++cc) {
      float t = a.acc[i * a.C + cc] * a.alpha[i];
      for (int64_t j = 0; j < a.n; ++j) t += a.p[j * a.mp + i] * a.k[j * a.ldk + cc];
      a.acc[i * a.C + cc] = t;
    }
  }
}

template <int W>
LMOE_V8_INLINE void weighted_sum(const TileArgs& a) {
  for_row_blocks<kPvRows<W>>(a.m, [&]<int MR>(int64_t i) LMOE_LAMBDA_INLINE { pv_rows<W, MR>(a, i); });
}

// Weighted sum of bf16 key rows read in place (AVX512_BF16): acc[i, :C] = alpha[i] acc[i, :C] +
// sum_j p[j, i] kb[j, :C], the weights rounded to bf16 (to nearest even; as the CUDA tensor-core
// kernel does) and multiplied by the keys exactly in fp32 by bf16dp's outer-product tiles
// (gemm_kn: the weights as words of two keys, ars = 1; the keys' pairs of rows interleaved into
// panels as it goes). Sums in fp32 in key order, pairs at a time.
LMOE_CPU_AVX512BF16 void decode_weighted_sum_bf16(const TileArgs& a) {
  const int64_t pairs = (a.n + 1) / 2, ldw = a.mp;
  for (int64_t q = 0; q < pairs; ++q) {
    const float* s0 = a.p + 2 * q * a.mp;
    const float* s1 = 2 * q + 1 < a.n ? s0 + a.mp : nullptr;  // past the last key: 0
    uint32_t* d = a.pv_words + q * ldw;
    for (int64_t i = 0; i < a.m; ++i) {  // (c10::BFloat16: round to nearest even, NaN kept)
      const uint32_t lo = c10::BFloat16(s0[i]).x, hi = s1 != nullptr ? c10::BFloat16(s1[i]).x : 0;
      d[i] = lo | hi << 16;
    }
  }
  bf16dp::gemm_kn(a.pv_words, 1, ldw, reinterpret_cast<const c10::BFloat16*>(a.kb), a.ldkb, a.m, a.n, 0, a.C,
                  a.pv_panel, a.pv_res, [&](int64_t r, int64_t n0, const float* v, int64_t cnt) {
                    float* o = a.acc + r * a.C + n0;
                    const float al = a.alpha[r];
                    for (int64_t c = 0; c < cnt; ++c) o[c] = o[c] * al + v[c];
                  });
}

// Scores of bf16 queries and bf16 key rows read in place (AVX512_BF16, bf16dp's dot-product tiles:
// products exact in fp32, sums in fp32): p[j, i] = qb[i, :D] . kb[j, :D], queries 6 at a time
// against all the tile's keys. Unscaled: the softmax applies score_scale.
void decode_scores_bf16(const TileArgs& a) {
  for (int64_t i = 0; i < a.m; i += bf16dp::kNr) {
    const int64_t h = std::min<int64_t>(bf16dp::kNr, a.m - i);
    bf16dp::column_block(a.kb, a.ldkb, a.n, a.qb + i * a.D, nullptr, a.D, a.D, h, false, a.p + i, nullptr, a.mp,
                         nullptr, nullptr, 0, 0);
  }
}

// Each phase is a function of its own (noinline) for each instruction set: inlined into one
// function, the register allocator spilled loop offsets to vector registers and the op ran well
// below the micro-kernels' own rate. The softmax runs 8 lanes at a time even with AVX-512:
// GCC 12 turns 16-lane vector compares and selects into scalar code.
#define LMOE_DECODE_TILE(ISA, ATTR, W)                                                        \
  ATTR __attribute__((noinline)) void decode_scores_##ISA(const TileArgs& a) { scores<W>(a); } \
  ATTR __attribute__((noinline)) void decode_softmax_##ISA(const TileArgs& a) { softmax<8>(a); } \
  ATTR __attribute__((noinline)) void decode_weighted_sum_##ISA(const TileArgs& a) {            \
    weighted_sum<W>(a);                                                                        \
  }                                                                                            \
  void decode_tile_##ISA(const TileArgs& a) {                                                  \
    if (a.kb != nullptr) {                                                                     \
      decode_scores_bf16(a);                                                                   \
      decode_softmax_##ISA(a);                                                                 \
      decode_weighted_sum_bf16(a);                                                             \
      return;                                                                                  \
    }                                                                                          \
    decode_scores_##ISA(a);                                                                    \
    decode_softmax_##ISA(a);                                                                   \
    decode_weighted_sum_##ISA(a);                                                              \
  }

LMOE_DECODE_TILE(avx512, LMOE_CPU_AVX512, 16)
LMOE_DECODE_TILE(avx2, LMOE_CPU_AVX2, 8)
LMOE_DECODE_TILE(generic, , 8)
#undef LMOE_DECODE_TILE

// dst[0, n) = fp32 of src[0, n): 16-bit types with AVX2 (+F16C) where the CPU has it (c10::Half's
// scalar conversion is the slow part of an fp16 decode otherwise), other types by plain casts.
template <typename T>
void widen(const T* src, float* dst, int64_t n, bool avx2) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    if (avx2) {
      v8::widen_avx2<T>(src, dst, n);
      return;
    }
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(src[c]);
}

// Per-thread scratch of the work items, 64-byte aligned (the kernels' vector loads of q and of the
// weights would otherwise straddle cache lines), not zeroed: every entry is written before it is
// read. `tile` (a widened copy of the keys) only where the cache is not read in place.
class ItemScratch {
 public:
  ItemScratch(int64_t D, bool need_tile)
      : mem_(static_cast<float*>(std::aligned_alloc(64, bytes(D, need_tile))), &std::free) {
    TORCH_CHECK(mem_ != nullptr, "latentmoe.mla_decode: out of memory for the per-thread scratch");
    float* f = mem_.get();
    q = f;
    p = q + D * kRowGroup;
    alpha = p + kTile * kRowGroup;
    m_run = alpha + kRowGroup;
    l_run = m_run + kRowGroup;
    lo = reinterpret_cast<int32_t*>(l_run + kRowGroup);
    hi = lo + kRowGroup;
    qb = reinterpret_cast<uint16_t*>(hi + kRowGroup);
    qt = reinterpret_cast<float*>(qb + D * kRowGroup);  // (64-byte aligned)
    tile = need_tile ? qt + D * kRowGroup : nullptr;
  }
  float *q, *p, *alpha, *m_run, *l_run, *qt, *tile;
  int32_t *lo, *hi;
  uint16_t* qb;

 private:
  static size_t bytes(int64_t D, bool need_tile) {
    // The tile: a widened copy of kTile keys, or the bf16 weighted sum's scratch (weights as key
    // pairs, gemm_kn's panel and sums), whichever is larger.
    const int64_t pv = (kTile + 1) / 2 * kRowGroup + bf16dp::kKnPanelWords + kRowGroup * bf16dp::kNp;
    const int64_t floats = (2 * D + kTile + 5) * kRowGroup + D * kRowGroup / 2 + (need_tile ? std::max(kTile * D, pv) : 0);
    return (static_cast<size_t>(floats) * 4 + 63) / 64 * 64;  // aligned_alloc: a multiple of 64
  }
  std::unique_ptr<float, decltype(&std::free)> mem_;
};

// Whether the tiles are the cache's own rows (fp32, fused c_kv | k_pe rows, contiguous or in pages
// of at least a quarter tile); otherwise keys are widened/gathered into the scratch tile.
template <typename T>
bool keys_in_place(const DecodeParams& p) {
  return std::is_same_v<T, float> && !p.split && (p.block_table == nullptr || p.page_size >= kTile / 4);
}


// One work item: rows [r0, r1) of batch b (row r = s * H + h), keys of split `sp`. Writes the
// unnormalised accumulators and (m, l) of each row to the partial buffers. Keys go in tiles of
// up to kTile rows: fp32 rows of a contiguous or page-contiguous cache are used in place; other
// dtypes and small pages are first gathered/converted into `tile`. Every key of a tile lies below
// the row's seqlen (valid data), so zero weights of keys a query does not see never meet NaN.
template <typename T>
void decode_item(const DecodeParams& p, const T* q_latent, const T* q_pe, const T* cache, const T* pe_src, int64_t b,
                 int64_t r0, int64_t r1, int64_t sp, float* acc_out, float* m_out, float* l_out, ItemScratch& w) {
  const int64_t D = p.D, C = p.C, R = p.R, H = p.H;
  const int64_t nrows = r1 - r0;
  const int64_t mp = (nrows + 7) / 8 * 8;
  const int64_t seqlen = p.seqlens[b];
  // The group's queries [q_latent | q_pe][row r0 + i]: fp32 times scale, or for bf16 scores (T is
  // c10::BFloat16 then) their own bits, not scaled (copy_n, not memcpy: q_pe of an R = 0 call has
  // no data pointer).
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t qoff = b * p.Sq * H + r0 + i;
    const T* ql = q_latent + qoff * C;
    const T* qp = q_pe + qoff * R;
    if (p.bf16_scores) {
      std::copy_n(reinterpret_cast<const uint16_t*>(ql), C, w.qb + i * D);
      std::copy_n(reinterpret_cast<const uint16_t*>(qp), R, w.qb + i * D + C);
      continue;
    }
    float* qi = w.q + i * D;
    for (int64_t c = 0; c < C; ++c) qi[c] = static_cast<float>(ql[c]) * p.scale;
    for (int64_t c = 0; c < R; ++c) qi[C + c] = static_cast<float>(qp[c]) * p.scale;
  }
  // The AVX-512 scores take whole groups of 16 fp32 rows transposed.
  const int64_t qt_rows = p.outer_scores && !p.bf16_scores ? nrows / 16 * 16 : 0;
  for (int64_t g = 0; g < qt_rows; g += 16)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t l = 0; l < 16; ++l) w.qt[(g * D + d * 16) + l] = w.q[(g + l) * D + d];
  int64_t lo_all = seqlen, hi_all = 0;
  for (int64_t i = 0; i < mp; ++i) {
    mla::KeyRange kr{0, 0};
    if (i < nrows) kr = mla::visible_keys(seqlen, p.Sq, (r0 + i) / H, p.causal, p.window);
    w.lo[i] = static_cast<int32_t>(kr.lo);
    w.hi[i] = static_cast<int32_t>(kr.hi);
    if (kr.hi > kr.lo) {
      lo_all = std::min(lo_all, kr.lo);
      hi_all = std::max(hi_all, kr.hi);
    }
    w.m_run[i] = -INFINITY;
    w.l_run[i] = 0.f;
  }
  const int64_t k_begin = std::max(lo_all, sp * p.split_len);
  const int64_t k_end = std::min(hi_all, (sp + 1) * p.split_len);
  for (int64_t i = 0; i < nrows * C; ++i) acc_out[i] = 0.f;
  const bool in_place = keys_in_place<T>(p);
  const bool direct = in_place || p.bf16_scores;  // the kernels read the cache's fused rows themselves
  // Tiles: up to kTile keys, within one page where the rows are read directly from pages.
  const auto tile_end = [&](int64_t t0) {
    int64_t t1 = std::min(k_end, t0 + kTile);
    if (direct && p.block_table != nullptr) t1 = std::min(t1, (t0 / p.page_size + 1) * p.page_size);
    return t1;
  };
  const auto row_of = [&](int64_t t) {  // the cache row of token t (its c_kv part for split rows)
    return cache + mla::cache_row(p.block_table, p.max_pages, p.page_size, p.lmax, p.num_pages, b, t) * p.kv_stride;
  };
  TileArgs a{};
  a.m = nrows;
  a.mp = mp;
  a.D = D;
  a.C = C;
  a.q = w.q;
  a.qt = w.qt;
  a.qt_rows = qt_rows;
  a.qb = w.qb;
  a.ldkb = D;
  a.score_scale = p.bf16_scores ? p.scale : 1.f;
  a.ldk = D;
  a.lo = w.lo;
  a.hi = w.hi;
  a.p = w.p;
  a.alpha = w.alpha;
  a.acc = acc_out;
  a.m_run = w.m_run;
  a.l_run = w.l_run;
  if (p.bf16_scores) {  // the tile scratch holds the bf16 weighted sum's weights, panel and sums
    a.pv_words = reinterpret_cast<uint32_t*>(w.tile);
    a.pv_panel = a.pv_words + (kTile + 1) / 2 * kRowGroup;
    a.pv_res = reinterpret_cast<float*>(a.pv_panel + bf16dp::kKnPanelWords);
  }
  for (int64_t t0 = k_begin; t0 < k_end;) {
    const int64_t t1 = tile_end(t0);
    // The next tile's rows come from memory while this one computes (the cache of a long context
    // is not in the caches once a decode step's weights have streamed past): prefetched where
    // they are fused rows (D values, all addressed) evenly spaced: read in place, or any rows of a
    // contiguous cache.
    a.next = nullptr;
    if (t1 < k_end && !p.split && (direct || p.block_table == nullptr)) {
      a.next = reinterpret_cast<const char*>(row_of(t1));
      a.next_ld = p.kv_stride * static_cast<int64_t>(sizeof(T));
      a.next_elt = sizeof(T);
      a.n_next = tile_end(t1) - t1;
    }
    if (in_place) {
      a.k = reinterpret_cast<const float*>(row_of(t0));
    } else if (p.bf16_scores) {
      // Scores and the weighted sum from the bf16 rows in place.
      a.kb = reinterpret_cast<const uint16_t*>(row_of(t0));
    } else {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = mla::cache_row(p.block_table, p.max_pages, p.page_size, p.lmax, p.num_pages, b, t);
        float* dst = w.tile + (t - t0) * D;
        widen(cache + row * p.kv_stride, dst, C, p.avx2);
        widen(pe_src + row * p.pe_stride, dst + C, R, p.avx2);
      }
      a.k = w.tile;
    }
    a.n = t1 - t0;
    a.t0 = t0;
    p.tile_fn(a);
    t0 = t1;
  }
  for (int64_t i = 0; i < nrows; ++i) {
    m_out[i] = w.m_run[i];
    l_out[i] = w.l_run[i];
  }
}

template <typename T>
void mla_decode_impl(const DecodeParams& p, const T* q_latent, const T* q_pe, const T* cache, const T* pe_src,
                     T* out, float* lse) {
  const int64_t rows = p.Sq * p.H;
  // Partials: [B, n_splits, rows, C] accumulators and [B, n_splits, rows] (m, l).
  // (Uninitialised: each item writes its own rows; at::empty is 64-byte aligned.)
  const at::Tensor partials = at::empty({p.B * p.n_splits * rows * (p.C + 2)}, at::kFloat);
  float* acc = partials.mutable_data_ptr<float>();
  float* ms = acc + p.B * p.n_splits * rows * p.C;
  float* ls = ms + p.B * p.n_splits * rows;
  const int64_t n_items = p.B * p.n_groups * p.n_splits;
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    ItemScratch scratch(p.D, !keys_in_place<T>(p));
    for (int64_t it = begin; it < end; ++it) {
      const int64_t sp = it % p.n_splits;
      const int64_t g = (it / p.n_splits) % p.n_groups;
      const int64_t b = it / (p.n_splits * p.n_groups);
      const int64_t r0 = g * kRowGroup, r1 = std::min(rows, r0 + kRowGroup);
      const int64_t base = (b * p.n_splits + sp) * rows + r0;
      decode_item<T>(p, q_latent, q_pe, cache, pe_src, b, r0, r1, sp, acc + base * p.C, ms + base, ls + base,
                     scratch);
    }
  });
  // Merge the splits of each (b, row) by LSE, normalise, write out and lse.
  at::parallel_for(0, p.B * rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> o(p.C);
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / rows, r = br % rows;
      float m_max = -INFINITY;
      for (int64_t sp = 0; sp < p.n_splits; ++sp) {
        const int64_t i = (b * p.n_splits + sp) * rows + r;
        if (ls[i] > 0.f) m_max = std::max(m_max, ms[i]);
      }
      std::fill(o.begin(), o.end(), 0.f);
      float l_sum = 0.f;
      for (int64_t sp = 0; sp < p.n_splits; ++sp) {
        const int64_t i = (b * p.n_splits + sp) * rows + r;
        const float w = mla::merge_weight(ms[i], ls[i], m_max);
        if (w == 0.f) continue;
        l_sum += w * ls[i];
        const float* a = acc + i * p.C;
#pragma omp simd
        for (int64_t c = 0; c < p.C; ++c) o[c] += w * a[c];
      }
      const float inv = math::softmax_inv_sum(l_sum);
      T* dst = out + br * p.C;
      for (int64_t c = 0; c < p.C; ++c) dst[c] = static_cast<T>(o[c] * inv);
      lse[br] = math::softmax_lse({m_max, l_sum});
    }
  });
}

// The cache arguments of a decode call, checked (shapes, dtypes, devices, scalars, then the values
// on the host) for queries of B rows, C latent and R rope columns in ref's dtype, with private
// copies of the lengths and table (checked and read: the same values).
struct CheckedCache {
  mla::CacheDims d;
  at::Tensor seqlens;
  c10::optional<at::Tensor> block_table;
  int64_t max_len = 0;  // the longest cache_seqlens entry
};

CheckedCache check_decode_cache(const char* op, const at::Tensor& kv_cache, const at::Tensor& cache_seqlens,
                                const c10::optional<at::Tensor>& block_table, int64_t B, int64_t C, int64_t R,
                                const at::Tensor& ref, const char* ref_name, const c10::optional<at::Tensor>& pe_cache,
                                double softmax_scale, int64_t window, int64_t max_seqlen) {
  CheckedCache c;
  c.d = mla::check_cache(op, kv_cache, cache_seqlens, block_table, B, C, R, ref, ref_name, pe_cache);
  c.seqlens = chk::private_copy(cache_seqlens);
  c.block_table = chk::private_copy(block_table);
  mla::check_decode_scalars(softmax_scale, window, op);
  // The CPU always checks the values (no device sync to save); a given max_seqlen must bound them.
  mla::check_max_seqlen(op, max_seqlen, c.d);
  c.max_len = mla::check_cache_values(op, c.d, c.seqlens, c.block_table, 0);
  TORCH_CHECK_VALUE(max_seqlen < 0 || c.max_len <= max_seqlen, "latentmoe.", op, ": argument 'max_seqlen' (",
                    max_seqlen, ") is below the longest cache_seqlens entry ", c.max_len);
  return c;
}

// mla_decode's computation on checked arguments: (out [B, Sq, H, C] in q_latent's dtype, lse).
std::tuple<at::Tensor, at::Tensor> decode_checked(const at::Tensor& q_latent, const at::Tensor& q_pe,
                                                  const at::Tensor& kv_cache, const CheckedCache& c,
                                                  double softmax_scale, bool causal, int64_t window,
                                                  const c10::optional<at::Tensor>& pe_cache) {
  const mla::CacheDims& d = c.d;
  const int64_t B = q_latent.size(0), Sq = q_latent.size(1), H = q_latent.size(2);
  const int64_t C = q_latent.size(3), R = q_pe.size(3);
  auto out = at::empty_like(q_latent);
  auto lse = at::empty({B, Sq, H}, q_latent.options().dtype(at::kFloat));
  const int32_t* lens = c.seqlens.const_data_ptr<int32_t>();
  const int64_t rows = Sq * H;
  DecodeParams p{};
  p.B = B; p.Sq = Sq; p.H = H; p.C = C; p.R = R; p.D = C + R;
  p.lmax = d.lmax; p.page_size = d.page_size; p.max_pages = d.max_pages; p.num_pages = d.num_pages;
  p.kv_stride = d.kv_stride; p.pe_stride = d.pe_stride; p.split = d.split;
  p.block_table = d.paged ? c.block_table->const_data_ptr<int32_t>() : nullptr;
  p.seqlens = lens;
  p.scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.window = window;
  p.n_groups = (rows + kRowGroup - 1) / kRowGroup;
  p.avx2 = v8::use_avx2();
  // bf16 fused rows, contiguous or in pages of at least a quarter tile, on AVX512_BF16 CPUs.
  p.bf16_scores = q_latent.scalar_type() == at::kBFloat16 && !d.split &&
                  (!d.paged || d.page_size >= kTile / 4) && bf16dp::cpu_supported();
  const bool avx512 = p.avx2 && v8::use_avx512();
  p.tile_fn = avx512 ? &decode_tile_avx512 : p.avx2 ? &decode_tile_avx2 : &decode_tile_generic;
  p.outer_scores = avx512;
  // Enough items for every thread; each split keeps at least kMinSplit keys.
  const int64_t want = (2 * at::get_num_threads() + B * p.n_groups - 1) / (B * p.n_groups);
  p.n_splits = std::max<int64_t>(1, std::min<int64_t>(want, (c.max_len + kMinSplit - 1) / kMinSplit));
  p.split_len = std::max<int64_t>(1, (c.max_len + p.n_splits - 1) / p.n_splits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_latent.scalar_type(), "mla_decode_cpu", [&] {
    const scalar_t* kv = kv_cache.const_data_ptr<scalar_t>();
    const scalar_t* pe = d.split ? pe_cache->const_data_ptr<scalar_t>() : kv + C;
    mla_decode_impl<scalar_t>(p, q_latent.const_data_ptr<scalar_t>(), q_pe.const_data_ptr<scalar_t>(), kv, pe,
                              out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cpu(const at::Tensor& q_latent, const at::Tensor& q_pe,
                                                  const at::Tensor& kv_cache, const at::Tensor& cache_seqlens,
                                                  const c10::optional<at::Tensor>& block_table,
                                                  double softmax_scale, bool causal, int64_t window,
                                                  const c10::optional<at::Tensor>& pe_cache, int64_t max_seqlen) {
  const char* op = "mla_decode";
  mla::check_decode_queries(op, q_latent, q_pe);
  const CheckedCache c = check_decode_cache(op, kv_cache, cache_seqlens, block_table, q_latent.size(0),
                                            q_latent.size(3), q_pe.size(3), q_latent, "q_latent", pe_cache,
                                            softmax_scale, window, max_seqlen);
  return decode_checked(q_latent, q_pe, kv_cache, c, softmax_scale, causal, window, pe_cache);
}

// ---- mla_decode_absorbed ------------------------------------------------------------------------
// A decode step's attention from the per-head queries as the q projection gives them, in one call:
// q_pe rotated (HF RoPE), q_latent = q_nope @ W_UK per head (bmm_small's kernel), mla_decode on
// the cache, then out = o_latent @ W_UV^T per head, W_UK / W_UV read in place from kv_b_weight.
// The same steps as the module's separate ops (mla_decode between two bmm_small calls), without
// their per-op dispatch and the Python between them.

// q_pe [B, S, H, R] = RoPE(q[..., N:]) with cos / sin rows [B or 1, S, R]: fp32, rounded once.
template <typename T>
void rotate_queries(const T* q, const T* cos, const T* sin, bool cs_batch, const mla::AbsorbedDims& a,
                    bool interleave, T* out) {
  const int64_t R = a.R, half = R / 2, D = a.N + R;
  std::vector<float> x(R), cs(R), sn(R), o(R);
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t s = 0; s < a.S; ++s) {
      const int64_t crow = ((cs_batch ? b : 0) * a.S + s) * R;
      for (int64_t i = 0; i < R; ++i) {
        cs[i] = static_cast<float>(cos[crow + i]);
        sn[i] = static_cast<float>(sin[crow + i]);
      }
      for (int64_t h = 0; h < a.H; ++h) {
        const int64_t row = (b * a.S + s) * a.H + h;
        for (int64_t i = 0; i < R; ++i) x[i] = static_cast<float>(q[row * D + a.N + i]);
        for (int64_t i = 0; i < half; ++i) mla::rope_pair(x.data(), cs.data(), sn.data(), half, i, interleave, o.data());
        for (int64_t i = 0; i < R; ++i) out[row * R + i] = static_cast<T>(o[i]);
      }
    }
  }
}

at::Tensor mla_decode_absorbed_cpu(const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin,
                                   const at::Tensor& kv_b_weight, const at::Tensor& kv_cache,
                                   const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
                                   double softmax_scale, int64_t nope_dim, bool rope_interleave, bool causal,
                                   int64_t window, const c10::optional<at::Tensor>& pe_cache, int64_t max_seqlen) {
  const char* op = "mla_decode_absorbed";
  const mla::AbsorbedDims a = mla::check_absorbed_args(op, q, cos, sin, kv_b_weight, nope_dim, linear::kMaxRows);
  const CheckedCache c = check_decode_cache(op, kv_cache, cache_seqlens, block_table, a.B, a.C, a.R, q, "q",
                                            pe_cache, softmax_scale, window, max_seqlen);
  const int64_t B = a.B, S = a.S, H = a.H, N = a.N, C = a.C, V = a.V;
  at::Tensor q_pe = at::empty({B, S, H, a.R}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mla_decode_absorbed_rope", [&] {
    rotate_queries<scalar_t>(q.const_data_ptr<scalar_t>(), cos.const_data_ptr<scalar_t>(),
                             sin.const_data_ptr<scalar_t>(), cos.size(0) == B && B > 1, a, rope_interleave,
                             q_pe.mutable_data_ptr<scalar_t>());
  });
  const at::Tensor w = kv_b_weight.view({H, N + V, C});
  // [H, B*S, N] @ W_UK [H, N, C] (rows of C adjacent) -> q_latent [B, S, H, C]
  const at::Tensor q_heads = q.narrow(3, 0, N).permute({2, 0, 1, 3}).reshape({H, B * S, N}).contiguous();
  const at::Tensor q_latent =
      bmm_small_cpu(q_heads, w.narrow(1, 0, N)).view({H, B, S, C}).permute({1, 2, 0, 3}).contiguous();
  const auto o_latent = std::get<0>(decode_checked(q_latent, q_pe, kv_cache, c, softmax_scale, causal, window, pe_cache));
  // [H, B*S, C] @ W_UV^T [H, C, V] (a transposed view: rows of C adjacent) -> [B, S, H, V]
  const at::Tensor o_heads = o_latent.view({B * S, H, C}).transpose(0, 1).contiguous();
  // (into a fresh [B, S, H, V]: contiguous() keeps an empty tensor's permuted strides)
  at::Tensor out = at::empty({B, S, H, V}, q.options());
  out.copy_(bmm_small_cpu(o_heads, w.narrow(1, N, V).transpose(1, 2)).view({H, B, S, V}).permute({1, 2, 0, 3}));
  return out;
}

// ---- mla_append_cache -------------------------------------------------------------------------

// latent / pe: token (b, s)'s row at b * sb + s * ss elements (unit-stride rows; e.g. the two
// slices of kv_a_proj_with_mqa's output, read in place); cos / sin contiguous [B, S, R].
struct AppendRows {
  int64_t latent_sb, latent_ss, pe_sb, pe_ss;
};

template <typename T>
void append_impl(T* cache, const T* latent, const T* pe, const T* w, const T* cos, const T* sin,
                 const int32_t* lens, const int32_t* table, const mla::CacheDims& d, int64_t S, float eps,
                 bool interleave, const AppendRows& rows) {
  const int64_t C = d.C, R = d.R, half = R / 2;
  at::parallel_for(0, d.B * S, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> x(R), cs(R), sn(R), o(R);
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / S, s = bs % S;
      T* dst = cache + mla::cache_row(table, d.max_pages, d.page_size, d.lmax, d.num_pages, b, lens[b] + s) * d.D;
      const T* lr = latent + b * rows.latent_sb + s * rows.latent_ss;
      const T* pr = pe + b * rows.pe_sb + s * rows.pe_ss;
      float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t c = 0; c < C; ++c) {
        const float v = static_cast<float>(lr[c]);
        sum_sq += v * v;
      }
      const float rstd = math::rms_rstd(sum_sq, static_cast<int>(C), eps);
      for (int64_t c = 0; c < C; ++c) {
        // HF numerics: round x * rstd to the dtype, then scale by the weight.
        const float y = static_cast<float>(static_cast<T>(static_cast<float>(lr[c]) * rstd));
        dst[c] = static_cast<T>(y * static_cast<float>(w[c]));
      }
      for (int64_t i = 0; i < R; ++i) {
        x[i] = static_cast<float>(pr[i]);
        cs[i] = static_cast<float>(cos[bs * R + i]);
        sn[i] = static_cast<float>(sin[bs * R + i]);
      }
      for (int64_t i = 0; i < half; ++i) mla::rope_pair(x.data(), cs.data(), sn.data(), half, i, interleave, o.data());
      for (int64_t i = 0; i < R; ++i) dst[C + i] = static_cast<T>(o[i]);
    }
  });
}

void mla_append_cache_cpu(at::Tensor& kv_cache, const at::Tensor& kv_latent, const at::Tensor& k_pe,
                          const at::Tensor& norm_weight, double eps, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& cache_seqlens_in, const c10::optional<at::Tensor>& block_table_in,
                          bool rope_interleave, bool check_values) {
  const char* op = "mla_append_cache";
  mla::check_append_args(op, kv_latent, k_pe, norm_weight, cos, sin, eps);
  const int64_t B = kv_latent.size(0), S = kv_latent.size(1);
  auto d = mla::check_cache(op, kv_cache, cache_seqlens_in, block_table_in, B, kv_latent.size(2), k_pe.size(2),
                            kv_latent, "kv_latent");
  const at::Tensor cache_seqlens = chk::private_copy(cache_seqlens_in);  // checked and read: the same values
  const c10::optional<at::Tensor> block_table = chk::private_copy(block_table_in);
  (void)check_values;  // the CPU always checks the values: it costs no device sync here
  mla::check_cache_values(op, d, cache_seqlens, block_table, S);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_latent.scalar_type(), "mla_append_cache_cpu", [&] {
    append_impl<scalar_t>(kv_cache.mutable_data_ptr<scalar_t>(), kv_latent.const_data_ptr<scalar_t>(),
                          k_pe.const_data_ptr<scalar_t>(), norm_weight.const_data_ptr<scalar_t>(),
                          cos.const_data_ptr<scalar_t>(), sin.const_data_ptr<scalar_t>(),
                          cache_seqlens.const_data_ptr<int32_t>(),
                          d.paged ? block_table->const_data_ptr<int32_t>() : nullptr, d, S,
                          static_cast<float>(eps), rope_interleave,
                          AppendRows{kv_latent.stride(0), kv_latent.stride(1), k_pe.stride(0), k_pe.stride(1)});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CPU, m) {
  m.impl("mla_decode", &mla_decode_cpu);
  m.impl("mla_decode_absorbed", &mla_decode_absorbed_cpu);
  m.impl("mla_append_cache", &mla_append_cache_cpu);
}

}  // namespace latentmoe::cpu
