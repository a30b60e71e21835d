// CUDA registrations of the RMSNorm ops: argument checks and launches.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/common/binding_utils.h"
#include "cuda/norm/norm_launch.h"

namespace latentmoe::cuda {
namespace {

namespace chk = latentmoe::checks;

void check_norm_args(const char* op, const at::Tensor& input, const at::Tensor& weight) {
  chk::floating(op, "input", input);
  chk::same_dtype(op, "weight", weight, "input", input);
  chk::same_device(op, "weight", weight, "input", input);
  TORCH_CHECK_VALUE(input.dim() >= 1, "latentmoe.", op, ": argument 'input' must have at least 1 dim");
  chk::dim(op, "weight", weight, 1);
  TORCH_CHECK_VALUE(weight.size(0) == input.size(-1), "latentmoe.", op, ": argument 'weight' has ",
                    weight.size(0), " elements but 'input' has last dim ", input.size(-1));
  chk::nonempty(op, "input", input);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& input, const at::Tensor& weight,
                                                 double eps) {
  check_norm_args("rms_norm", input, weight);
  c10::cuda::CUDAGuard guard(input.device());
  auto x = input.contiguous();
  auto w = weight.contiguous();
  const int64_t D = x.size(-1);
  const int64_t rows = x.numel() / D;
  auto out = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  check_launch("rms_norm",
               launch_rms_norm(to_dtype(x.scalar_type()), x.const_data_ptr(), nullptr,
                               w.const_data_ptr(), out.mutable_data_ptr(), nullptr,
                               rstd.mutable_data_ptr<float>(), rows, D, static_cast<float>(eps),
                               at::cuda::getCurrentCUDAStream()));
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& input,
                                                                 const at::Tensor& residual,
                                                                 const at::Tensor& weight,
                                                                 double eps) {
  check_norm_args("add_rms_norm", input, weight);
  chk::same_dtype("add_rms_norm", "residual", residual, "input", input);
  chk::same_device("add_rms_norm", "residual", residual, "input", input);
  TORCH_CHECK_VALUE(residual.sizes() == input.sizes(), "latentmoe.add_rms_norm: argument 'residual' has shape ",
                    residual.sizes(), " but 'input' has shape ", input.sizes());
  c10::cuda::CUDAGuard guard(input.device());
  auto x = input.contiguous();
  auto res = residual.contiguous();
  auto w = weight.contiguous();
  const int64_t D = x.size(-1);
  const int64_t rows = x.numel() / D;
  auto out = at::empty_like(x);
  auto h = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  check_launch("add_rms_norm",
               launch_rms_norm(to_dtype(x.scalar_type()), x.const_data_ptr(), res.const_data_ptr(),
                               w.const_data_ptr(), out.mutable_data_ptr(), h.mutable_data_ptr(),
                               rstd.mutable_data_ptr<float>(), rows, D, static_cast<float>(eps),
                               at::cuda::getCurrentCUDAStream()));
  return {out, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out,
                                                          const at::Tensor& input,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& rstd) {
  const char* op = "rms_norm_backward";
  check_norm_args(op, input, weight);
  chk::same_dtype(op, "grad_out", grad_out, "input", input);
  chk::same_device(op, "grad_out", grad_out, "input", input);
  chk::same_device(op, "rstd", rstd, "input", input);
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes(), "latentmoe.rms_norm_backward: argument 'grad_out' has shape ",
                    grad_out.sizes(), " but 'input' has shape ", input.sizes());
  chk::dtype(op, "rstd", rstd, at::kFloat);
  TORCH_CHECK_VALUE(rstd.numel() * input.size(-1) == input.numel(),
                    "latentmoe.rms_norm_backward: argument 'rstd' must have one value per row of 'input'");
  c10::cuda::CUDAGuard guard(input.device());
  auto g = grad_out.contiguous();
  auto x = input.contiguous();
  auto w = weight.contiguous();
  auto rs = rstd.contiguous();
  const int64_t D = x.size(-1);
  const int64_t rows = x.numel() / D;
  auto gx = at::empty_like(x);
  auto partial = at::empty({rms_norm_backward_partials(rows), D}, x.options().dtype(at::kFloat));
  auto gw = at::empty({D}, x.options().dtype(at::kFloat));
  check_launch("rms_norm_backward",
               launch_rms_norm_backward(to_dtype(x.scalar_type()), g.const_data_ptr(), x.const_data_ptr(),
                                        w.const_data_ptr(), rs.const_data_ptr<float>(),
                                        gx.mutable_data_ptr(), partial.mutable_data_ptr<float>(),
                                        gw.mutable_data_ptr<float>(), rows, D,
                                        at::cuda::getCurrentCUDAStream()));
  return {gx, gw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

}  // namespace latentmoe::cuda
