// Eight-lane fp32 vectors for the CPU kernels, written with GCC/Clang vector extensions (no
// intrinsics), so one source compiles to AVX2+FMA inside an `LMOE_CPU_AVX2` function and to SSE
// pairs in a plain one. The helpers are always_inline, so each caller gets code for its own ISA.
// Kernels instantiate their body twice (AVX2+FMA and portable) and pick one per call with
// `use_avx2()`: by CPU feature, not CPU model (target_clones("arch=haswell") dispatches on the
// model, so AMD CPUs with AVX2 would get the portable code).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

// The helpers only ever run inlined into a clone, so the vector-return ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace latentmoe::cpu::vec8 {

// Unaligned, aliasing-safe 8 x fp32 / 8 x int32 (loads and stores through these are memcpy-like).
typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4), may_alias));

#define LMOE_V8_INLINE inline __attribute__((always_inline))

// The AVX2+FMA instantiation of a kernel body.
#define LMOE_CPU_AVX2 __attribute__((target("avx2,fma")))

// Whether to run the AVX2+FMA instantiations: the CPU has AVX2, FMA and F16C, and the environment does
// not say LATENTMOE_CPU_ISA=generic (tests run the portable code that way too).
inline bool use_avx2() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const char* env = std::getenv("LATENTMOE_CPU_ISA");
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

LMOE_V8_INLINE v8f vmax(v8f a, v8f b) { return a > b ? a : b; }

// exp(x) for x <= 0 (softmax weights exp(s - max)), about 2 ulp: x = k ln2 + r with |r| <= ln2/2,
// exp(r) by the degree-6 polynomial of the Cephes expf (public coefficients), times 2^k built in
// the exponent bits. x below -87.3 (exp underflows fp32's normal range) gives 0.
LMOE_V8_INLINE v8f exp_nonpos(v8f x) {
  const v8f lo = splat(-87.33654f);
  const auto under = x < lo;  // lanes that flush to 0
  x = vmax(x, lo);
  const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8f kf = (x * splat(1.44269504088896341f) + magic) - magic;
  v8f r = x - kf * splat(0.693359375f);
  r = r - kf * splat(-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  const v8f y = p * r * r + r + splat(1.f);
  const v8i k = __builtin_convertvector(kf, v8i);
  const v8i bits = (k + 127) << 23;
  const v8f scale = reinterpret_cast<const v8f&>(bits);
  const v8f res = y * scale;
  return under ? splat(0.f) : res;
}

// Scalar twin of exp_nonpos for tails (same polynomial, so lanes and tails agree).
LMOE_V8_INLINE float exp_nonpos(float x) {
  if (x < -87.33654f) return 0.f;
  const float magic = 12582912.0f;
  const float kf = (x * 1.44269504088896341f + magic) - magic;
  float r = x - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// fp16 -> fp32 of n values with the F16C conversion (8 at a time); only where use_avx2() holds.
__attribute__((target("avx2,f16c"))) inline void widen_half_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

}  // namespace latentmoe::cpu::vec8
