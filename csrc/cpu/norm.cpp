// RMSNorm CPU kernels: rows in parallel (at::parallel_for), fp32 math on 8-lane vectors (vec8.h:
// an AVX2+FMA+F16C instantiation where the CPU has it, a portable one otherwise), bf16 / fp16
// converted in registers exactly as c10 converts. Numerics from common/math.h, shared with the
// CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/norm_checks.h"
#include "common/math.h"
#include "cpu/vec8.h"

namespace latentmoe::cpu {
namespace {

namespace v8 = latentmoe::cpu::vec8;
using v8::v8f;

// Long sums (a row's sum of squares, the backward's dot product) run in blocks of kSumBlock
// elements, each block's partial sums started from zero and then added to the running ones: every
// lane then sums at most kSumBlock / 8 terms per level instead of D / 8 (at D = 4M a single level
// was 100x HF's error, HF's mean being a pairwise sum). A row of at most kSumBlock elements sums
// exactly as one level (0 + s = s): its bits are those of a plain sum.
constexpr int64_t kSumBlock = 2048;

// ---- forward rows ------------------------------------------------------------------------------
// Row r of D elements: rstd = 1/sqrt(mean(x^2) + eps); out = T(T(x * rstd) * w) (HF's order:
// round the normalised value to T first, then scale by the weight). 8 lanes at a time (vec8.h;
// bf16 / fp16 converted in registers), a scalar tail.
template <typename T, bool kAvx>
LMOE_V8_INLINE void norm_rows_body(const T* x, const T* w, T* out, float* rstd_out, int64_t r0, int64_t r1,
                                   int64_t D, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * D;
    T* outr = out + r * D;
    v8f acc = v8::splat(0.f);
    const int64_t D8 = D / 8 * 8;
    int64_t i = 0;
    while (i < D8) {
      const int64_t end = std::min(D8, i + kSumBlock);
      v8f blk = v8::splat(0.f);
      for (; i < end; i += 8) {
        const v8f v = v8::load_f32<T, kAvx>(xr + i);
        blk += v * v;
      }
      acc += blk;
    }
    float sum_sq = v8::hsum(acc);
    for (int64_t k = i; k < D; ++k) {
      const float v = static_cast<float>(xr[k]);
      sum_sq += v * v;
    }
    const float rstd = math::rms_rstd(sum_sq, static_cast<int>(D), eps);
    rstd_out[r] = rstd;
    const v8f rs = v8::splat(rstd);
    for (i = 0; i + 8 <= D; i += 8) {
      const v8f y = v8::round_to<T, kAvx>(v8::load_f32<T, kAvx>(xr + i) * rs);
      v8::store_from_f32<T, kAvx>(outr + i, y * v8::load_f32<T, kAvx>(w + i));
    }
    for (; i < D; ++i) {
      const float y = static_cast<float>(static_cast<T>(static_cast<float>(xr[i]) * rstd));
      outr[i] = static_cast<T>(y * static_cast<float>(w[i]));
    }
  }
}

// h = T(x + res) for elements [b, e).
template <typename T, bool kAvx>
LMOE_V8_INLINE void add_body(const T* x, const T* res, T* h, int64_t b, int64_t e) {
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    v8::store_from_f32<T, kAvx>(h + i, v8::load_f32<T, kAvx>(x + i) + v8::load_f32<T, kAvx>(res + i));
  }
  for (; i < e; ++i) h[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(res[i]));
}

template <typename T>
LMOE_CPU_AVX2 void norm_rows_avx2(const T* x, const T* w, T* out, float* rstd, int64_t r0, int64_t r1, int64_t D,
                                  float eps) {
  norm_rows_body<T, true>(x, w, out, rstd, r0, r1, D, eps);
}
template <typename T>
void norm_rows_generic(const T* x, const T* w, T* out, float* rstd, int64_t r0, int64_t r1, int64_t D, float eps) {
  norm_rows_body<T, false>(x, w, out, rstd, r0, r1, D, eps);
}
template <typename T>
LMOE_CPU_AVX2 void add_avx2(const T* x, const T* res, T* h, int64_t b, int64_t e) {
  add_body<T, true>(x, res, h, b, e);
}
template <typename T>
void add_generic(const T* x, const T* res, T* h, int64_t b, int64_t e) {
  add_body<T, false>(x, res, h, b, e);
}

