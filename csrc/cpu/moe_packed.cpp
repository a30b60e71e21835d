// Prepacked MoE experts (bf16, fp32) for inference on the CPU: moe_pack_weight (HF layout ->
// panels) and moe_experts_packed (the routed SwiGLU experts on those panels).
//
// Why a second layout: HF's [out, in] weight rows make each vdpbf16ps a dot product of 32 k of
// one token row with 32 k of one weight row, summed across lanes at the end (cpu/gemm_bf16.h),
// which runs at ~75% of the core's vdpbf16ps peak on a Zen 4. With the weights packed once into
// panels of 64 output columns whose k pairs are interleaved (packed[q][c] = w[c][2q] | w[c][2q+1]
// << 16), a vdpbf16ps multiplies one broadcast pair of a token row with 16 columns at once (outer
// product, no lane sums): a 6 x 64 register tile (24 accumulators, 4 panel loads and 6 broadcasts
// per 24 vdpbf16ps) runs at the peak in cache. Packing on the fly costs a 32-bit transpose of
// every weight per call, as much as ~15% of the GEMM at the ~50 rows per expert of a 512-token
// call (measured), so the panels are made once (moe_pack_weight) and kept.
//
// Layout: panels of 64 output columns. Which weight row a column holds:
//   down_proj [E, H, I] (gate_up = false): P = ceil(H / 64), column c of panel p is row 64p + c;
//   gate_up_proj [E, 2I, H] (gate_up = true): P = ceil(I / 32), columns 0-31 of panel p are the
//   gate rows 32p + c and columns 32-63 the matching up rows I + 32p + c, so a tile's epilogue
//   has a column's gate and up sums together (never a [rows, 2I] buffer);
// columns past the last row are 0. bf16: [E, P, Kp, 64, 2], Kp = ceil(K / 2), element
// [e, p, q, c, j] = w[e, row, 2q + j] (0 for 2q + j >= K). fp32: [E, P, K, 64], element
// [e, p, k, c] = w[e, row, k] (the fp32 GEMMs of the HF-layout op transpose a 16-column panel of
// each expert's weights per call, ~20% of their time at ~50 rows; a 6 x 64 tile of 16-lane FMAs
// on these panels (6 x 16 of 8-lane ones without AVX-512) reads them in place).
//
// The op: gather each expert's token rows (bf16 ones as 32-bit pairs), then work items (expert,
// panel) for gate_up + SwiGLU -> act, then (expert, panel) for down -> y, each phase split across
// the threads in contiguous ranges of about equal cost (rows + a panel's streaming), then the
// weighted combine in k order (cpu/moe_common.h). Sums run in a fixed order (k pairs in order per
// column): bitwise the same run to run and at any thread count. CPUs without AVX512_BF16 (or
// LATENTMOE_CPU_ISA=avx2 / generic) run fp32 arithmetic on the same bf16 panels, not bitwise
// equal to vdpbf16ps's: an AVX2 + FMA kernel where the CPU has AVX2 (else portable code, the same
// sums in the same order: bitwise equal to it); fp32 panels have AVX-512, AVX2 and portable
// instantiations of one kernel (the same sums in the same order: the two FMA ones bitwise equal,
// the portable one, without FMA, rounding each product).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "cpu/gemm_bf16.h"
#include "cpu/gemm_f32.h"
#include "cpu/huge_pages.h"
#include "cpu/moe_common.h"
#include "cpu/vec8.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace latentmoe::cpu {
namespace {

namespace chk = latentmoe::checks;

constexpr int64_t kCols = 64;      // output columns per panel: 4 vectors of 16 fp32
constexpr int64_t kGateCols = 32;  // gate_up panels: 32 gate columns, then the 32 matching up ones
constexpr int kTileRows = 6;       // token rows per register tile (6 x 4 = 24 accumulators)
// ... for bf16 panels without AVX512_BF16 (tile_bf16_avx2: 10 accumulators, each taking two
// dependent FMAs per k pair; at 4 rows their latency held a Zen 3 core to 50 GFLOP/s at 192 rows
// per expert, at 5 rows 70)
constexpr int kTileRowsAvx2 = 5;
// Items of more rows than this widen their bf16 panel once (widen_panel_avx2) on CPUs without
// AVX512_BF16. On 2 Zen 1 cores (bf16, h1024 / i704, E = 64, top-6, alternated): at 512 tokens
// (~48 rows per expert) 0.97-1.07x the fp32 dense floor against 1.15-1.17x, at 256 (~24 rows)
// 1.06-1.10x against 1.13-1.16x; at 64-128 tokens (6-12 rows) widening every panel was slower
// (1.3-2.0x against 1.15-1.4x), the widened copy costing more than the tiles saved. So
// bench_moe's packed E = 256 / E = 16 ratio (bf16, 512 tokens) rose there from 1.05 to 1.21:
// E = 16's ~192-row items gained ~15%, E = 256's ~12-row ones run as before (thresholds of 4 and
// 8 rows did not speed them up). Nor did widening those items' panels in L1-sized blocks along k
// (16-64 pairs, 8-32 KiB) with the fp32 tiles carrying their sums across the blocks: E = 256
// took 178-190 ms against 172-175 (h1024 / i512, alternated), Zen 1's one store per cycle
// making the widened copy cost more than the pair splits it saved.
constexpr int64_t kWidenPanelRows = 16;
// A work item's cost in rows for the split across threads: its rows plus about this much for
// streaming its panel from memory (a decode step's items have one row each).
constexpr int64_t kPanelCost = 4;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t panels_of(int64_t N, bool gate_up) { return gate_up ? cdiv(N / 2, kGateCols) : cdiv(N, kCols); }

// The weight row behind column c of panel p (N rows in all), or -1 for a zero column.
inline int64_t source_row(int64_t p, int64_t c, int64_t N, bool gate_up) {
  if (!gate_up) {
    const int64_t n = p * kCols + c;
    return n < N ? n : -1;
  }
  const int64_t I = N / 2, j = p * kGateCols + c % kGateCols;
  if (j >= I) return -1;
  return c < kGateCols ? j : I + j;
}

// The packed weights ask for transparent huge pages (cpu/huge_pages.h) whatever their size: the
// experts' panels are streamed from memory once per call, and with 4 KiB pages the TLB misses of
// that stream cost time (bf16, 512 tokens, 2-core Zen 4: E = 256 of h512 / i256 8.5 vs 9.5 ms,
// h1024 / i704 / E = 64 33.8 vs 35.3 ms, measured with PyTorch's THP_MEM_ALLOC_ENABLE=1, which
// does the same for every large tensor).

// Panels of words W (a bf16 pair, or an fp32 value): panel (e, p)'s word (q, c) = word(e, r, q)
// for the weight row r behind column c, 0 for columns past the end; Kw words per row.
template <typename W, typename Word>
void pack_panels(int64_t E, int64_t N, int64_t Kw, bool gate_up, W* dst, const Word& word) {
  const int64_t P = panels_of(N, gate_up);
  at::parallel_for(0, E * P, 1, [&](int64_t b, int64_t end) {
    for (int64_t ep = b; ep < end; ++ep) {
      const int64_t e = ep / P, p = ep % P;
      W* panel = dst + ep * Kw * kCols;
      for (int64_t c = 0; c < kCols; ++c) {
        const int64_t r = source_row(p, c, N, gate_up);
        for (int64_t q = 0; q < Kw; ++q) panel[q * kCols + c] = r < 0 ? W{} : word(e, r, q);
      }
    }
  });
}

at::Tensor moe_pack_weight_cpu(const at::Tensor& weight, bool gate_up) {
  const char* op = "moe_pack_weight";
  chk::dim(op, "weight", weight, 3);
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kFloat,
                    "latentmoe.moe_pack_weight: argument 'weight' must be bfloat16 or float32, got ",
                    weight.scalar_type());
  const int64_t E = weight.size(0), N = weight.size(1), K = weight.size(2);
  TORCH_CHECK_VALUE(E > 0 && N > 0 && K > 0, "latentmoe.moe_pack_weight: argument 'weight' is empty (shape ",
                    weight.sizes(), ")");
  TORCH_CHECK_VALUE(!gate_up || N % 2 == 0, "latentmoe.moe_pack_weight: argument 'weight' must be gate_up_proj ",
                    "[E, 2 * intermediate, hidden] (dim 1 even) when gate_up is true, got shape ", weight.sizes());
  const int64_t P = panels_of(N, gate_up), Kp = cdiv(K, 2);
  const at::Tensor w = weight.contiguous();
  if (w.scalar_type() == at::kFloat) {
    at::Tensor out = at::empty({E, P, K, kCols}, w.options());
    advise_huge_pages(out.mutable_data_ptr(), out.nbytes());
    const float* src = w.const_data_ptr<float>();
    pack_panels(E, N, K, gate_up, out.mutable_data_ptr<float>(),
                [&](int64_t e, int64_t r, int64_t k) { return src[(e * N + r) * K + k]; });
    return out;
  }
  at::Tensor out = at::empty({E, P, Kp, kCols, 2}, w.options());
  advise_huge_pages(out.mutable_data_ptr(), out.nbytes());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.const_data_ptr<c10::BFloat16>());
  pack_panels(E, N, Kp, gate_up, reinterpret_cast<uint32_t*>(out.mutable_data_ptr<c10::BFloat16>()),
              [&](int64_t e, int64_t r, int64_t q) {
                const uint16_t* pair = src + (e * N + r) * K + 2 * q;
                if (2 * q + 1 == K) return static_cast<uint32_t>(pair[0]);  // the odd K's last: (x, 0)
                uint32_t v;
                std::memcpy(&v, pair, 4);
                return v;
              });
  return out;
}

