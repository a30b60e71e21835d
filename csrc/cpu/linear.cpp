// linear_small CPU kernel: out[M, N] = input[M, K] @ weight[N, K]^T (+ bias) for a few rows (the
// projections of a decode step), bound by reading the weight once. Threads split the N weight
// rows (at::parallel_for); one input row is dotted with each weight row by four independent
// accumulators (so a core is not held to one FMA per latency), more rows in register tiles of 3
// input rows by 3 weight rows (8-lane fp32 vectors, vec8.h: AVX2+FMA+F16C where the CPU has it,
// else portable; bf16 / fp16 weights widened in registers; bf16 on AVX512_BF16 CPUs: bf16dp's
// vdpbf16ps tiles). Fixed summation order: bitwise deterministic whatever the thread count.
//
// bmm_small CPU kernel (CPU only): out[g] = input[g] @ weight[g] for a few rows per batch entry
// (MLA's absorbed per-head products in a decode step: q_nope @ W_UK, o_latent @ W_UV^T, read in
// place from kv_b_proj's weight). A transposed weight view (rows of K adjacent) runs linear_small's
// dot products; a [K, N] weight (rows of N adjacent) runs an axpy form: the weight rows are read
// one after another (one sequential stream: the hardware prefetcher follows it from memory) and
// each is added, times the input's k-th value, into the fp32 output rows, which stay in L1; every
// output is summed in k order. Work items are (batch entry, block of kKnBlock columns): fixed
// boundaries, so the bits do not depend on the thread count either.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/linear_checks.h"
#include "cpu/gemm_bf16.h"
#include "cpu/linear.h"
#include "cpu/vec8.h"

namespace latentmoe::cpu {
namespace {

namespace v8 = latentmoe::cpu::vec8;
using v8::v8f;

// One input row (M = 1, a single sequence's decode step, bound by the weight's bytes). The task's
// rows are read as kOneStreams sub-ranges at once, one row of each per step: that many sequential
// streams from memory per core. On a 2-core Zen 4 shared with other tenants (fp32, K = 2048, 576 to
// 3072 rows from memory, alternated with one row at a time): 0.86-0.92x the time while the memory
// had bandwidth to spare (one stream per core read 38 GB/s, four 45), 0.96-1.03x while neighbours
// held it down to 25-30 GB/s; two streams gained nothing, six about what four did.
// Every row's dot product is the same arithmetic whatever group or tail it falls in: two 8-lane
// accumulators over k in steps of 16, one more block of 8, a fixed lane sum, the k tail in order
// (bitwise the same whatever the thread count or the rows a task takes).
constexpr int kOneStreams = 4;

template <int S, typename TW, bool kAvx>
LMOE_V8_INLINE void rows_dot(const float* x, const TW* const* wr, int64_t K, float* const* out) {
  v8f a0[S], a1[S];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) a0[s] = a1[s] = v8::splat(0.f);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const v8f x0 = v8::load(x + k), x1 = v8::load(x + k + 8);
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      a0[s] += x0 * v8::load_f32<TW, kAvx>(wr[s] + k);
      a1[s] += x1 * v8::load_f32<TW, kAvx>(wr[s] + k + 8);
    }
  }
  const bool eight = k + 8 <= K;
  if (eight) {
    const v8f x0 = v8::load(x + k);
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) a0[s] += x0 * v8::load_f32<TW, kAvx>(wr[s] + k);
  }
  const int64_t k_tail = eight ? k + 8 : k;
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    float sum = v8::hsum(a0[s] + a1[s]);
    for (int64_t kk = k_tail; kk < K; ++kk) sum += x[kk] * static_cast<float>(wr[s][kk]);
    *out[s] = sum;
  }
}

template <typename TW, bool kAvx>
LMOE_V8_INLINE void rows_body_one(const float* x, const TW* w, int64_t ldw, int64_t K, int64_t n0, int64_t n1,
                                  float* out_f) {
  constexpr int S = kOneStreams;
  const int64_t len = (n1 - n0) / S;
  for (int64_t i = 0; i < len; ++i) {
    const TW* wr[S];
    float* out[S];
    for (int s = 0; s < S; ++s) {
      const int64_t n = n0 + s * len + i;
      wr[s] = w + n * ldw;
      out[s] = out_f + n;
    }
    rows_dot<S, TW, kAvx>(x, wr, K, out);
  }
  for (int64_t n = n0 + S * len; n < n1; ++n) {
    const TW* wr[1] = {w + n * ldw};
    float* out[1] = {out_f + n};
    rows_dot<1, TW, kAvx>(x, wr, K, out);
  }
}