// ---- bf16 rows on AVX2 --------------------------------------------------------------------------
// 16 values per step. One 32-byte load is widened by interleaving zeros below each value inside
// each 128-bit lane (unpacklo: elements 0-3 and 8-11; unpackhi: 4-7 and 12-15), and the pack back
// (packus, also per lane) restores the order: no cross-lane shuffle either way. The weight is
// widened the same way, so the lanes line up. Rounding to bf16 stays in registers, as c10 rounds:
// bits + 0x7FFF + (bit 16), NaN -> 0x7FC0. The generic v8 body above took 8 values per step
// through a pack, two cross-lane permutes and an unpack for its intermediate rounding, with one
// accumulator chain: at 512 x 7168 (2 threads, Zen 3) 2.4-3.0 ms, 7-10x a plain copy.
namespace bf16v {

LMOE_CPU_AVX2 inline void load16(const c10::BFloat16* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i z = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
}

// v's bits plus c10's round-to-nearest-even bias: the bf16 value in the high 16 bits (not NaN).
LMOE_CPU_AVX2 inline __m256i biased(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
}

LMOE_CPU_AVX2 inline __m256 is_nan(__m256 v) { return _mm256_cmp_ps(v, v, _CMP_UNORD_Q); }

// fp32(bf16(v)): v rounded to bf16, as fp32 (NaN -> 0x7FC00000).
LMOE_CPU_AVX2 inline __m256 round(__m256 v) {
  const __m256 r = _mm256_castsi256_ps(_mm256_and_si256(biased(v), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  return _mm256_blendv_ps(r, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), is_nan(v));
}

// fp32(bf16(v)) for v not NaN.
LMOE_CPU_AVX2 inline __m256 round_num(__m256 v) {
  return _mm256_castsi256_ps(_mm256_and_si256(biased(v), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Stores bf16(lo), bf16(hi) as 16 values in load16's order; kNoNaN: neither holds a NaN.
template <bool kNoNaN = false>
LMOE_CPU_AVX2 inline void store16(c10::BFloat16* p, __m256 lo, __m256 hi) {
  if constexpr (kNoNaN) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm256_packus_epi32(_mm256_srli_epi32(biased(lo), 16), _mm256_srli_epi32(biased(hi), 16)));
    return;
  }
  const __m256 nan16 = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0));
  const __m256i l = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_srli_epi32(biased(lo), 16)), nan16, is_nan(lo)));
  const __m256i h = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_srli_epi32(biased(hi), 16)), nan16, is_nan(hi)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(l, h));
}

LMOE_CPU_AVX2 inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }

