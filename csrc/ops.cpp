// Every op schema of latentmoe, once. Kernels register per dispatch key in csrc/cpu/*.cpp
// (CPU) and csrc/cuda/<family>/*_binding.cpp (CUDA); fake kernels and autograd are registered
// from Python (python/latentmoe/ops/).
#include <torch/library.h>

TORCH_LIBRARY(latentmoe, m) {
  // ---- normalization ---------------------------------------------------------------------------
  // RMSNorm over the last dim, HF DeepseekV3RMSNorm numerics:
  //   out = weight * to_dtype(x * rstd),  rstd = 1/sqrt(mean(x^2) + eps)  (fp32 math).
  // input [..., D] (fp32/bf16/fp16, last dim contiguous), weight [D] same dtype.
  // Returns out [..., D] (input dtype) and rstd [...] (fp32, saved for backward).
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> (Tensor out, Tensor rstd)");
  // Fused residual add + RMSNorm: h = input + residual (rounded to the input dtype, as an
  // unfused add would), out = rms_norm(h). Returns out, h (the new residual stream) and rstd.
  m.def(
      "add_rms_norm(Tensor input, Tensor residual, Tensor weight, float eps)"
      " -> (Tensor out, Tensor residual_out, Tensor rstd)");
  // Backward of rms_norm given the saved rstd: grad_input [..., D] (input dtype) and
  // grad_weight [D] (weight dtype; summed over rows in fp32 in a fixed order, deterministic).
  m.def(
      "rms_norm_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor rstd)"
      " -> (Tensor grad_input, Tensor grad_weight)");

  // ---- MLA (multi-head latent attention) -------------------------------------------------------

  // ---- MoE (routing and experts) ---------------------------------------------------------------
}