// out[m, n] for rows m in [0, M) of x (fp32, row stride ldx) and weight rows n in [n0, n1).
// out_f: fp32 [M, N] scratch.
// Weight row n at w + n * ldw.
// One row: rows_body_one. More: register tiles of MR input rows by NR weight rows (kRowsMr x
// kRowsNr, smaller at the edges): per 8 k, MR + NR vector loads for MR * NR FMAs (a 2 x 1 tile did
// 3 loads per 2 FMAs: at 4 / 16 rows of the q_proj shape, fp32 from memory on a Zen 4, 2.0-2.3x /
// 3.9-6.1x the read floor against 1.5-1.7x / 2.8-3.0x here, in alternated runs). Every output has
// one 8-lane accumulator over k in steps of 8, then a fixed lane sum and the k tail in order: the
// same bits whatever tile computes it (so whatever the thread count or the rows a task takes).
constexpr int kRowsMr = 3, kRowsNr = 3;

template <typename TW, bool kAvx, int MR, int NR>
LMOE_V8_INLINE void rows_tile(const float* x, int64_t ldx, int64_t K, const TW* w, int64_t ldw, int64_t N, float* out) {
  v8f acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = v8::splat(0.f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    v8f xv[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) xv[i] = v8::load(x + i * ldx + k);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const v8f wv = v8::load_f32<TW, kAvx>(w + j * ldw + k);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) acc[i][j] += xv[i] * wv;
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float sum = v8::hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) sum += x[i * ldx + kk] * static_cast<float>(w[j * ldw + kk]);
      out[i * N + j] = sum;
    }
  }
}

template <typename TW, bool kAvx, int NR>
LMOE_V8_INLINE void rows_tile_m(int64_t mr, const float* x, int64_t ldx, int64_t K, const TW* w, int64_t ldw,
                                int64_t N, float* out) {
  switch (mr) {
    case 3: return rows_tile<TW, kAvx, 3, NR>(x, ldx, K, w, ldw, N, out);
    case 2: return rows_tile<TW, kAvx, 2, NR>(x, ldx, K, w, ldw, N, out);
    default: return rows_tile<TW, kAvx, 1, NR>(x, ldx, K, w, ldw, N, out);
  }
}

template <typename TW, bool kAvx>
LMOE_V8_INLINE void rows_body(const float* x, int64_t ldx, int64_t M, const TW* w, int64_t ldw, int64_t K, int64_t N,
                              int64_t n0, int64_t n1, float* out_f) {
  static_assert(kRowsMr == 3 && kRowsNr == 3, "rows_tile_m's cases");
  if (M == 1) return rows_body_one<TW, kAvx>(x, w, ldw, K, n0, n1, out_f);
  for (int64_t n = n0; n < n1; n += kRowsNr) {
    const int64_t nr = std::min<int64_t>(kRowsNr, n1 - n);
    for (int64_t m = 0; m < M; m += kRowsMr) {
      const int64_t mr = std::min<int64_t>(kRowsMr, M - m);
      const float* xm = x + m * ldx;
      const TW* wn = w + n * ldw;
      float* o = out_f + m * N + n;
      switch (nr) {
        case 3: rows_tile_m<TW, kAvx, 3>(mr, xm, ldx, K, wn, ldw, N, o); break;
        case 2: rows_tile_m<TW, kAvx, 2>(mr, xm, ldx, K, wn, ldw, N, o); break;
        default: rows_tile_m<TW, kAvx, 1>(mr, xm, ldx, K, wn, ldw, N, o); break;
      }
    }
  }
}

// fp32 weights and 2+ input rows on AVX-512 CPUs: register tiles of up to kRows16Mr input rows by
// kRows16Nr weight rows with 16-lane vectors (8 loads per 16 FMAs, where the 8-lane 3 x 3 tiles
// above do 6 per 9 at half the width: at 4 / 16 rows of the q_proj shape (K = 2048, N = 3072)
// those were compute-bound, 3.4x / 8.4x the read floor on a 2-core Zen 4). The tile's first input
// row block prefetches the next weight rows (one 64-byte line each per 16 k), so they arrive from
// memory while this block computes. Every output has one 16-lane accumulator over k in steps of
// 16, then a fixed lane-sum tree (hsum16) and the k tail in order: the same bits whatever
// tile computes it, so whatever the thread count or the rows a task takes.
constexpr int kRows16Mr = 4, kRows16Nr = 4;

