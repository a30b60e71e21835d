// Helpers shared by the MoE CPU kernels (cpu/moe.cpp: HF-layout experts; cpu/moe_packed.cpp:
// prepacked bf16 / fp32 experts): the counting sort of (token, k) pairs by expert, the SwiGLU
// activation's vector arithmetic and epilogue, and the weighted combine back to token order.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/vec8.h"

namespace latentmoe::cpu {
namespace {

// Counting sort of the T*K (token, k) pairs by expert; stable, so pairs of one expert keep
// ascending pair order. Fills sorted_pairs [S] and offsets [E+1]; rejects out-of-range ids.
// Each id is read once (into a private copy that both passes use): `ids` is the caller's tensor,
// and another thread writing it between a count and a scatter that each read it sent the
// scatter's cursors past their slots.
void sort_pairs_by_expert(const int64_t* ids, int64_t S, int64_t E, int64_t* sorted_pairs,
                          int64_t* offsets, const char* op = "moe_experts") {
  std::vector<int64_t> cursor(E + 1, 0), own(S);
  for (int64_t p = 0; p < S; ++p) {
    const int64_t e = own[p] = ids[p];
    TORCH_CHECK_VALUE(e >= 0 && e < E, "latentmoe.", op, ": argument 'indices' holds ", e,
                      " at flat position ", p, ", outside [0, E=", E, ")");
    ++cursor[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) cursor[e + 1] += cursor[e];
  for (int64_t e = 0; e <= E; ++e) offsets[e] = cursor[e];
  for (int64_t p = 0; p < S; ++p) sorted_pairs[cursor[own[p]]++] = p;
}

// sigmoid(g) from z = exp(-|g|) (<= 1, so exp_nonpos applies): 1 / (1 + z) for g >= 0,
// z / (1 + z) below; silu(g) = g * sigmoid(g). 8 lanes (N vectors at once in the _n forms, their
// exps interleaved by vec8::exp_nonpos_n and bitwise the same per lane: a loop of single silu8s
// ran at the latency of its exp and divide chain on a Zen 1, ~115 cycles per 8 lanes, ~6% of
// moe_experts' forward at E = 16, bf16), and scalar twins for the tails.
template <int N>
LMOE_V8_INLINE void sigmoid8_n(vec8::v8f* g) {
  vec8::v8f z[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    const vec8::v8u bits = reinterpret_cast<const vec8::v8u&>(g[i]) | 0x80000000u;  // -|g|
    z[i] = reinterpret_cast<const vec8::v8f&>(bits);
  }
  vec8::exp_nonpos_n<8, N>(z);
  const vec8::v8f one = vec8::splat(1.f);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) g[i] = (g[i] >= vec8::splat(0.f) ? one : z[i]) / (one + z[i]);
}
LMOE_V8_INLINE vec8::v8f sigmoid8(vec8::v8f g) {
  sigmoid8_n<1>(&g);
  return g;
}
LMOE_V8_INLINE float sigmoid1(float g) {
  const float z = vec8::exp_nonpos(-std::fabs(g));
  return (g >= 0.f ? 1.f : z) / (1.f + z);
}
template <int N>
LMOE_V8_INLINE void silu8_n(vec8::v8f* g) {
  vec8::v8f sig[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) sig[i] = g[i];
  sigmoid8_n<N>(sig);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) g[i] = g[i] * sig[i];
}
LMOE_V8_INLINE vec8::v8f silu8(vec8::v8f g) { return g * sigmoid8(g); }
LMOE_V8_INLINE float silu1(float g) { return g * sigmoid1(g); }

// bf16dp's epilogues (AVX2 code: they run on AVX-512 CPUs). A row's gate and up sums of n
// columns: g and u rounded to bf16 (as a bf16 GEMM returns them) into the gate_up_out row, and
// act = bf16(silu(g) * u), the arithmetic of swiglu_row_lowp_body (go_g / go_u null:
// act only, for the inference-only packed experts).
LMOE_CPU_AVX2 void dp_swiglu_cols(const float* g, const float* u, c10::BFloat16* go_g, c10::BFloat16* go_u,
                                  c10::BFloat16* act, int64_t n) {
  using T = c10::BFloat16;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const vec8::v8f gv = vec8::round_to<T, true>(vec8::load(g + i));
    const vec8::v8f uv = vec8::round_to<T, true>(vec8::load(u + i));
    if (go_g) {
      vec8::store_from_f32<T, true>(go_g + i, gv);
      vec8::store_from_f32<T, true>(go_u + i, uv);
    }
    vec8::store_from_f32<T, true>(act + i, silu8(gv) * uv);
  }
  for (; i < n; ++i) {
    const T gb = static_cast<T>(g[i]), ub = static_cast<T>(u[i]);
    if (go_g) {
      go_g[i] = gb;
      go_u[i] = ub;
    }
    act[i] = static_cast<T>(silu1(static_cast<float>(gb)) * static_cast<float>(ub));
  }
}