inline float bf16_lo(uint32_t w) {
  const uint32_t u = w << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float bf16_hi(uint32_t w) {
  const uint32_t u = w & 0xFFFF0000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// tile's sums for CPUs without AVX512_BF16, portable code: per pair, the product of its low
// halves is added to the accumulator, then the product of its high halves, in fp32. A product of
// two bf16 values is exact in fp32 (8-bit significands), so with or without FMA each step rounds
// once, the same way: bitwise equal to tile_bf16_avx2's FMAs (except where a product underflows
// fp32's normal range, where a separate multiply rounds it first).
void tile_generic(const uint32_t* a, int64_t lda, int mr, const uint32_t* panel, int64_t Kp, float* res) {
  for (int i = 0; i < mr; ++i) {
    float acc[kCols] = {};
    for (int64_t q = 0; q < Kp; ++q) {
      const float x0 = bf16_lo(a[i * lda + q]), x1 = bf16_hi(a[i * lda + q]);
      const uint32_t* bq = panel + q * kCols;
      for (int64_t c = 0; c < kCols; ++c) {
        acc[c] += x0 * bf16_lo(bq[c]);
        acc[c] += x1 * bf16_hi(bq[c]);
      }
    }
    std::memcpy(res + i * kCols, acc, sizeof(acc));
  }
}

// tile_generic's sums with AVX2 + FMA (CPUs without AVX512_BF16, such as Zen 3), MR (<= 5) rows:
// NV vectors of 8 columns per pass over the panel (64 columns at one row, 32 at two, 16 at more:
// 8-10 accumulators; a pass of 16 columns at one row read a quarter of each 256-byte panel
// row and left a decode step's panels streaming at a fraction of the memory's rate). The pair
// words of 8 columns split into their even (w << 16) and odd (w & 0xFFFF0000) fp32 values; the
// rows of a come widened to fp32 (row i's element k at a[i * lda + k], 0 at k = K for an odd K),
// broadcast from memory (splitting a pair word per row per k pair took as many vector integer
// operations as the weights' split and slowed a 512-token call ~20%). n_pf lines from pf are
// prefetched to L2 during the first pass.
template <int MR>
LMOE_CPU_AVX2 void tile_bf16_avx2(const float* a, int64_t lda, const uint32_t* panel, int64_t Kp, float* res,
                                  const char* pf, int64_t n_pf) {
  constexpr int NV = MR == 1 ? 8 : MR == 2 ? 4 : 2;
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t c0 = 0; c0 < kCols; c0 += 8 * NV) {
    __m256 acc[MR][NV];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
    int64_t credit = 0;
    const uint32_t* bq = panel + c0;
    for (int64_t q = 0; q < Kp; ++q, bq += kCols) {
      if (c0 == 0)
        for (credit += n_pf; credit >= Kp; credit -= Kp, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
      if constexpr (NV == 2) {  // 3-5 rows: both weight vectors split first, a row split at a time
        __m256 e[2], o[2];
#pragma GCC unroll 2
        for (int v = 0; v < 2; ++v) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bq + 8 * v));
          e[v] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
          o[v] = _mm256_castsi256_ps(_mm256_and_si256(w, hi));
        }
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          __m256 x0, x1;
          x0 = _mm256_broadcast_ss(a + i * lda + 2 * q), x1 = _mm256_broadcast_ss(a + i * lda + 2 * q + 1);
#pragma GCC unroll 2
          for (int v = 0; v < 2; ++v) acc[i][v] = _mm256_fmadd_ps(x1, o[v], _mm256_fmadd_ps(x0, e[v], acc[i][v]));
        }
      } else {  // 1-2 rows: the rows split first, a weight vector split at a time
        __m256 x0[MR], x1[MR];
#pragma GCC unroll 2
        for (int i = 0; i < MR; ++i) {
          x0[i] = _mm256_broadcast_ss(a + i * lda + 2 * q);
          x1[i] = _mm256_broadcast_ss(a + i * lda + 2 * q + 1);
        }
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bq + 8 * v));
          const __m256 e = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
          const __m256 o = _mm256_castsi256_ps(_mm256_and_si256(w, hi));