// The lane sum of v: halves added pairwise down to one lane (a fixed tree; vector extensions, as
// _mm512_reduce_add_ps trips GCC 12's -Wmaybe-uninitialized).
typedef float v16f __attribute__((vector_size(64)));
LMOE_CPU_AVX512 LMOE_V8_INLINE float hsum16(__m512 v) {
  const v16f a = (v16f)v;
  const auto h8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const auto h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  const auto h2 = __builtin_shufflevector(h4, h4, 0, 1) + __builtin_shufflevector(h4, h4, 2, 3);
  return h2[0] + h2[1];
}

template <int MR, int NR>
LMOE_CPU_AVX512 LMOE_V8_INLINE void rows_tile16(const float* x, int64_t ldx, int64_t K, const float* w,
                                                int64_t ldw, int64_t N, float* out, const float* next,
                                                int64_t n_next) {
  __m512 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int64_t j = 0; j < n_next; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * ldw + k), _MM_HINT_T0);
    __m512 xv[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const __m512 wv = _mm512_loadu_ps(w + j * ldw + k);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float sum = hsum16(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) sum += x[i * ldx + kk] * w[j * ldw + kk];
      out[i * N + j] = sum;
    }
  }
}

template <int NR>
LMOE_CPU_AVX512 LMOE_V8_INLINE void rows_tile16_m(int64_t mr, const float* x, int64_t ldx, int64_t K, const float* w,
                                                  int64_t ldw, int64_t N, float* out, const float* next,
                                                  int64_t n_next) {
  switch (mr) {
    case 4: return rows_tile16<4, NR>(x, ldx, K, w, ldw, N, out, next, n_next);
    case 3: return rows_tile16<3, NR>(x, ldx, K, w, ldw, N, out, next, n_next);
    case 2: return rows_tile16<2, NR>(x, ldx, K, w, ldw, N, out, next, n_next);
    default: return rows_tile16<1, NR>(x, ldx, K, w, ldw, N, out, next, n_next);
  }
}

// rows_body's form for fp32 weights on AVX-512 (M >= 2).
LMOE_CPU_AVX512 void rows_body16(const float* x, int64_t ldx, int64_t M, const float* w, int64_t ldw, int64_t K,
                                 int64_t N, int64_t n0, int64_t n1, float* out_f) {
  static_assert(kRows16Mr == 4 && kRows16Nr == 4, "rows_tile16_m's cases");
  for (int64_t n = n0; n < n1; n += kRows16Nr) {
    const int64_t nr = std::min<int64_t>(kRows16Nr, n1 - n);
    const int64_t n_next = std::min<int64_t>(kRows16Nr, std::max<int64_t>(0, n1 - n - kRows16Nr));
    const float* wn = w + n * ldw;
    for (int64_t m = 0; m < M; m += kRows16Mr) {
      const int64_t mr = std::min<int64_t>(kRows16Mr, M - m);
      const float* xm = x + m * ldx;
      float* o = out_f + m * N + n;
      const float* next = wn + kRows16Nr * ldw;
      const int64_t pf = m == 0 ? n_next : 0;  // the first row block prefetches the next weight rows
      switch (nr) {
        case 4: rows_tile16_m<4>(mr, xm, ldx, K, wn, ldw, N, o, next, pf); break;
        case 3: rows_tile16_m<3>(mr, xm, ldx, K, wn, ldw, N, o, next, pf); break;
        case 2: rows_tile16_m<2>(mr, xm, ldx, K, wn, ldw, N, o, next, pf); break;
        default: rows_tile16_m<1>(mr, xm, ldx, K, wn, ldw, N, o, next, pf); break;
      }
    }
  }
}

// bf16 input and weight rows of K adjacent on AVX512_BF16 CPUs: bf16dp's vdpbf16ps dot-product
// tiles (4 input rows by 6 weight rows; products exact in fp32, as the widening path's, sums in
// fp32 in a fixed order, whatever the rows a task takes). out_f[m * ldo + n] for n in [n0, n1).
// The 8-lane widening path is compute-bound from 2 rows up (2-core Zen 4, the q_proj shape from
// memory: 2.8x / 6.7x the read floor at 4 / 16 rows, slower than oneDNN's F.linear there); these
// tiles ran at 1.0-1.2x / 1.5-1.9x.
struct Bf16Rows {
  std::vector<c10::BFloat16> a;  // the input rows, row stride lda (bf16dp::padded_stride)
  int64_t lda = 0;
  Bf16Rows(const c10::BFloat16* x, int64_t M, int64_t K) : lda(bf16dp::padded_stride(K)) {
    a.assign(static_cast<size_t>(std::max<int64_t>(M, 1) * lda), c10::BFloat16(0.f));
    for (int64_t m = 0; m < M; ++m) std::copy_n(x + m * K, K, a.data() + m * lda);
  }
};

