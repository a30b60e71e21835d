// CUDA registration of linear_small: the same checks as the CPU op, then cuBLAS (through
// at::linear, fp32 accumulation). A GEMV on the GPU is cuBLAS's strength; the op exists so one
// call works on either device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/linear_checks.h"

namespace latentmoe::cuda {
namespace {

at::Tensor linear_small_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  linear::check_args(input, weight, bias);
  c10::cuda::CUDAGuard guard(input.device());
  return at::linear(input, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CUDA, m) { m.impl("linear_small", &linear_small_cuda); }

}  // namespace latentmoe::cuda