// Rows [r0, r1): out = T(T(src * rstd) * w), src = x, or with res given h = T(x + res) (written)
// and src = h (re-read from L1 / L2: a row of 7168 values is 14 KiB). Sums of squares in four
// chains; the last D % 16 values per element.
LMOE_CPU_AVX2 void norm_rows(const c10::BFloat16* x, const c10::BFloat16* res, c10::BFloat16* h,
                             const c10::BFloat16* w, c10::BFloat16* out, float* rstd_out, int64_t r0,
                             int64_t r1, int64_t D, float eps, bool w_finite) {
  const int64_t D16 = D / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* xr = x + r * D;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float sum_sq = 0.f;
    const c10::BFloat16* src = xr;
    if (res != nullptr) {
      const c10::BFloat16* rr = res + r * D;
      c10::BFloat16* hr = h + r * D;
      for (int64_t b = 0; b < D16; b += kSumBlock) {  // (kSumBlock: a multiple of 32)
        const int64_t end = std::min(D16, b + kSumBlock);
        __m256 blk[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t i = b; i < end; i += 16) {
          __m256 xl, xh, rl, rh;
          load16(xr + i, xl, xh);
          load16(rr + i, rl, rh);
          const __m256 sl = _mm256_add_ps(xl, rl), sh = _mm256_add_ps(xh, rh);
          store16(hr + i, sl, sh);
          const __m256 ql = round(sl), qh = round(sh);
          const int u = static_cast<int>((i / 16) & 1);
          blk[2 * u] = _mm256_fmadd_ps(ql, ql, blk[2 * u]);
          blk[2 * u + 1] = _mm256_fmadd_ps(qh, qh, blk[2 * u + 1]);
        }
        for (int u = 0; u < 4; ++u) acc[u] = _mm256_add_ps(acc[u], blk[u]);
      }
      for (int64_t i = D16; i < D; ++i) {
        hr[i] = static_cast<c10::BFloat16>(widen(xr[i]) + widen(rr[i]));
        sum_sq += widen(hr[i]) * widen(hr[i]);
      }
      src = hr;
    } else {
      for (int64_t b = 0; b < D16; b += kSumBlock) {  // (kSumBlock: a multiple of 32)
        const int64_t end = std::min(D16, b + kSumBlock);
        __m256 blk[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t i = b;
        for (; i + 32 <= end; i += 32) {
          __m256 a0, a1, a2, a3;
          load16(xr + i, a0, a1);
          load16(xr + i + 16, a2, a3);
          blk[0] = _mm256_fmadd_ps(a0, a0, blk[0]);
          blk[1] = _mm256_fmadd_ps(a1, a1, blk[1]);
          blk[2] = _mm256_fmadd_ps(a2, a2, blk[2]);
          blk[3] = _mm256_fmadd_ps(a3, a3, blk[3]);
        }
        for (; i < end; i += 16) {
          __m256 a0, a1;
          load16(xr + i, a0, a1);
          blk[0] = _mm256_fmadd_ps(a0, a0, blk[0]);
          blk[1] = _mm256_fmadd_ps(a1, a1, blk[1]);
        }
        for (int u = 0; u < 4; ++u) acc[u] = _mm256_add_ps(acc[u], blk[u]);
      }
      for (int64_t i = D16; i < D; ++i) sum_sq += widen(xr[i]) * widen(xr[i]);
    }
    sum_sq += hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    const float rstd = math::rms_rstd(sum_sq, static_cast<int>(D), eps);
    rstd_out[r] = rstd;
    const __m256 rs = _mm256_set1_ps(rstd);
    c10::BFloat16* outr = out + r * D;
    if (std::isfinite(sum_sq) && w_finite) {
      // No NaN anywhere in the row: with sum_sq finite every |x * rstd| <= sqrt(D) (rstd <=
      // sqrt(D) / |x|), and finite * finite weights is never NaN (an overflow to inf rounds as
      // c10 rounds it).
      for (int64_t i = 0; i < D16; i += 16) {
        __m256 sl, sh, wl, wh;
        load16(src + i, sl, sh);
        load16(w + i, wl, wh);
        store16<true>(outr + i, _mm256_mul_ps(round_num(_mm256_mul_ps(sl, rs)), wl),
                      _mm256_mul_ps(round_num(_mm256_mul_ps(sh, rs)), wh));
      }
    } else {
      for (int64_t i = 0; i < D16; i += 16) {
        __m256 sl, sh, wl, wh;
        load16(src + i, sl, sh);
        load16(w + i, wl, wh);
        store16(outr + i, _mm256_mul_ps(round(_mm256_mul_ps(sl, rs)), wl),
                _mm256_mul_ps(round(_mm256_mul_ps(sh, rs)), wh));
      }
    }
    for (int64_t i = D16; i < D; ++i) {
      const float y = widen(static_cast<c10::BFloat16>(widen(src[i]) * rstd));
      outr[i] = static_cast<c10::BFloat16>(y * widen(w[i]));
    }
  }
}

}  // namespace bf16v

