// Argument checks of the RMSNorm ops, shared by the CPU kernels and the CUDA bindings.
#pragma once

#include <cmath>

#include "common/checks.h"

namespace latentmoe::norm {

namespace chk = latentmoe::checks;

inline void check_args(const char* op, const at::Tensor& input, const at::Tensor& weight) {
  chk::floating(op, "input", input);
  chk::same_dtype(op, "weight", weight, "input", input);
  chk::same_device(op, "weight", weight, "input", input);
  TORCH_CHECK_VALUE(input.dim() >= 1, "latentmoe.", op, ": argument 'input' must have at least 1 dim");
  chk::dim(op, "weight", weight, 1);
  TORCH_CHECK_VALUE(weight.size(0) == input.size(-1), "latentmoe.", op, ": argument 'weight' has ",
                    weight.size(0), " elements but 'input' has last dim ", input.size(-1));
  chk::nonempty(op, "input", input);
}

// eps: finite and >= 0 (a NaN or negative eps would give NaN rows, not an error).
inline void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "latentmoe.", op, ": argument 'eps' must be finite and >= 0, got ",
                    eps);
}

inline void check_residual(const at::Tensor& input, const at::Tensor& residual) {
  const char* op = "add_rms_norm";
  chk::same_dtype(op, "residual", residual, "input", input);
  chk::same_device(op, "residual", residual, "input", input);
  TORCH_CHECK_VALUE(residual.sizes() == input.sizes(), "latentmoe.add_rms_norm: argument 'residual' has shape ",
                    residual.sizes(), " but 'input' has shape ", input.sizes());
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& rstd) {
  const char* op = "rms_norm_backward";
  check_args(op, input, weight);
  chk::same_dtype(op, "grad_out", grad_out, "input", input);
  chk::same_device(op, "grad_out", grad_out, "input", input);
  chk::same_device(op, "rstd", rstd, "input", input);
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes(), "latentmoe.rms_norm_backward: argument 'grad_out' has shape ",
                    grad_out.sizes(), " but 'input' has shape ", input.sizes());
  chk::dtype(op, "rstd", rstd, at::kFloat);
  // (The forward's rstd: input's shape without its last dim. Only the count was checked, so a
  // [2, 2] rstd passed for a [4, 8] input.)
  TORCH_CHECK_VALUE(rstd.sizes() == input.sizes().slice(0, input.dim() - 1),
                    "latentmoe.rms_norm_backward: argument 'rstd' must have one value per row of 'input' (shape ",
                    input.sizes().slice(0, input.dim() - 1), "), got shape ", rstd.sizes());
}

}  // namespace latentmoe::norm
