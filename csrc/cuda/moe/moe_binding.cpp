// CUDA registrations of the MoE ops: argument checks (shared with CPU, csrc/cpu/moe.cpp), the
// stable permute of (token, k) pairs by expert (one counting-sort launch for small batches,
// ATen stable sort + searchsorted otherwise: no host sync),
// and the launches. The index range check of moe_experts reads min/max back to the host (one
// sync) so out-of-range ids raise a ValueError instead of reading out of bounds. The backward of
// moe_experts is the device-generic ATen implementation (per-expert GEMMs; one host sync for the
// expert offsets).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/common/binding_utils.h"
#include "cuda/moe/moe_host.h"
#include "cuda/moe/moe_launch.h"

namespace latentmoe::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k,
    int64_t n_group, int64_t topk_group, c10::string_view score_func, bool norm_topk_prob,
    double routed_scaling_factor) {
  const auto p = moe_host::check_route_args(logits, bias, top_k, n_group, topk_group,
                                            std::string(score_func), norm_topk_prob,
                                            routed_scaling_factor);
  c10::cuda::CUDAGuard guard(logits.device());
  auto l = logits.contiguous();
  std::optional<at::Tensor> b = bias.has_value() ? std::optional(bias->contiguous()) : std::nullopt;
  const int64_t T = l.size(0);
  auto weights = at::empty({T, p.top_k}, l.options());
  auto indices = at::empty({T, p.top_k}, l.options().dtype(at::kLong));
  auto scores = at::empty({T, p.num_experts}, l.options());
  // Scratch for the one-thread-per-token kernel only (E > 1024): T * E floats otherwise wasted.
  at::Tensor choice;
  if (moe_route_needs_scratch(p)) choice = at::empty({T, p.num_experts}, l.options());
  check_launch("moe_route",
               launch_moe_route(l.const_data_ptr<float>(),
                                b.has_value() ? b->const_data_ptr<float>() : nullptr, p, T,
                                scores.mutable_data_ptr<float>(),
                                choice.defined() ? choice.mutable_data_ptr<float>() : nullptr,
                                weights.mutable_data_ptr<float>(),
                                indices.mutable_data_ptr<int64_t>(),
                                at::cuda::getCurrentCUDAStream()));
  return {weights, indices, scores};
}

at::Tensor moe_route_backward_cuda(const at::Tensor& grad_weights,
                                   const std::optional<at::Tensor>& grad_scores,
                                   const at::Tensor& scores, const at::Tensor& indices,
                                   c10::string_view score_func, bool norm_topk_prob,
                                   double routed_scaling_factor) {
  moe_host::check_route_backward_args(grad_weights, grad_scores, scores, indices,
                                      std::string(score_func));
  c10::cuda::CUDAGuard guard(scores.device());
  const int64_t T = scores.size(0), E = scores.size(1), K = indices.size(1);
  moe::RouteParams p{static_cast<int>(E), static_cast<int>(K), 1, 1,
                     score_func == "sigmoid" ? moe::kSigmoid : moe::kSoftmax, norm_topk_prob,
                     static_cast<float>(routed_scaling_factor)};
  auto gw = grad_weights.contiguous();
  auto s = scores.contiguous();
  auto idx = indices.contiguous();
  std::optional<at::Tensor> gs =
      grad_scores.has_value() ? std::optional(grad_scores->contiguous()) : std::nullopt;
  auto grad_logits = at::empty({T, E}, s.options());
  check_launch("moe_route_backward",
               launch_moe_route_backward(gw.const_data_ptr<float>(),
                                         gs.has_value() ? gs->const_data_ptr<float>() : nullptr,
                                         s.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(),
                                         p, T, grad_logits.mutable_data_ptr<float>(),
                                         at::cuda::getCurrentCUDAStream()));
  return grad_logits;
}

// Whether at::_grouped_mm has its own kernel for `dtype` here (bf16 on sm90 / sm100; elsewhere it
// copies the offsets to the host and loops over the groups).
bool grouped_mm_native(at::ScalarType dtype, int device) {
  const int major = at::cuda::getDeviceProperties(device)->major;
  return dtype == at::kBFloat16 && (major == 9 || major == 10);
}