#pragma GCC unroll 2
          for (int i = 0; i < MR; ++i) acc[i][v] = _mm256_fmadd_ps(x1[i], o, _mm256_fmadd_ps(x0[i], e, acc[i][v]));
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(res + i * kCols + c0 + 8 * v, acc[i][v]);
  }
}

// res[i * 64 + c] = sum over pairs q < Kp of a_i(q) . panel[q][c] for i < mr (<= 6), where
// a_i(q) = a[i * lda + q] holds row i's elements 2q (low half) and 2q + 1: bf16dp's outer-product
// tile (vdpbf16ps) where the CPU has AVX512_BF16 (dp), else tile_generic (CPUs with AVX2 but
// not AVX512_BF16 run tile_wide instead). Meanwhile n_pf 64-byte lines from pf on are prefetched to L2 (the
// next work item's panel, a share per tile).
void tile(bool dp, int mr, const uint32_t* a, int64_t lda, const uint32_t* panel, int64_t Kp, float* res,
          const char* pf, int64_t n_pf) {
  if (!dp) return tile_generic(a, lda, mr, panel, Kp, res);
  using bf16dp::outer_tile;
  switch (mr) {
    case 6: return outer_tile<6, 4, kCols, true>(a, lda, 1, panel, Kp, res, false, pf, n_pf);
    case 5: return outer_tile<5, 4, kCols, true>(a, lda, 1, panel, Kp, res, false, pf, n_pf);
    case 4: return outer_tile<4, 4, kCols, true>(a, lda, 1, panel, Kp, res, false, pf, n_pf);
    case 3: return outer_tile<3, 4, kCols, true>(a, lda, 1, panel, Kp, res, false, pf, n_pf);
    case 2: return outer_tile<2, 4, kCols, true>(a, lda, 1, panel, Kp, res, false, pf, n_pf);
    default: return outer_tile<1, 4, kCols, true>(a, lda, 1, panel, Kp, res, false, pf, n_pf);
  }
}

