// Eight-lane fp32 vectors for the CPU kernels, written with GCC/Clang vector extensions (no
// intrinsics), so one source compiles to AVX2+FMA inside an `LMOE_CPU_AVX2` function and to SSE
// pairs in a plain one. The helpers are always_inline, so each caller gets code for its own ISA.
// Kernels instantiate their body twice (AVX2+FMA and portable) and pick one per call with
// `use_avx2()`: by CPU feature, not CPU model (target_clones("arch=haswell") dispatches on the
// model, so AMD CPUs with AVX2 would get the portable code).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/settings.h"

// The helpers only ever run inlined into a clone, so the vector-return ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace latentmoe::cpu::vec8 {

// Unaligned, aliasing-safe 8 x fp32 / 8 x int32 (loads and stores through these are memcpy-like).
typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4), may_alias));

#define LMOE_V8_INLINE inline __attribute__((always_inline))

// The AVX2+FMA(+F16C) instantiation of a kernel body.
#define LMOE_CPU_AVX2 __attribute__((target("avx2,fma,f16c")))

// Whether to run the AVX2+FMA instantiations: the CPU has AVX2, FMA and F16C, and the environment does
// not say LATENTMOE_CPU_ISA=generic (tests run the portable code that way too).
inline bool use_avx2() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const char* env = settings::get("LATENTMOE_CPU_ISA");
  return has && !(env != nullptr && std::strcmp(env, "generic") == 0);
}

LMOE_V8_INLINE v8f load(const float* p) { return *reinterpret_cast<const v8f*>(p); }
LMOE_V8_INLINE void store(float* p, v8f v) { *reinterpret_cast<v8f*>(p) = v; }
LMOE_V8_INLINE v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

LMOE_V8_INLINE float hsum(v8f v) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

typedef float v4f __attribute__((vector_size(16), aligned(4), may_alias));

// [x0+x1, x2+x3, y0+y1, y2+y3 | x4+x5, x6+x7, y4+y5, y6+y7]: vhaddps as two shuffles and an add.
LMOE_V8_INLINE v8f pair_add(v8f x, v8f y) {
  return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
}

// The lane sums of a, b, c, d at once (out[0] = sum of a's lanes, ...), each summed as
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) whichever slot it takes: three pair_add
// rounds and one 128-bit add, where four separate hsum calls are four serial chains of seven
// scalar adds each.
LMOE_V8_INLINE v4f hsum4(v8f a, v8f b, v8f c, v8f d) {
  const v8f s = pair_add(pair_add(a, b), pair_add(c, d));  // a0123 b0123 c0123 d0123 | the 4567s
  return __builtin_shufflevector(s, s, 0, 1, 2, 3) + __builtin_shufflevector(s, s, 4, 5, 6, 7);
}

LMOE_V8_INLINE v8f vmax(v8f a, v8f b) { return a > b ? a : b; }

// ---- W-lane fp32 vectors (W = 8: AVX2 or SSE pairs; W = 16: AVX-512 inside an
// LMOE_CPU_AVX512 function) for kernels written once for both widths ----------------------------
template <int W>
struct Lanes;
template <>
struct Lanes<8> {
  typedef float F __attribute__((vector_size(32), aligned(4), may_alias));
  typedef int32_t I __attribute__((vector_size(32), aligned(4), may_alias));
};
template <>
struct Lanes<16> {
  typedef float F __attribute__((vector_size(64), aligned(4), may_alias));
  typedef int32_t I __attribute__((vector_size(64), aligned(4), may_alias));
};
template <int W>
using vf = typename Lanes<W>::F;
template <int W>
using vi = typename Lanes<W>::I;

// The AVX-512 instantiation of a W = 16 kernel body.
#define LMOE_CPU_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")))

// Whether to run the AVX-512 instantiations: the CPU has AVX512F/VL/BW/DQ (and AVX2, FMA, F16C),
// and LATENTMOE_CPU_ISA is neither `generic` nor `avx2` (tests run the other paths that way).
inline bool use_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  const char* env = settings::get("LATENTMOE_CPU_ISA");
  return has && !(env != nullptr && (std::strcmp(env, "generic") == 0 || std::strcmp(env, "avx2") == 0));
}