// The forward's GEMMs (LATENTMOE_MOE_FORWARD_GEMM): auto takes at::_grouped_mm where it is native
// and aligned, the experts average at least kGroupedMinRows rows (pairs per expert) and the call
// is large (S * H * I >= 2^34, about 100 GFLOP); latentmoe's WMMA kernel otherwise. Measured on an
// H200 (2026-12-04), bf16, kernel / grouped forward (HF grouped_mm):
//   h2048 i1408 E64 top-6, 384 rows per expert (T 4096): 3.24 / 2.30 ms (1.76)
//   h2048 i1408 E64 top-6,  48 rows per expert (T 512):  0.60 / 0.72 ms (0.77)
//   h1024 i512  E16 top-6, 192 rows per expert (T 512):  ~0.22 / 0.50 ms (the grouped path's
//     gather, fp32 SwiGLU and combine cost more than its GEMMs save at this size)
constexpr int64_t kGroupedMinRows = 128;
constexpr int64_t kGroupedMinWork = int64_t{1} << 34;
bool forward_grouped(at::ScalarType dtype, int device, int64_t S, int64_t E, int64_t H, int64_t I) {
  if (const auto setting = moe_host::forward_grouped_setting()) return *setting;
  return S >= kGroupedMinRows * E && S * H * I >= kGroupedMinWork && grouped_mm_native(dtype, device) &&
         moe_host::grouped_gemm_aligned(H, I, dtype);
}