// tile_bf16_avx2 for mr (<= kTileRowsAvx2) rows of a widened to fp32.
void tile_wide(int mr, const float* a, int64_t lda, const uint32_t* panel, int64_t Kp, float* res, const char* pf,
               int64_t n_pf) {
  switch (mr) {
    case 5: return tile_bf16_avx2<5>(a, lda, panel, Kp, res, pf, n_pf);
    case 4: return tile_bf16_avx2<4>(a, lda, panel, Kp, res, pf, n_pf);
    case 3: return tile_bf16_avx2<3>(a, lda, panel, Kp, res, pf, n_pf);
    case 2: return tile_bf16_avx2<2>(a, lda, panel, Kp, res, pf, n_pf);
    default: return tile_bf16_avx2<1>(a, lda, panel, Kp, res, pf, n_pf);
  }
}

// dst[k * 64 + c] = the fp32 value of bf16 panel element (k / 2, c, k % 2) for k < 2 Kp: a bf16
// panel widened to the fp32 panel layout (tile_f32's), k pairs split into their even and odd rows.
// For work items of more than kWidenPanelRows rows on CPUs without AVX512_BF16: the panel is
// widened once (into L2) and tile_f32's 6-row tiles run on it, instead of tile_bf16_avx2 splitting
// every pair word again in each 5-row tile. The same products added in the same order (k order,
// one FMA each): bitwise equal to tile_bf16_avx2 and tile_generic.
LMOE_CPU_AVX2 void widen_panel_avx2(const uint32_t* panel, int64_t Kp, float* dst) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t q = 0; q < Kp; ++q) {
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * kCols + 8 * v));
      _mm256_storeu_ps(dst + 2 * q * kCols + 8 * v, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
      _mm256_storeu_ps(dst + (2 * q + 1) * kCols + 8 * v, _mm256_castsi256_ps(_mm256_and_si256(w, hi)));
    }
  }
}

// res[i * 64 + c] = sum over k < K of a[i * lda + k] * panel[k * 64 + c] for i < MR (fp32
// panels), the sums in k order; n_pf lines from pf prefetched as tile's are: gemm_f32.h's tile
// (6 x 64 of 16-lane FMAs; 6 x 16, 2 x 32 or 1 x 64 of 8-lane ones) on one [K, 64] panel.
#define LMOE_PACKED_F32_TILE(ISA, ATTR, W)                                                                    \
  template <int MR>                                                                                          \
  ATTR void tile_f32_##ISA(const float* a, int64_t lda, const float* panel, int64_t K, float* res, const char* pf, \
                           int64_t n_pf) {                                                                   \
    gemm_f32::tile_body<W, MR, false, kCols, true>(a, lda, panel, 0, K, res, kCols, gemm_f32::Init::kZero,   \
                                                   nullptr, pf, n_pf);                                       \
  }