template <int W>
LMOE_V8_INLINE vf<W> loadw(const float* p) {
  return *reinterpret_cast<const vf<W>*>(p);
}
template <int W>
LMOE_V8_INLINE vi<W> loadw(const int32_t* p) {
  return *reinterpret_cast<const vi<W>*>(p);
}
template <int W>
LMOE_V8_INLINE void storew(float* p, vf<W> v) {
  *reinterpret_cast<vf<W>*>(p) = v;
}
// x in every lane: {x} shuffled. (GCC 12 expands a 16-entry initializer list of x, or x - 0,
// into 16 masked broadcasts in the AVX-512 kernels, as it did a shuffle helper taking the vector
// as a parameter; `vf<W>{} + x` must keep 0 + -0 = +0 and so adds.)
template <int W>
LMOE_V8_INLINE vf<W> splatw(float x) {
  const vf<W> v = {x};
  if constexpr (W == 8) {
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
  } else {
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  }
}
// The int32 x in every lane: the float splat of its bits (shuffles move bits unchanged).
template <int W>
LMOE_V8_INLINE vi<W> splatw(int32_t x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return (vi<W>)splatw<W>(f);
}

// exp(x) for x <= 0 (softmax weights exp(s - max)), about 2 ulp: x = k ln2 + r with |r| <= ln2/2,
// exp(r) by the degree-6 polynomial of the Cephes expf (public coefficients), times 2^k built in
// the exponent bits. x below -87.3 (exp underflows fp32's normal range) gives 0.
// N vectors in place, each step across all N before the next (bitwise the same per lane as
// N = 1): the steps of one vector form a chain of ~12 dependent FP operations, and a core
// whose FP scheduler holds little more than one chain (Zen 1) ran a loop of single exps at its
// latency, ~50 cycles per 8 lanes, where N = 4 interleaved chains overlap.
template <int W, int N>
LMOE_V8_INLINE void exp_nonpos_n(vf<W>* x) {
  using V = vf<W>;
  const V lo = splatw<W>(-87.33654f), magic = splatw<W>(12582912.0f), zero = splatw<W>(0.f);
  V kf[N], r[N], p[N];
  decltype(x[0] < lo) under[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    under[i] = x[i] < lo;
    x[i] = under[i] ? lo : x[i];
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) kf[i] = (x[i] * 1.44269504088896341f + magic) - magic;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) r[i] = x[i] - kf[i] * 0.693359375f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) r[i] = r[i] - kf[i] * -2.12194440e-4f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) p[i] = splatw<W>(1.9875691500e-4f) * r[i] + 1.3981999507e-3f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) p[i] = p[i] * r[i] + 8.3334519073e-3f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) p[i] = p[i] * r[i] + 4.1665795894e-2f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) p[i] = p[i] * r[i] + 1.6666665459e-1f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) p[i] = p[i] * r[i] + 5.0000001201e-1f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    const V y = p[i] * r[i] * r[i] + r[i] + 1.f;
    const vi<W> bits = (__builtin_convertvector(kf[i], vi<W>) + 127) << 23;
    x[i] = under[i] ? zero : y * reinterpret_cast<const V&>(bits);
  }
}

template <int W>
LMOE_V8_INLINE vf<W> exp_nonpos_w(vf<W> x) {
  exp_nonpos_n<W, 1>(&x);
  return x;
}

LMOE_V8_INLINE v8f exp_nonpos(v8f x) { return exp_nonpos_w<8>(x); }

// exp_nonpos of one value (tails): lane 0 of the vector form, so lanes and tails agree bit for bit.
LMOE_V8_INLINE float exp_nonpos(float x) { return exp_nonpos_w<8>(splatw<8>(x))[0]; }

// ---- 16-bit types <-> fp32, 8 lanes ----------------------------------------------------------
typedef uint16_t v8h __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint16_t v16h __attribute__((vector_size(32), aligned(2), may_alias));
typedef uint32_t v8u __attribute__((vector_size(32), aligned(4), may_alias));