// Whether every weight is finite (the bf16 kernel then skips its NaN selects).
template <typename T>
bool all_finite(const T* w, int64_t D) {
  for (int64_t i = 0; i < D; ++i)
    if (!std::isfinite(static_cast<float>(w[i]))) return false;
  return true;
}

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, float* rstd_out, int64_t rows, int64_t D, float eps) {
  const bool avx = v8::use_avx2();
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (avx) {  // bf16 on AVX2: its own kernel (the v8 body's AVX2 instantiation is not used for bf16)
      const bool w_finite = all_finite(w, D);
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        bf16v::norm_rows(x, nullptr, nullptr, w, out, rstd_out, begin, end, D, eps, w_finite);
      });
      return;
    }
  }
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    if constexpr (!std::is_same_v<T, c10::BFloat16>) {
      if (avx) return norm_rows_avx2<T>(x, w, out, rstd_out, begin, end, D, eps);
    }
    norm_rows_generic<T>(x, w, out, rstd_out, begin, end, D, eps);
  });
}

// h = T(x + res), then out = rms_norm(h): bf16 on AVX2 in one pass of its own kernel (the add fused
// into the rows' first pass), other types the add, then rms_norm_rows.
template <typename T>
void add_rms_norm_rows(const T* x, const T* res, T* h, const T* w, T* out, float* rstd, int64_t rows, int64_t D,
                       float eps) {
  const bool avx = v8::use_avx2();
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (avx) {
      const bool w_finite = all_finite(w, D);
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        bf16v::norm_rows(x, res, h, w, out, rstd, begin, end, D, eps, w_finite);
      });
      return;
    }
  }
  at::parallel_for(0, rows * D, 4096, [&](int64_t b, int64_t e) {
    if constexpr (!std::is_same_v<T, c10::BFloat16>) {
      if (avx) return add_avx2<T>(x, res, h, b, e);
    }
    add_generic<T>(x, res, h, b, e);
  });
  rms_norm_rows<T>(h, w, out, rstd, rows, D, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& input, const at::Tensor& weight,
                                                double eps) {
  norm::check_args("rms_norm", input, weight);
  norm::check_eps("rms_norm", eps);
  auto x = input.contiguous();
  auto w = weight.contiguous();
  const int64_t D = x.size(-1);
  const int64_t rows = x.numel() / D;
  auto out = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cpu", [&] {
    rms_norm_rows<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                            out.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<float>(), rows,
                            D, static_cast<float>(eps));
  });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& input,
                                                                const at::Tensor& residual,
                                                                const at::Tensor& weight,
                                                                double eps) {
  norm::check_args("add_rms_norm", input, weight);
  norm::check_residual(input, residual);
  norm::check_eps("add_rms_norm", eps);
  auto x = input.contiguous();
  auto res = residual.contiguous();
  auto w = weight.contiguous();
  const int64_t D = x.size(-1);
  const int64_t rows = x.numel() / D;
  auto h = at::empty_like(x);
  auto out = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.const_data_ptr<scalar_t>();
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    add_rms_norm_rows<scalar_t>(xp, rp, hp, w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                rstd.mutable_data_ptr<float>(), rows, D, static_cast<float>(eps));
  });
  return {out, h, rstd};
}

// Rows are summed for grad_weight in fixed chunks of kChunk rows, then the chunk partials in
// order: the result does not depend on the thread count.
constexpr int64_t kChunk = 64;