LMOE_PACKED_F32_TILE(avx512, LMOE_CPU_AVX512, 16)
LMOE_PACKED_F32_TILE(avx2, LMOE_CPU_AVX2, 8)
LMOE_PACKED_F32_TILE(generic, , 8)
#undef LMOE_PACKED_F32_TILE

enum class Isa { kAvx512, kAvx2, kGeneric };

template <int MR>
void tile_f32_mr(Isa isa, const float* a, int64_t lda, const float* panel, int64_t K, float* res, const char* pf,
                 int64_t n_pf) {
  switch (isa) {
    case Isa::kAvx512: return tile_f32_avx512<MR>(a, lda, panel, K, res, pf, n_pf);
    case Isa::kAvx2: return tile_f32_avx2<MR>(a, lda, panel, K, res, pf, n_pf);
    default: return tile_f32_generic<MR>(a, lda, panel, K, res, pf, n_pf);
  }
}

void tile_f32(Isa isa, int mr, const float* a, int64_t lda, const float* panel, int64_t K, float* res,
              const char* pf, int64_t n_pf) {
  switch (mr) {
    case 6: return tile_f32_mr<6>(isa, a, lda, panel, K, res, pf, n_pf);
    case 5: return tile_f32_mr<5>(isa, a, lda, panel, K, res, pf, n_pf);
    case 4: return tile_f32_mr<4>(isa, a, lda, panel, K, res, pf, n_pf);
    case 3: return tile_f32_mr<3>(isa, a, lda, panel, K, res, pf, n_pf);
    case 2: return tile_f32_mr<2>(isa, a, lda, panel, K, res, pf, n_pf);
    default: return tile_f32_mr<1>(isa, a, lda, panel, K, res, pf, n_pf);
  }
}

// act = silu(g) * u in fp32 (n columns), the arithmetic of the HF-layout op's fp32 SwiGLU.
template <bool kAvx>
LMOE_V8_INLINE void silu_mul_body(const float* g, const float* u, float* act, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vec8::store(act + i, silu8(vec8::load(g + i)) * vec8::load(u + i));
  for (; i < n; ++i) act[i] = silu1(g[i]) * u[i];
}
LMOE_CPU_AVX2 void silu_mul_avx2(const float* g, const float* u, float* act, int64_t n) {
  silu_mul_body<true>(g, u, act, n);
}
void silu_mul_generic(const float* g, const float* u, float* act, int64_t n) { silu_mul_body<false>(g, u, act, n); }

// A row's SwiGLU from its gate and up sums (n columns): act = bf16(silu(bf16(g)) * bf16(u)), the
// arithmetic of the HF-layout path (dp_swiglu_cols).
void swiglu_act(const float* g, const float* u, c10::BFloat16* act, int64_t n, Isa isa) {
  if (isa == Isa::kAvx512) return dp_swiglu_cols_avx512(g, u, nullptr, nullptr, act, n);
  if (isa == Isa::kAvx2) return dp_swiglu_cols(g, u, nullptr, nullptr, act, n);
  for (int64_t i = 0; i < n; ++i) {
    const c10::BFloat16 gb(g[i]), ub(u[i]);
    act[i] = c10::BFloat16(silu1(static_cast<float>(gb)) * static_cast<float>(ub));
  }
}

