// linear_f32: out [M, N] = input [M, K] @ weight [N, K]^T (+ bias) in fp32 on the CPU, any M, on
// this project's register tiles (cpu/gemm_f32.h): the weight packed into 64-column panels per
// call (one pass over it, ~1% of a 4096-row GEMM), then row blocks x panel ranges across the
// threads. Deterministic (each output summed in k order, the bias first, whatever the threads).
// For where ATen's fp32 GEMM runs below this CPU's FMA rate (MKL's AVX2 code on AMD CPUs; see
// gemm_f32.h); f32_gemm_preferred() says when the modules take it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/checks.h"
#include "common/linear_checks.h"
#include "common/settings.h"
#include "cpu/gemm_f32.h"

namespace latentmoe::cpu {
namespace {

namespace chk = latentmoe::checks;

at::Tensor linear_f32_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "linear_f32";
  chk::dtype(op, "input", input, at::kFloat);
  chk::same_dtype(op, "weight", weight, "input", input);
  chk::same_device(op, "weight", weight, "input", input);
  chk::dim(op, "input", input, 2);
  chk::dim(op, "weight", weight, 2);
  linear::check_weight_bias(op, input, weight, bias);
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  auto out = at::empty({M, N}, input.options());
  if (out.numel() == 0) return out;
  std::vector<float> buf;
  const auto pn = gemm_f32::panels_nk(weight.const_data_ptr<float>(), K, N, K, buf, /*parallel=*/true);
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  gemm_f32::gemm_parallel(gemm_f32::isa(), M, input.const_data_ptr<float>(), K, pn, out.mutable_data_ptr<float>(), N,
                          b != nullptr ? gemm_f32::Init::kBias : gemm_f32::Init::kZero, b);
  return out;
}

}  // namespace

// Whether the modules' large fp32 CPU projections take linear_f32 instead of ATen's GEMM:
// LATENTMOE_CPU_F32_GEMM=latentmoe / aten, or auto (unset): on AMD CPUs with AVX-512, where MKL's
// sgemm runs its AVX2 code (about half the FMA rate; measured, gemm_f32.h). On Intel CPUs MKL
// runs AVX-512 code of its own, and without AVX-512 both run 8-lane FMAs: ATen's GEMM there.
bool f32_gemm_preferred() {
  switch (settings::choice("nn (the modules' fp32 projections)", "LATENTMOE_CPU_F32_GEMM",
                           {"auto", "latentmoe", "aten"})) {
    case 1: return true;
    case 2: return false;
    default: return vec8::use_avx512() && __builtin_cpu_is("amd");
  }
}

TORCH_LIBRARY_IMPL(latentmoe, CPU, m) { m.impl("linear_f32", &linear_f32_cpu); }

}  // namespace latentmoe::cpu