void bf16_rows(const Bf16Rows& x, int64_t M, const c10::BFloat16* w, int64_t ldw, int64_t K, int64_t n0, int64_t n1,
               float* out_f, int64_t ldo) {
  std::vector<float> res(bf16dp::scratch_floats(M, K));
  bf16dp::gemm(x.a.data(), x.lda, w, ldw, M, K, n0, n1, res.data(),
               [&](int64_t m, int64_t c0, const float* v, int64_t count) { std::copy_n(v, count, out_f + m * ldo + c0); });
}

// Columns per bmm_small work item in the [K, N] form (a multiple of 32).
constexpr int64_t kKnBlock = 512;

// y[m, n] = sum_k x[m, k] * w[k * ldk + n] for m < M, n in [n0, n1): x fp32 [M, K], y fp32 rows
// of stride N. Weight row k is read once, n0 to n1, and each output accumulates in k order.
template <typename TW, bool kAvx>
LMOE_V8_INLINE void kn_body(const float* x, int64_t M, const TW* w, int64_t ldk, int64_t K, int64_t N, int64_t n0,
                            int64_t n1, float* y) {
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n0, y + m * N + n1, 0.f);
  for (int64_t k = 0; k < K; ++k) {
    const TW* wr = w + k * ldk;
    int64_t n = n0;
    for (; n + 32 <= n1; n += 32) {
      v8f wv[4];
      for (int u = 0; u < 4; ++u) wv[u] = v8::load_f32<TW, kAvx>(wr + n + 8 * u);
      for (int64_t m = 0; m < M; ++m) {
        const v8f xs = v8::splat(x[m * K + k]);
        float* yr = y + m * N + n;
        for (int u = 0; u < 4; ++u) v8::store(yr + 8 * u, v8::load(yr + 8 * u) + xs * wv[u]);
      }
    }
    for (; n + 8 <= n1; n += 8) {
      const v8f wv = v8::load_f32<TW, kAvx>(wr + n);
      for (int64_t m = 0; m < M; ++m) {
        float* yr = y + m * N + n;
        v8::store(yr, v8::load(yr) + v8::splat(x[m * K + k]) * wv);
      }
    }
    for (; n < n1; ++n) {
      const float wk = static_cast<float>(wr[n]);
      for (int64_t m = 0; m < M; ++m) y[m * N + n] += x[m * K + k] * wk;
    }
  }
}

// The two forms' instantiations: kKn picks kn_body (weight rows along K, ld = their stride) or
// rows_body (weight rows along N, ld = their stride); AVX2+FMA or portable, by CPU feature.
template <typename TW, bool kKn>
LMOE_CPU_AVX2 void stream_avx2(const float* x, int64_t M, const TW* w, int64_t ld, int64_t K, int64_t N, int64_t n0,
                               int64_t n1, float* out_f) {
  if constexpr (kKn) kn_body<TW, true>(x, M, w, ld, K, N, n0, n1, out_f);
  else rows_body<TW, true>(x, K, M, w, ld, K, N, n0, n1, out_f);
}
template <typename TW, bool kKn>
void stream_generic(const float* x, int64_t M, const TW* w, int64_t ld, int64_t K, int64_t N, int64_t n0, int64_t n1,
                    float* out_f) {
  if constexpr (kKn) kn_body<TW, false>(x, M, w, ld, K, N, n0, n1, out_f);
  else rows_body<TW, false>(x, K, M, w, ld, K, N, n0, n1, out_f);
}
template <typename TW, bool kKn>
void stream(bool avx, const float* x, int64_t M, const TW* w, int64_t ld, int64_t K, int64_t N, int64_t n0, int64_t n1,
            float* out_f) {
  if constexpr (std::is_same_v<TW, float> && !kKn) {
    if (avx && M >= 2 && vec8::use_avx512()) return rows_body16(x, K, M, w, ld, K, N, n0, n1, out_f);
  }
  if (avx) stream_avx2<TW, kKn>(x, M, w, ld, K, N, n0, n1, out_f);
  else stream_generic<TW, kKn>(x, M, w, ld, K, N, n0, n1, out_f);
}