void to_bf16(const float* src, c10::BFloat16* dst, int64_t n, Isa isa) {
  if (isa == Isa::kAvx512) return store_bf16_avx512(src, dst, n);
  if (isa == Isa::kAvx2) return store_as(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

// The packed weight `name`: dtype T, shape `want` (printed as `layout`), contiguous.
void check_packed(const char* name, const at::Tensor& t, at::ScalarType dt, std::vector<int64_t> want,
                  const char* layout, const char* source) {
  const char* op = "moe_experts_packed";
  TORCH_CHECK_VALUE(t.scalar_type() == dt, "latentmoe.moe_experts_packed: argument '", name, "' has dtype ",
                    t.scalar_type(), " but 'hidden' has dtype ", dt, "; they must match");
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(want), "latentmoe.moe_experts_packed: argument '", name,
                    "' must have shape ", layout, " = ", at::IntArrayRef(want), " (", source,
                    " packed by moe_pack_weight; H from 'hidden', I the "
                    "argument 'intermediate_size'), got shape ", t.sizes());
  chk::contiguous(op, name, t);
}

// The packed experts in T (bf16: token rows as 32-bit pairs, vdpbf16ps or the portable bf16
// kernel; fp32: floats, the fp32 tiles), after the checks. Returns out [T, H] in T.
template <typename T>
at::Tensor packed_forward(const at::Tensor& hidden, const at::Tensor& gate_up_packed, const at::Tensor& down_packed,
                          const at::Tensor& weights, const at::Tensor& indices, int64_t I) {
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  using A = std::conditional_t<kBf16, uint32_t, float>;  // a row element as the tiles read it
  const int64_t Tn = hidden.size(0), H = hidden.size(1), E = gate_up_packed.size(0);
  const int64_t K = indices.size(1), S = Tn * K;
  at::Tensor out = empty_huge({Tn, H}, hidden.options());
  if (S == 0) return out.zero_();
  const at::Tensor x = hidden.contiguous(), idx = indices.contiguous();
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  std::vector<int64_t> sorted(S), off(E + 1), pos(S);
  sort_pairs_by_expert(idx.const_data_ptr<int64_t>(), S, E, sorted.data(), off.data(), "moe_experts_packed");
  for (int64_t i = 0; i < S; ++i) pos[sorted[i]] = i;
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e]) active.push_back(e);

  // Token rows (+16 elements: rows 4 KiB apart would share L1 sets). bf16: words of two values;
  // the high half of an odd row's last word is 0 (the panels' missing k is 0, and 0 * NaN is NaN).
  auto row_len = [](int64_t n) { return (kBf16 ? cdiv(n, 2) : n) + 16; };
  const int64_t ldx = row_len(H), lda = row_len(I);
  const bool dp = bf16dp::cpu_supported(), avx2 = vec8::use_avx2();
  const Isa isa = vec8::use_avx512() ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kGeneric;
  // bf16 without AVX512_BF16 but with AVX2 (tile_wide): the rows of a widened to fp32 as well
  // (xs_f, act_f: element k of row i at i * 2 * ld + k, 0 at k = H / I), the bf16 words unused
  // but for act's SwiGLU output, widened from there.
  const bool wide = kBf16 && !dp && avx2;
  const int64_t tile_rows_all = wide ? kTileRowsAvx2 : kTileRows;
  std::unique_ptr<A[]> xs(new A[wide ? 0 : S * ldx]), act(new A[S * lda]);
  std::unique_ptr<float[]> xs_f(new float[wide ? S * 2 * ldx : 0]), act_f(new float[wide ? S * 2 * lda : 0]);
  const std::pair<void*, int64_t> scratch[] = {{xs.get(), (wide ? 0 : S * ldx) * int64_t{sizeof(A)}},
                                               {act.get(), S * lda * int64_t{sizeof(A)}},
                                               {xs_f.get(), (wide ? S * 2 * ldx : 0) * int64_t{sizeof(float)}},
                                               {act_f.get(), (wide ? S * 2 * lda : 0) * int64_t{sizeof(float)}}};
  for (const auto& [p, n] : scratch)  // (fresh mappings from that size on)
    if (static_cast<size_t>(n) >= kHugePagesMinBytes) advise_huge_pages(p, static_cast<size_t>(n));
  const T* xp = x.const_data_ptr<T>();
  at::parallel_for(0, S, 16, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      const T* src = xp + (sorted[i] / K) * H;
      if constexpr (kBf16) {
        if (I % 2 == 1) act[i * lda + I / 2] = 0;
        if (wide) {
          float* d = xs_f.get() + i * 2 * ldx;
          vec8::widen_avx2(src, d, H);
          d[H] = 0.f;
          act_f[i * 2 * lda + I] = 0.f;
          continue;
        }
        xs[i * ldx + H / 2] = 0;  // (the odd H's last word, or a padding word)
      }
      std::memcpy(xs.get() + i * ldx, src, H * sizeof(T));
    }
  });
  at::Tensor y = empty_huge({S, H}, hidden.options());
  T* yp = y.mutable_data_ptr<T>();
  const A* gu_p = reinterpret_cast<const A*>(gate_up_packed.const_data_ptr<T>());
  const A* d_p = reinterpret_cast<const A*>(down_packed.const_data_ptr<T>());

  const int64_t n_active = static_cast<int64_t>(active.size());
  auto phase = [&](bool gate_up) {
    const int64_t P = gate_up ? cdiv(I, kGateCols) : cdiv(H, kCols);
    const int64_t Kd = gate_up ? H : I, Kp = kBf16 ? cdiv(Kd, 2) : Kd;  // Kp: panel rows
    const A* wp = gate_up ? gu_p : d_p;
    const A* a_rows = gate_up ? xs.get() : act.get();
    const int64_t ld = gate_up ? ldx : lda;
    const int64_t n_items = n_active * P;  // item j: expert active[j / P], panel j % P
    auto cost = [&](int64_t j) {
      const int64_t e = active[j / P];
      return off[e + 1] - off[e] + kPanelCost;
    };
    // Contiguous ranges of about equal cost, one per thread.
    const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), n_items);
    int64_t total = 0;
    for (int64_t j = 0; j < n_items; ++j) total += cost(j);
    std::vector<int64_t> bound(n_threads + 1, n_items);
    bound[0] = 0;
    {
      int64_t t = 1, acc = 0;
      for (int64_t j = 0; j < n_items && t < n_threads; ++j) {
        acc += cost(j);
        while (t < n_threads && acc * n_threads >= total * t) bound[t++] = j + 1;
      }
    }
    auto panel_of = [&](int64_t j) { return wp + (active[j / P] * P + j % P) * Kp * kCols; };
    at::parallel_for(0, n_threads, 1, [&](int64_t tb, int64_t te) {
      alignas(64) float res[kTileRows * kCols];
      std::unique_ptr<float[]> wpanel;
      for (int64_t t = tb; t < te; ++t) {
        for (int64_t j = bound[t]; j < bound[t + 1]; ++j) {
          const int64_t e = active[j / P], p = j % P, o = off[e], m = off[e + 1] - o;
          const A* panel = panel_of(j);
          const bool widen_item = wide && m > kWidenPanelRows;
          const int64_t tile_rows = widen_item ? kTileRows : tile_rows_all;
          if constexpr (kBf16) {
            if (widen_item) {
              if (!wpanel) wpanel.reset(new float[2 * Kp * kCols]);
              widen_panel_avx2(reinterpret_cast<const uint32_t*>(panel), Kp, wpanel.get());
            }
          }
          // The next item's panel is prefetched, a share per tile (+3% at 512 tokens, 48 rows per
          // expert; +6% at 12 rows), but not by an item of one tile: there the panels stream back
          // to back, the hardware prefetcher keeps up, and the 4 prefetches per k pair took a
          // decode step (T = 1, bf16, h1024 / i704, one thread) from 0.55 to 0.8-1.0 ms.
          const int64_t tiles = cdiv(m, tile_rows);
          const char* next =
              tiles > 1 && j + 1 < bound[t + 1] ? reinterpret_cast<const char*>(panel_of(j + 1)) : nullptr;
          const int64_t lines = next ? Kp * kCols * 4 / 64 : 0;
          const int64_t share = cdiv(lines, tiles);
          for (int64_t r = 0; r < m; r += tile_rows) {
            const int mr = static_cast<int>(std::min<int64_t>(tile_rows, m - r));
            const int64_t l0 = std::min(lines, r / tile_rows * share), l1 = std::min(lines, l0 + share);
            const char* pf = next ? next + 64 * l0 : nullptr;
            if constexpr (kBf16) {
              const float* a_wide = wide ? (gate_up ? xs_f.get() : act_f.get()) + (o + r) * 2 * ld : nullptr;
              if (widen_item) tile_f32(isa, mr, a_wide, 2 * ld, wpanel.get(), 2 * Kp, res, pf, l1 - l0);
              else if (wide) tile_wide(mr, a_wide, 2 * ld, panel, Kp, res, pf, l1 - l0);
              else tile(dp, mr, a_rows + (o + r) * ld, ld, panel, Kp, res, pf, l1 - l0);
            } else {
              tile_f32(isa, mr, a_rows + (o + r) * ld, ld, panel, Kp, res, pf, l1 - l0);
            }
            for (int i = 0; i < mr; ++i) {
              const int64_t row = o + r + i;
              const float* s = res + i * kCols;
              if (gate_up) {
                const int64_t n = std::min(kGateCols, I - p * kGateCols);
                if constexpr (kBf16) {
                  T* ar = reinterpret_cast<T*>(act.get()) + row * 2 * lda + p * kGateCols;
                  swiglu_act(s, s + kGateCols, ar, n, isa);
                  if (wide) vec8::widen_avx2(ar, act_f.get() + row * 2 * lda + p * kGateCols, n);
                } else {
                  float* ar = act.get() + row * lda + p * kGateCols;
                  avx2 ? silu_mul_avx2(s, s + kGateCols, ar, n) : silu_mul_generic(s, s + kGateCols, ar, n);
                }
              } else {
                const int64_t n = std::min(kCols, H - p * kCols);
                if constexpr (kBf16) to_bf16(s, yp + row * H + p * kCols, n, isa);
                else std::memcpy(yp + row * H + p * kCols, s, n * sizeof(float));
              }
            }
          }
        }
      }
    });
  };
  phase(true);
  phase(false);
  combine_rows<T, T>(yp, w.const_data_ptr<float>(), pos.data(), out.mutable_data_ptr<T>(), Tn, K, H);
  return out;
}

