// linear_small CPU kernel: out[M, N] = input[M, K] @ weight[N, K]^T (+ bias) for a few rows (the
// projections of a decode step), bound by reading the weight once. Threads split the N weight
// rows (at::parallel_for); each weight row is dotted with the input rows two at a time (8-lane
// fp32 vectors, vec8.h: AVX2+FMA+F16C where the CPU has it, else portable; bf16 / fp16 weights
// widened in registers), four independent accumulators per dot so a core is not held to one FMA
// per latency. Fixed summation order: bitwise deterministic whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/linear_checks.h"
#include "cpu/vec8.h"

namespace latentmoe::cpu {
namespace {

namespace v8 = latentmoe::cpu::vec8;
using v8::v8f;

// out[m, n] for rows m in [0, M) of x (fp32, row stride K) and weight rows n in [n0, n1).
// out_f: fp32 [M, N] scratch.
template <typename TW, bool kAvx>
LMOE_V8_INLINE void rows_body(const float* x, int64_t M, const TW* w, int64_t K, int64_t N, int64_t n0, int64_t n1,
                              float* out_f) {
  for (int64_t n = n0; n < n1; ++n) {
    const TW* wr = w + n * K;
    for (int64_t m = 0; m < M; m += 2) {
      const float* x0 = x + m * K;
      const float* x1 = m + 1 < M ? x0 + K : x0;  // an odd last row pairs with itself
      v8f a0[4] = {v8::splat(0.f), v8::splat(0.f), v8::splat(0.f), v8::splat(0.f)};
      v8f a1[4] = {v8::splat(0.f), v8::splat(0.f), v8::splat(0.f), v8::splat(0.f)};
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        for (int u = 0; u < 4; ++u) {
          const v8f wv = v8::load_f32<TW, kAvx>(wr + k + 8 * u);
          a0[u] += v8::load(x0 + k + 8 * u) * wv;
          a1[u] += v8::load(x1 + k + 8 * u) * wv;
        }
      }
      for (; k + 8 <= K; k += 8) {
        const v8f wv = v8::load_f32<TW, kAvx>(wr + k);
        a0[0] += v8::load(x0 + k) * wv;
        a1[0] += v8::load(x1 + k) * wv;
      }
      float s0 = v8::hsum((a0[0] + a0[1]) + (a0[2] + a0[3]));
      float s1 = v8::hsum((a1[0] + a1[1]) + (a1[2] + a1[3]));
      for (; k < K; ++k) {
        const float wk = static_cast<float>(wr[k]);
        s0 += x0[k] * wk;
        s1 += x1[k] * wk;
      }
      out_f[m * N + n] = s0;
      if (m + 1 < M) out_f[(m + 1) * N + n] = s1;
    }
  }
}

template <typename TW>
LMOE_CPU_AVX2 void rows_avx2(const float* x, int64_t M, const TW* w, int64_t K, int64_t N, int64_t n0, int64_t n1,
                             float* out_f) {
  rows_body<TW, true>(x, M, w, K, N, n0, n1, out_f);
}
template <typename TW>
void rows_generic(const float* x, int64_t M, const TW* w, int64_t K, int64_t N, int64_t n0, int64_t n1,
                  float* out_f) {
  rows_body<TW, false>(x, M, w, K, N, n0, n1, out_f);
}

at::Tensor linear_small_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  linear::check_args(input, weight, bias);
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  auto out_f = at::empty({M, N}, input.options().dtype(at::kFloat));
  if (M > 0 && N > 0) {
    const auto x = input.to(at::kFloat).contiguous();  // a few rows: the copy is small
    const float* xp = x.const_data_ptr<float>();
    float* op = out_f.mutable_data_ptr<float>();
    const bool avx = v8::use_avx2();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "linear_small", [&] {
      const scalar_t* wp = weight.const_data_ptr<scalar_t>();
      // About 64 KiB of weights per task: enough to amortise the scheduling, many tasks to share out.
      const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * weight.element_size()));
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        if (avx) {
          rows_avx2<scalar_t>(xp, M, wp, K, N, n0, n1, op);
        } else {
          rows_generic<scalar_t>(xp, M, wp, K, N, n0, n1, op);
        }
      });
    });
  }
  if (bias.has_value()) out_f.add_(bias->to(at::kFloat));
  return out_f.to(input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CPU, m) { m.impl("linear_small", &linear_small_cpu); }

// The CPU micro-kernels' instantiation the next op will run ("avx2" or "generic"; vec8::use_avx2):
// latentmoe._C.cpu_isa() for tests that force the portable one.
const char* active_cpu_isa() { return vec8::use_avx2() ? "avx2" : "generic"; }

}  // namespace latentmoe::cpu
