// CUDA registrations of the RMSNorm ops: argument checks and launches.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/norm_checks.h"
#include "cuda/common/binding_utils.h"
#include "cuda/norm/norm_launch.h"

namespace latentmoe::cuda {
namespace {


std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& input, const at::Tensor& weight,
                                                 double eps) {
  norm::check_args("rms_norm", input, weight);
  norm::check_eps("rms_norm", eps);
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
  norm::check_args("add_rms_norm", input, weight);
  norm::check_residual(input, residual);
  norm::check_eps("add_rms_norm", eps);
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
  norm::check_backward_args(grad_out, input, weight, rstd);
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