at::Tensor moe_experts_packed_cpu(const at::Tensor& hidden, const at::Tensor& gate_up_packed,
                                  const at::Tensor& down_packed, const at::Tensor& weights, const at::Tensor& indices,
                                  int64_t intermediate_size) {
  const char* op = "moe_experts_packed";
  chk::dim(op, "hidden", hidden, 2);
  const at::ScalarType dt = hidden.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kBFloat16 || dt == at::kFloat,
                    "latentmoe.moe_experts_packed: argument 'hidden' must be bfloat16 or float32, got ", dt);
  const bool bf16 = dt == at::kBFloat16;
  const int64_t T = hidden.size(0), H = hidden.size(1), I = intermediate_size;
  TORCH_CHECK_VALUE(H > 0, "latentmoe.moe_experts_packed: argument 'hidden' has no columns (shape ", hidden.sizes(),
                    ")");
  TORCH_CHECK_VALUE(I > 0, "latentmoe.moe_experts_packed: argument 'intermediate_size' must be >= 1, got ", I);
  // (The dtype first: the expected layout depends on it.)
  chk::same_dtype(op, "gate_up_packed", gate_up_packed, "hidden", hidden);
  chk::same_dtype(op, "down_packed", down_packed, "hidden", hidden);
  const int64_t rank = bf16 ? 5 : 4;
  TORCH_CHECK_VALUE(gate_up_packed.dim() == rank && gate_up_packed.size(0) > 0,
                    "latentmoe.moe_experts_packed: argument 'gate_up_packed' must be ", rank, "-D with E >= 1 (",
                    bf16 ? "[E, ceil(I/32), ceil(H/2), 64, 2] for bfloat16" : "[E, ceil(I/32), H, 64] for float32",
                    "), got shape ", gate_up_packed.sizes());
  const int64_t E = gate_up_packed.size(0);
  if (bf16) {
    check_packed("gate_up_packed", gate_up_packed, dt, {E, cdiv(I, kGateCols), cdiv(H, 2), kCols, 2},
                 "[E, ceil(I/32), ceil(H/2), 64, 2]", "gate_up_proj [E, 2I, H]");
    check_packed("down_packed", down_packed, dt, {E, cdiv(H, kCols), cdiv(I, 2), kCols, 2},
                 "[E, ceil(H/64), ceil(I/2), 64, 2]", "down_proj [E, H, I]");
  } else {
    check_packed("gate_up_packed", gate_up_packed, dt, {E, cdiv(I, kGateCols), H, kCols}, "[E, ceil(I/32), H, 64]",
                 "gate_up_proj [E, 2I, H]");
    check_packed("down_packed", down_packed, dt, {E, cdiv(H, kCols), I, kCols}, "[E, ceil(H/64), I, 64]",
                 "down_proj [E, H, I]");
  }
  if (bf16 && I % 2 == 1) {
    // The bf16 shapes give I only up to its parity (ceil(I / 2) k pairs): a pack of down_proj
    // [E, H, I + 1] has the same shapes. Its k = I (the last pair's second half) holds weights,
    // where a pack of [E, H, I] holds the zero padding.
    const at::Tensor past = down_packed.select(2, cdiv(I, 2) - 1).select(3, 1);
    TORCH_CHECK_VALUE(!past.any().item<bool>(), "latentmoe.moe_experts_packed: argument 'intermediate_size' is ", I,
                      " but 'down_packed' holds nonzero weights at k = ", I, ", past the last column: it was packed ",
                      "from down_proj [E, H, ", I + 1, "] (pass intermediate_size=", I + 1, ")");
  }
  chk::dim(op, "indices", indices, 2);
  chk::dtype(op, "indices", indices, at::kLong);
  chk::size(op, "indices", indices, 0, T, "tokens");
  chk::dim(op, "weights", weights, 2);
  TORCH_CHECK_VALUE(weights.sizes() == indices.sizes(), "latentmoe.moe_experts_packed: argument 'weights' has shape ",
                    weights.sizes(), " but 'indices' has shape ", indices.sizes());
  TORCH_CHECK_VALUE(weights.scalar_type() == at::kFloat || weights.scalar_type() == dt,
                    "latentmoe.moe_experts_packed: argument 'weights' must be float32 or hidden's dtype (", dt,
                    "), got ", weights.scalar_type());
  chk::same_device(op, "gate_up_packed", gate_up_packed, "hidden", hidden);
  chk::same_device(op, "down_packed", down_packed, "hidden", hidden);
  chk::same_device(op, "weights", weights, "hidden", hidden);
  chk::same_device(op, "indices", indices, "hidden", hidden);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  return bf16 ? packed_forward<c10::BFloat16>(hidden, gate_up_packed, down_packed, weights, indices, I)
              : packed_forward<float>(hidden, gate_up_packed, down_packed, weights, indices, I);
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CPU, m) {
  m.impl("moe_pack_weight", &moe_pack_weight_cpu);
  m.impl("moe_experts_packed", &moe_experts_packed_cpu);
}

}  // namespace latentmoe::cpu