// Chunks [cb, ce) of kChunk rows: grad_input per row, and the chunk's grad_weight partial (rows
// summed in order). 8 lanes at a time as the forward, a scalar tail.
template <typename T, bool kAvx>
LMOE_V8_INLINE void backward_chunks_body(const T* g, const T* x, const T* w, const float* rstd, T* gx,
                                         float* gw_partial, int64_t rows, int64_t D, int64_t cb, int64_t ce,
                                         float* gy) {
  for (int64_t c = cb; c < ce; ++c) {
    float* gwp = gw_partial + c * D;
    for (int64_t i = 0; i < D; ++i) gwp[i] = 0.f;
    const int64_t r_end = std::min(rows, (c + 1) * kChunk);
    for (int64_t r = c * kChunk; r < r_end; ++r) {
      const T* gr = g + r * D;
      const T* xr = x + r * D;
      const float rs = rstd[r];
      const v8f rsv = v8::splat(rs);
      v8f dotv = v8::splat(0.f);
      const int64_t D8 = D / 8 * 8;
      int64_t i = 0;
      while (i < D8) {
        const int64_t end = std::min(D8, i + kSumBlock);
        v8f blk = v8::splat(0.f);
        for (; i < end; i += 8) {
          const v8f y = v8::load_f32<T, kAvx>(xr + i) * rsv;
          const v8f go = v8::load_f32<T, kAvx>(gr + i);
          const v8f gyv = go * v8::load_f32<T, kAvx>(w + i);
          v8::store(gy + i, gyv);
          blk += gyv * y;
          v8::store(gwp + i, v8::load(gwp + i) + go * y);
        }
        dotv += blk;
      }
      float dot = v8::hsum(dotv);
      for (int64_t k = i; k < D; ++k) {
        const float y = static_cast<float>(xr[k]) * rs;
        const float go = static_cast<float>(gr[k]);
        gy[k] = go * static_cast<float>(w[k]);
        dot += gy[k] * y;
        gwp[k] += go * y;
      }
      const float mean_gy_y = dot / static_cast<float>(D);
      T* gxr = gx + r * D;
      for (i = 0; i + 8 <= D; i += 8) {
        alignas(32) float y[8], gxa[8];
        v8::store(y, v8::load_f32<T, kAvx>(xr + i) * rsv);
        for (int l = 0; l < 8; ++l) gxa[l] = math::rms_grad_input(gy[i + l], y[l], rs, mean_gy_y);
        v8::store_from_f32<T, kAvx>(gxr + i, v8::load(gxa));
      }
      for (; i < D; ++i) {
        const float y = static_cast<float>(xr[i]) * rs;
        gxr[i] = static_cast<T>(math::rms_grad_input(gy[i], y, rs, mean_gy_y));
      }
    }
  }
}

template <typename T>
LMOE_CPU_AVX2 void backward_chunks_avx2(const T* g, const T* x, const T* w, const float* rstd, T* gx, float* gwp,
                                        int64_t rows, int64_t D, int64_t cb, int64_t ce, float* gy) {
  backward_chunks_body<T, true>(g, x, w, rstd, gx, gwp, rows, D, cb, ce, gy);
}
template <typename T>
void backward_chunks_generic(const T* g, const T* x, const T* w, const float* rstd, T* gx, float* gwp, int64_t rows,
                             int64_t D, int64_t cb, int64_t ce, float* gy) {
  backward_chunks_body<T, false>(g, x, w, rstd, gx, gwp, rows, D, cb, ce, gy);
}

template <typename T>
void rms_norm_backward_rows(const T* g, const T* x, const T* w, const float* rstd, T* gx,
                            float* gw_partial, int64_t rows, int64_t D) {
  const int64_t n_chunks = (rows + kChunk - 1) / kChunk;
  const bool avx = v8::use_avx2();
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> gy(D);
    if (avx) {
      backward_chunks_avx2<T>(g, x, w, rstd, gx, gw_partial, rows, D, cb, ce, gy.data());
    } else {
      backward_chunks_generic<T>(g, x, w, rstd, gx, gw_partial, rows, D, cb, ce, gy.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out,
                                                         const at::Tensor& input,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& rstd) {
  norm::check_backward_args(grad_out, input, weight, rstd);
  auto g = grad_out.contiguous();
  auto x = input.contiguous();
  auto w = weight.contiguous();
  auto rs = rstd.contiguous();
  const int64_t D = x.size(-1);
  const int64_t rows = x.numel() / D;
  const int64_t n_chunks = (rows + kChunk - 1) / kChunk;
  auto gx = at::empty_like(x);
  auto gw_partial = at::empty({n_chunks, D}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward_cpu", [&] {
    rms_norm_backward_rows<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                     w.const_data_ptr<scalar_t>(), rs.const_data_ptr<float>(),
                                     gx.mutable_data_ptr<scalar_t>(),
                                     gw_partial.mutable_data_ptr<float>(), rows, D);
  });
  // Sum the chunk partials in chunk order (deterministic).
  auto gw = at::zeros({D}, x.options().dtype(at::kFloat));
  float* gwp = gw.mutable_data_ptr<float>();
  const float* pp = gw_partial.const_data_ptr<float>();
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int64_t i = 0; i < D; ++i) gwp[i] += pp[c * D + i];
  return {gx, gw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace latentmoe::cpu
