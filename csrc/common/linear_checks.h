// Argument checks of linear_small (shared by the CPU and CUDA registrations), of bmm_small and
// of linear_f32 (CPU only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "common/checks.h"

namespace latentmoe::linear {

// Rows of `input` the op takes: it streams every weight row once per call and is meant for
// decode-step projections; larger batches belong to a GEMM (nn.Linear).
constexpr int64_t kMaxRows = 16;

// input and weight: floating, one dtype and device, `rank` dims each, at most kMaxRows rows (input
// dim rank - 2, named `rows`; `instead`: what takes more).
inline void check_operands(const char* op, const at::Tensor& input, const at::Tensor& weight, int64_t rank,
                           const char* rows, const char* instead) {
  namespace chk = latentmoe::checks;
  chk::floating(op, "input", input);
  chk::same_dtype(op, "weight", weight, "input", input);
  chk::same_device(op, "weight", weight, "input", input);
  chk::dim(op, "input", input, rank);
  chk::dim(op, "weight", weight, rank);
  TORCH_CHECK_VALUE(input.size(rank - 2) <= kMaxRows, "latentmoe.", op, ": argument 'input' has ",
                    input.size(rank - 2), " ", rows, "; the op takes at most ", kMaxRows, " (use ", instead,
                    " for more)");
}

// An nn.Linear call's checks after the operands' dtypes, devices and ranks: the weight's
// in_features, contiguous input and weight, and the optional bias [out_features] (linear_small,
// linear_f32).
inline void check_weight_bias(const char* op, const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  namespace chk = latentmoe::checks;
  chk::size(op, "weight", weight, 1, input.size(1), "in_features = input.size(1)");
  chk::contiguous(op, "input", input);
  chk::contiguous(op, "weight", weight);
  if (bias.has_value()) {
    chk::same_dtype(op, "bias", *bias, "input", input);
    chk::same_device(op, "bias", *bias, "input", input);
    chk::dim(op, "bias", *bias, 1);
    chk::size(op, "bias", *bias, 0, weight.size(0), "out_features = weight.size(0)");
    chk::contiguous(op, "bias", *bias);
  }
}

inline void check_args(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_operands("linear_small", input, weight, 2, "rows", "torch.nn.functional.linear");
  check_weight_bias("linear_small", input, weight, bias);
}

// bmm_small's weight layouts: kKn, weight [G, K, N] with its N elements of a row adjacent
// (stride(2) == 1; any row stride, e.g. a slice of a larger matrix); kNk, the transposed view of
// an [G, N, K] tensor (stride(1) == 1, rows of K adjacent). A dimension of size 1 counts as
// adjacent whatever its stride.
enum class BmmLayout { kKn, kNk };

inline BmmLayout check_bmm_args(const at::Tensor& input, const at::Tensor& weight) {
  namespace chk = latentmoe::checks;
  const char* op = "bmm_small";
  check_operands(op, input, weight, 3, "rows per batch entry", "torch.bmm");
  chk::size(op, "weight", weight, 0, input.size(0), "the batch size input.size(0)");
  chk::size(op, "weight", weight, 1, input.size(2), "K = input.size(2)");
  chk::contiguous(op, "input", input);
  const int64_t K = weight.size(1), N = weight.size(2);
  if (K <= 1 || weight.stride(1) == 1) return BmmLayout::kNk;
  TORCH_CHECK_VALUE(N <= 1 || weight.stride(2) == 1, "latentmoe.bmm_small: argument 'weight' (strides ",
                    weight.strides(), ") must have unit stride in its last dimension (a [G, K, N] matrix "
                    "with rows of N adjacent) or in its middle one (a transposed [G, N, K] view); "
                    "pass weight.contiguous()");
  return BmmLayout::kKn;
}

}  // namespace latentmoe::linear