at::Tensor linear_small_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  linear::check_args(input, weight, bias);
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  auto out_f = at::empty({M, N}, input.options().dtype(at::kFloat));
  // About 64 KiB of weights per task: enough to amortise the scheduling, many tasks to share out.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * weight.element_size()));
  if (M > 0 && N > 0 && K > 0 && weight.scalar_type() == at::kBFloat16 && bf16dp::cpu_supported()) {
    const Bf16Rows x(input.const_data_ptr<c10::BFloat16>(), M, K);
    const c10::BFloat16* wp = weight.const_data_ptr<c10::BFloat16>();
    float* op = out_f.mutable_data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { bf16_rows(x, M, wp, K, K, n0, n1, op, N); });
  } else if (M > 0 && N > 0) {
    const auto x = input.to(at::kFloat).contiguous();  // a few rows: the copy is small
    const float* xp = x.const_data_ptr<float>();
    float* op = out_f.mutable_data_ptr<float>();
    const bool avx = v8::use_avx2();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "linear_small", [&] {
      const scalar_t* wp = weight.const_data_ptr<scalar_t>();
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        stream<scalar_t, false>(avx, xp, M, wp, K, K, N, n0, n1, op);
      });
    });
  }
  if (bias.has_value()) out_f.add_(bias->to(at::kFloat));
  return out_f.to(input.scalar_type());
}

}  // namespace

at::Tensor bmm_small_cpu(const at::Tensor& input, const at::Tensor& weight) {
  const linear::BmmLayout layout = linear::check_bmm_args(input, weight);
  const int64_t G = input.size(0), M = input.size(1), K = input.size(2), N = weight.size(2);
  auto out_f = at::empty({G, M, N}, input.options().dtype(at::kFloat));
  if (G > 0 && M > 0 && N > 0) {
    if (K == 0) {
      out_f.zero_();
    } else {
      float* op = out_f.mutable_data_ptr<float>();
      const int64_t sg = weight.stride(0);
      if (layout == linear::BmmLayout::kNk && weight.scalar_type() == at::kBFloat16 && bf16dp::cpu_supported()) {
        // bf16 weight rows of K adjacent: bf16dp's tiles, as linear_small's (work items as below).
        const int64_t ldw = weight.stride(2);
        const c10::BFloat16* xp = input.const_data_ptr<c10::BFloat16>();
        std::vector<Bf16Rows> xs;
        xs.reserve(G);
        for (int64_t g = 0; g < G; ++g) xs.emplace_back(xp + g * M * K, M, K);
        const c10::BFloat16* wp = weight.const_data_ptr<c10::BFloat16>();
        const int64_t grain = std::max<int64_t>(1, 65536 / (K * 2));
        at::parallel_for(0, G * N, grain, [&](int64_t b, int64_t e) {
          while (b < e) {
            const int64_t g = b / N, n0 = b % N, n1 = std::min(N, n0 + (e - b));
            bf16_rows(xs[g], M, wp + g * sg, ldw, K, n0, n1, op + g * M * N, N);
            b += n1 - n0;
          }
        });
        return out_f.to(input.scalar_type());
      }
      const auto x = input.to(at::kFloat).contiguous();  // a few rows per entry: the copy is small
      const float* xp = x.const_data_ptr<float>();
      const bool avx = v8::use_avx2();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "bmm_small", [&] {
        const scalar_t* wp = weight.const_data_ptr<scalar_t>();
        if (layout == linear::BmmLayout::kNk) {
          // Weight row n of entry g (K elements, adjacent) at wp + g * sg + n * ldw: linear_small's
          // dot products, items of about 64 KiB of weights over the (entry, row) pairs.
          const int64_t ldw = weight.stride(2);
          const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * weight.element_size()));
          at::parallel_for(0, G * N, grain, [&](int64_t b, int64_t e) {
            while (b < e) {
              const int64_t g = b / N, n0 = b % N, n1 = std::min(N, n0 + (e - b));
              stream<scalar_t, false>(avx, xp + g * M * K, M, wp + g * sg, ldw, K, N, n0, n1, op + g * M * N);
              b += n1 - n0;
            }
          });
        } else {
          const int64_t ldk = weight.stride(1), blocks = (N + kKnBlock - 1) / kKnBlock;
          at::parallel_for(0, G * blocks, 1, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) {
              const int64_t g = i / blocks, n0 = (i % blocks) * kKnBlock, n1 = std::min(N, n0 + kKnBlock);
              stream<scalar_t, true>(avx, xp + g * M * K, M, wp + g * sg, ldk, K, N, n0, n1, op + g * M * N);
            }
          });
        }
      });
    }
  }
  return out_f.to(input.scalar_type());
}

TORCH_LIBRARY_IMPL(latentmoe, CPU, m) {
  m.impl("linear_small", &linear_small_cpu);
  m.impl("bmm_small", &bmm_small_cpu);
}

// The CPU micro-kernels' instantiation the next op will run ("avx2" or "generic"; vec8::use_avx2):
// latentmoe._C.cpu_isa() for tests that force the portable one.
const char* active_cpu_isa() { return vec8::use_avx2() ? "avx2" : "generic"; }

}  // namespace latentmoe::cpu