// The same two epilogues in 16 lanes for AVX-512 CPUs (use_avx512; the AVX2 code takes the
// tails). The bf16 rounding stays in registers (the AVX2 code's round_to goes through memory) and
// is c10::BFloat16's: round to nearest even, NaN kept quiet; the arithmetic is the AVX2 code's,
// lane for lane. (About 3x faster on a Zen 4: the SwiGLU epilogue was 6% of a 512-token bf16
// moe_experts call.)
namespace w16 {
using V = vec8::vf<16>;
using VI = vec8::vi<16>;
typedef uint32_t VU __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint16_t VH __attribute__((vector_size(32), aligned(2), may_alias));

// bf16 bits (in the low half of each lane) of v, rounded as c10::BFloat16.
LMOE_CPU_AVX512 LMOE_V8_INLINE VU bf16_bits(V v) {
  const VU bits = reinterpret_cast<const VU&>(v);
  const VU rounded = (bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16;
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? (VU{} + 0x7FC0u) : rounded;
}
LMOE_CPU_AVX512 LMOE_V8_INLINE V widen(VU h) {
  const VU b = h << 16;
  return reinterpret_cast<const V&>(b);
}
LMOE_CPU_AVX512 LMOE_V8_INLINE void store_bits(c10::BFloat16* p, VU h) {
  const VH out = __builtin_convertvector(h, VH);
  __builtin_memcpy(p, &out, sizeof out);
}
LMOE_CPU_AVX512 LMOE_V8_INLINE V loadu(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
}  // namespace w16

LMOE_CPU_AVX512 void dp_swiglu_cols_avx512(const float* g, const float* u, c10::BFloat16* go_g, c10::BFloat16* go_u,
                                          c10::BFloat16* act, int64_t n) {
  using w16::V;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const w16::VU gb = w16::bf16_bits(w16::loadu(g + i)), ub = w16::bf16_bits(w16::loadu(u + i));
    if (go_g) {
      w16::store_bits(go_g + i, gb);
      w16::store_bits(go_u + i, ub);
    }
    const V gv = w16::widen(gb), uv = w16::widen(ub);
    // silu(g) = g * sigmoid(g), sigmoid from z = exp(-|g|), as sigmoid8
    const w16::VU neg = reinterpret_cast<const w16::VU&>(gv) | 0x80000000u;
    const V z = vec8::exp_nonpos_w<16>(reinterpret_cast<const V&>(neg));
    const V one = vec8::splatw<16>(1.f);
    const V sig = (gv >= vec8::splatw<16>(0.f) ? one : z) / (one + z);
    w16::store_bits(act + i, w16::bf16_bits(gv * sig * uv));
  }
  if (i < n) dp_swiglu_cols(g + i, u + i, go_g ? go_g + i : nullptr, go_u ? go_u + i : nullptr, act + i, n - i);
}

LMOE_CPU_AVX512 void store_bf16_avx512(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) w16::store_bits(dst + i, w16::bf16_bits(w16::loadu(src + i)));
  for (; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

template <typename T>
LMOE_CPU_AVX2 void store_as(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vec8::store_from_f32<T, true>(dst + i, vec8::load(src + i));
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// out[t] = sum_k w[t,k] * y[pos[t*K+k]], fp32 accumulation in k order (no atomics).
template <typename T, typename C>
void combine_rows(const C* y, const float* w, const int64_t* pos, T* out, int64_t n_tokens,
                  int64_t K, int64_t H) {
  at::parallel_for(0, n_tokens, 4, [&](int64_t b, int64_t e) {
    std::vector<float> acc(H);
    for (int64_t t = b; t < e; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float wk = w[t * K + k];
        const C* yr = y + pos[t * K + k] * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) acc[h] += wk * static_cast<float>(yr[h]);
      }
      T* o = out + t * H;
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) o[h] = static_cast<T>(acc[h]);
    }
  });
}

}  // namespace
}  // namespace latentmoe::cpu