// The kernels that replace the grouped forward's ATen SwiGLU and combine and the backward's
// idle-expert masked_fill (moe_host::DeviceSteps). Run on the current stream, on tensors the
// host code made (contiguous; a strided gradient falls back to the masked_fill).
const moe_host::DeviceSteps& device_steps() {
  static const moe_host::DeviceSteps steps{
      [](const at::Tensor& gate_up_out, const at::Tensor& act) {
        auto gu = gate_up_out.contiguous();
        check_launch("moe_experts", launch_moe_swiglu(to_dtype(gu.scalar_type()), gu.const_data_ptr(),
                                                      act.size(0), act.size(1), act.mutable_data_ptr(),
                                                      at::cuda::getCurrentCUDAStream()));
      },
      [](const at::Tensor& y, const at::Tensor& weights, const at::Tensor& pos, const at::Tensor& offsets,
         const at::Tensor& out) {
        auto yc = y.contiguous();
        check_launch("moe_experts",
                     launch_moe_combine(to_dtype(yc.scalar_type()), yc.const_data_ptr(), weights.const_data_ptr<float>(),
                                        pos.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                                        offsets.size(0) - 1, out.size(0), weights.size(1), out.size(1),
                                        out.mutable_data_ptr(), at::cuda::getCurrentCUDAStream()));
      },
      [](const at::Tensor& gate_up_out, const at::Tensor& gau, const at::Tensor& w_s, const at::Tensor& offsets,
         const at::Tensor& gh, const at::Tensor& grad_w_s) {
        auto gu = gate_up_out.contiguous();
        auto ga = gau.contiguous();
        auto w = w_s.contiguous();
        check_launch("moe_experts_backward",
                     launch_moe_swiglu_backward(to_dtype(gu.scalar_type()), gu.const_data_ptr(), ga.const_data_ptr(),
                                                w.const_data_ptr<float>(), offsets.const_data_ptr<int64_t>(),
                                                offsets.size(0) - 1, gh.size(0), ga.size(1), gh.mutable_data_ptr(),
                                                grad_w_s.mutable_data_ptr<float>(),
                                                at::cuda::getCurrentCUDAStream()));
      },
      [](const at::Tensor& grad, const at::Tensor& offsets) {
        const int64_t E = grad.size(0);
        if (!grad.is_contiguous()) {
          auto idle = (offsets.narrow(0, 1, E) == offsets.narrow(0, 0, E)).view({E, 1, 1});
          grad.masked_fill_(idle, 0);
          return;
        }
        const int64_t per = E == 0 ? 0 : grad.numel() / E * static_cast<int64_t>(grad.element_size());
        check_launch("moe_experts_backward",
                     launch_moe_zero_idle(grad.mutable_data_ptr(), per, offsets.const_data_ptr<int64_t>(), E,
                                          at::cuda::getCurrentCUDAStream()));
      },
  };
  return steps;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_cuda(
    const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
    const at::Tensor& weights, const at::Tensor& indices, bool check_values) {
  moe_host::check_experts_args("moe_experts", hidden, gate_up_proj, down_proj, weights, indices);
  c10::cuda::CUDAGuard guard(hidden.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t T = hidden.size(0), H = hidden.size(1), E = gate_up_proj.size(0);
  const int64_t I = gate_up_proj.size(1) / 2, K = indices.size(1), S = T * K;
  auto flat = indices.reshape({-1});
  // check_values = false: no host copy (no sync); the sort places indices outside [0, E) before
  // expert 0's rows or after the last expert's, no expert kernel touches those rows, and the
  // combine drops them.
  if (S > 0 && check_values) {
    auto [lo, hi] = at::aminmax(flat);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < E, "latentmoe.moe_experts: argument 'indices' holds ",
                      lo_v < 0 ? lo_v : hi_v, ", outside [0, E=", E, ")");
  }
  at::Tensor sorted_pairs, offsets, pos;
  if (S > 0 && S <= moe_sort_pairs_max()) {
    // Small batches (decode): one counting-sort launch instead of sort + searchsorted + scatter.
    auto ids = flat.contiguous();
    sorted_pairs = at::empty({S}, ids.options());
    offsets = at::empty({E + 1}, ids.options());
    pos = at::empty({S}, ids.options());
    check_launch("moe_experts",
                 launch_moe_sort_pairs(ids.const_data_ptr<int64_t>(), S, E,
                                       sorted_pairs.mutable_data_ptr<int64_t>(),
                                       offsets.mutable_data_ptr<int64_t>(),
                                       pos.mutable_data_ptr<int64_t>(),
                                       at::cuda::getCurrentCUDAStream()));
  } else {
    auto [sorted_ids, sp] = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    sorted_pairs = sp;
    offsets = at::searchsorted(sorted_ids, at::arange(E + 1, flat.options()));
    pos = at::empty_like(sorted_pairs).scatter_(0, sorted_pairs, at::arange(S, flat.options()));
  }
  auto x = hidden.contiguous();
  auto wgu = gate_up_proj.contiguous();
  auto wd = down_proj.contiguous();
  if (forward_grouped(x.scalar_type(), x.get_device(), S, E, H, I)) {
    auto [out, gate_up_out] = moe_host::experts_forward_grouped(x, wgu, wd, weights, sorted_pairs, offsets, pos,
                                                                 device_steps());
    return {out, sorted_pairs, offsets, gate_up_out};
  }
  auto w = weights.to(at::kFloat).contiguous();
  auto tile_start = at::empty({E + 1}, flat.options().dtype(at::kInt));
  auto gate_up_out = at::empty({S, 2 * I}, x.options());
  auto act = at::empty({S, I}, x.options());
  auto y = at::empty({S, H}, x.options());
  auto out = at::empty({T, H}, x.options());
  check_launch("moe_experts",
               launch_moe_experts(to_dtype(x.scalar_type()), x.const_data_ptr(),
                                  sorted_pairs.const_data_ptr<int64_t>(),
                                  offsets.const_data_ptr<int64_t>(), pos.const_data_ptr<int64_t>(),
                                  wgu.const_data_ptr(), wd.const_data_ptr(),
                                  w.const_data_ptr<float>(), T, K, E, H, I,
                                  tile_start.mutable_data_ptr<int>(),
                                  gate_up_out.mutable_data_ptr(), act.mutable_data_ptr(),
                                  y.mutable_data_ptr(), out.mutable_data_ptr(),
                                  at::cuda::getCurrentCUDAStream()));
  return {out, sorted_pairs, offsets, gate_up_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& sorted_pairs,
    const at::Tensor& expert_offsets, const at::Tensor& gate_up_out) {
  moe_host::check_experts_backward_args(hidden, gate_up_proj, down_proj, weights);
  c10::cuda::CUDAGuard guard(hidden.device());
  const auto setting = moe_host::backward_gemm_setting();
  auto gemms = moe_host::BackwardGemms::kLoop;
  if (setting.has_value()) {
    gemms = *setting;
  } else {
    // auto: grouped where at::_grouped_mm has its own kernel (bf16 on sm90 / sm100; elsewhere it
    // copies the offsets to the host and loops, as kLoop does) and the strides suit it.
    const int64_t I = gate_up_proj.size(1) / 2;
    if (grouped_mm_native(hidden.scalar_type(), hidden.get_device()) &&
        moe_host::grouped_gemm_aligned(hidden.size(1), I, at::kBFloat16))
      gemms = moe_host::BackwardGemms::kGrouped;
  }
  return moe_host::experts_backward(grad_out.contiguous(), hidden.contiguous(),
                                    gate_up_proj.contiguous(), down_proj.contiguous(), weights,
                                    sorted_pairs, expert_offsets, gate_up_out, gemms, device_steps());
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CUDA, m) {
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_route_backward", &moe_route_backward_cuda);
  m.impl("moe_experts", &moe_experts_cuda);
  m.impl("moe_experts_backward", &moe_experts_backward_cuda);
}

}  // namespace latentmoe::cuda
