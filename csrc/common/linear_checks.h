// Argument checks of linear_small, shared by the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "common/checks.h"

namespace latentmoe::linear {

// Rows of `input` the op takes: it streams every weight row once per call and is meant for
// decode-step projections; larger batches belong to a GEMM (nn.Linear).
constexpr int64_t kMaxRows = 16;

inline void check_args(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  namespace chk = latentmoe::checks;
  const char* op = "linear_small";
  chk::floating(op, "input", input);
  chk::same_dtype(op, "weight", weight, "input", input);
  chk::same_device(op, "weight", weight, "input", input);
  chk::dim(op, "input", input, 2);
  chk::dim(op, "weight", weight, 2);
  TORCH_CHECK_VALUE(input.size(0) <= kMaxRows, "latentmoe.linear_small: argument 'input' has ", input.size(0),
                    " rows; the op takes at most ", kMaxRows, " (use torch.nn.functional.linear for more)");
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

}  // namespace latentmoe::linear