// 8 32-bit lanes from any address (bf16 weight rows are only 2-byte aligned when a row has an odd
// number of elements): a byte copy, which compiles to one unaligned vector load.
LMOE_V8_INLINE v8u load_u32x8(const void* p) {
  v8u v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// bf16 -> fp32 by interleaving zeros below each value (the 16-bit shift): two shuffles on AVX2
// (vpermq + vpunpcklwd), where a zero-extend-and-shift splits into five.
LMOE_V8_INLINE v8f bf16_load(const void* p) {
  const v8h h = *static_cast<const v8h*>(p);
  const v16h z = __builtin_shufflevector(h, v8h{}, 8, 0, 8, 1, 8, 2, 8, 3, 8, 4, 8, 5, 8, 6, 8, 7);
  return reinterpret_cast<const v8f&>(z);
}

// fp32 -> bf16 exactly as c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0.
LMOE_V8_INLINE void bf16_store(void* p, v8f v) {
  const v8u bits = reinterpret_cast<const v8u&>(v);
  const v8u rounded = (bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16;
  const auto nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  const v8u out = nan ? (v8u{} + 0x7FC0u) : rounded;
  *static_cast<v8h*>(p) = __builtin_convertvector(out, v8h);
}

// fp16 <-> fp32 of 8 values with F16C (round to nearest even, as c10::Half); call only where
// use_avx2() holds. Pointers in and out (no vector by value), so a call from code built without
// AVX is still correct when the compiler does not inline it.
__attribute__((target("avx2,fma,f16c"))) inline void half_to_f32(const void* p, float* out) {
  _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p))));
}
__attribute__((target("avx2,fma,f16c"))) inline void f32_to_half(const float* in, void* p) {
  _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(_mm256_loadu_ps(in), _MM_FROUND_TO_NEAREST_INT));
}

// 8 values of T (float, c10::BFloat16, c10::Half) as fp32, and back (rounded as static_cast<T>).
// kAvx: inside an LMOE_CPU_AVX2 function (bf16 by the bit tricks above, fp16 through F16C). The
// portable instantiation converts 16-bit types per element through c10: baseline x86-64 (SSE2)
// has no 32 -> 16-bit pack, and the vector form of bf16_store was 4x slower there.
template <typename T, bool kAvx>
LMOE_V8_INLINE v8f load_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load(p);
  } else if constexpr (kAvx && std::is_same_v<T, c10::BFloat16>) {
    return bf16_load(p);
  } else if constexpr (kAvx && std::is_same_v<T, c10::Half>) {
    alignas(32) float tmp[8];
    half_to_f32(p, tmp);
    return load(tmp);
  } else {  // fp16 without F16C, other types: per element as static_cast
    v8f r;
    for (int l = 0; l < 8; ++l) r[l] = static_cast<float>(p[l]);
    return r;
  }
}

template <typename T, bool kAvx>
LMOE_V8_INLINE void store_from_f32(T* p, v8f v) {
  if constexpr (std::is_same_v<T, float>) {
    store(p, v);
  } else if constexpr (kAvx && std::is_same_v<T, c10::BFloat16>) {
    bf16_store(p, v);
  } else if constexpr (kAvx && std::is_same_v<T, c10::Half>) {
    alignas(32) float tmp[8];
    store(tmp, v);
    f32_to_half(tmp, p);
  } else {
    for (int l = 0; l < 8; ++l) p[l] = static_cast<T>(v[l]);
  }
}

// v rounded to T and back to fp32 (identity for float).
template <typename T, bool kAvx>
LMOE_V8_INLINE v8f round_to(v8f v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    alignas(32) T tmp[8];
    store_from_f32<T, kAvx>(tmp, v);
    return load_f32<T, kAvx>(tmp);
  }
}

// dst[0, n) = fp32 of src[0, n) (T: c10::BFloat16 or c10::Half), 8 at a time with AVX2 (bf16 by
// the zero interleave, fp16 through F16C); only where use_avx2() holds. Portable code widens
// bf16 with SSE2 shuffles at half the width, and fp16 per element through c10.
template <typename T>
LMOE_CPU_AVX2 void widen_avx2(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store(dst + i, load_f32<T, true>(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

}  // namespace latentmoe::cpu::vec8
