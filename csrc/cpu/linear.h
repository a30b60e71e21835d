// CPU kernels of csrc/cpu/linear.cpp that other CPU kernels call directly (no dispatcher).
#pragma once

#include <ATen/ATen.h>

namespace latentmoe::cpu {

// bmm_small's CPU kernel, argument checks included: out [G, M, N] = input [G, M, K] @ weight
// [G, K, N] in input's dtype, M <= 16, weight with rows of N adjacent or a transposed view.
at::Tensor bmm_small_cpu(const at::Tensor& input, const at::Tensor& weight);

}  // namespace latentmoe::cpu
