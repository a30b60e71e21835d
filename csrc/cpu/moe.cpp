// MoE CPU kernels: DeepSeek-V3 routing (math in common/moe_math.h, shared with CUDA) and the
// routed SwiGLU experts: counting-sort permute of (token, k) pairs by expert, one ATen GEMM per
// active expert for gate_up and for down (BLAS / oneDNN, bf16 via the CPU's bf16 paths), the
// SwiGLU fused in one pass between them, and a weighted combine back to token order that sums
// each token's k rows in k order (bitwise deterministic, no atomics). Also the device-generic
// host helpers of csrc/cuda/moe/moe_host.h (checks, the ATen backward of moe_experts).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/checks.h"
#include "common/moe_math.h"
#include "cuda/moe/moe_host.h"

namespace latentmoe {

namespace chk = latentmoe::checks;

namespace {
// GEMM into a view (a slice of a larger buffer): out = a @ b.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }
}  // namespace

namespace moe_host {

moe::RouteParams check_route_args(const at::Tensor& logits,
                                  const std::optional<at::Tensor>& bias, int64_t top_k,
                                  int64_t n_group, int64_t topk_group,
                                  const std::string& score_func, bool norm_topk_prob,
                                  double routed_scaling_factor) {
  const char* op = "moe_route";
  chk::dim(op, "logits", logits, 2);
  chk::dtype(op, "logits", logits, at::kFloat);
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(E > 0, "latentmoe.moe_route: argument 'logits' has no experts (shape ",
                    logits.sizes(), ")");
  if (bias.has_value()) {
    chk::dim(op, "e_score_correction_bias", *bias, 1);
    chk::dtype(op, "e_score_correction_bias", *bias, at::kFloat);
    chk::size(op, "e_score_correction_bias", *bias, 0, E, "number of experts");
    chk::same_device(op, "e_score_correction_bias", *bias, "logits", logits);
  }
  TORCH_CHECK_VALUE(score_func == "sigmoid" || score_func == "softmax",
                    "latentmoe.moe_route: argument 'score_func' must be 'sigmoid' or 'softmax', got '",
                    score_func, "'");
  TORCH_CHECK_VALUE(n_group >= 1 && n_group <= 64 && E % n_group == 0,
                    "latentmoe.moe_route: argument 'n_group' (", n_group,
                    ") must be in [1, 64] and divide the number of experts E=", E);
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group,
                    "latentmoe.moe_route: argument 'topk_group' (", topk_group,
                    ") must be in [1, n_group=", n_group, "]");
  const int64_t kept = topk_group * (E / n_group);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= kept, "latentmoe.moe_route: argument 'top_k' (", top_k,
                    ") must be in [1, topk_group * E / n_group = ", kept, "] (E=", E, ")");
  return moe::RouteParams{static_cast<int>(E),
                          static_cast<int>(top_k),
                          static_cast<int>(n_group),
                          static_cast<int>(topk_group),
                          score_func == "sigmoid" ? moe::kSigmoid : moe::kSoftmax,
                          norm_topk_prob,
                          static_cast<float>(routed_scaling_factor)};
}

void check_route_backward_args(const at::Tensor& grad_weights,
                               const std::optional<at::Tensor>& grad_scores,
                               const at::Tensor& scores, const at::Tensor& indices) {
  const char* op = "moe_route_backward";
  chk::dim(op, "scores", scores, 2);
  chk::dtype(op, "scores", scores, at::kFloat);
  chk::dim(op, "indices", indices, 2);
  chk::dtype(op, "indices", indices, at::kLong);
  chk::size(op, "indices", indices, 0, scores.size(0), "tokens");
  chk::dim(op, "grad_weights", grad_weights, 2);
  chk::dtype(op, "grad_weights", grad_weights, at::kFloat);
  TORCH_CHECK_VALUE(grad_weights.sizes() == indices.sizes(),
                    "latentmoe.moe_route_backward: argument 'grad_weights' has shape ",
                    grad_weights.sizes(), " but 'indices' has shape ", indices.sizes());
  chk::same_device(op, "indices", indices, "scores", scores);
  chk::same_device(op, "grad_weights", grad_weights, "scores", scores);
  if (grad_scores.has_value()) {
    chk::dtype(op, "grad_scores", *grad_scores, at::kFloat);
    TORCH_CHECK_VALUE(grad_scores->sizes() == scores.sizes(),
                      "latentmoe.moe_route_backward: argument 'grad_scores' has shape ",
                      grad_scores->sizes(), " but 'scores' has shape ", scores.sizes());
    chk::same_device(op, "grad_scores", *grad_scores, "scores", scores);
  }
}

void check_experts_args(const char* op, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
                        const at::Tensor& down_proj, const at::Tensor& weights,
                        const at::Tensor& indices) {
  chk::dim(op, "hidden", hidden, 2);
  chk::floating(op, "hidden", hidden);
  chk::dim(op, "gate_up_proj", gate_up_proj, 3);
  chk::dim(op, "down_proj", down_proj, 3);
  chk::same_dtype(op, "gate_up_proj", gate_up_proj, "hidden", hidden);
  chk::same_dtype(op, "down_proj", down_proj, "hidden", hidden);
  const int64_t H = hidden.size(1);
  const int64_t E = gate_up_proj.size(0);
  chk::size(op, "gate_up_proj", gate_up_proj, 2, H, "hidden size");
  TORCH_CHECK_VALUE(gate_up_proj.size(1) % 2 == 0 && gate_up_proj.size(1) > 0, "latentmoe.", op,
                    ": argument 'gate_up_proj' dim 1 must be 2 * intermediate size, got shape ",
                    gate_up_proj.sizes());
  const int64_t I = gate_up_proj.size(1) / 2;
  chk::size(op, "down_proj", down_proj, 0, E, "number of experts");
  chk::size(op, "down_proj", down_proj, 1, H, "hidden size");
  chk::size(op, "down_proj", down_proj, 2, I, "intermediate size");
  chk::dim(op, "indices", indices, 2);
  chk::dtype(op, "indices", indices, at::kLong);
  chk::size(op, "indices", indices, 0, hidden.size(0), "tokens");
  chk::dim(op, "weights", weights, 2);
  TORCH_CHECK_VALUE(weights.sizes() == indices.sizes(), "latentmoe.", op,
                    ": argument 'weights' has shape ", weights.sizes(), " but 'indices' has shape ",
                    indices.sizes());
  TORCH_CHECK_VALUE(weights.scalar_type() == at::kFloat ||
                        weights.scalar_type() == hidden.scalar_type(),
                    "latentmoe.", op, ": argument 'weights' must be float32 or hidden's dtype (",
                    hidden.scalar_type(), "), got ", weights.scalar_type());
  chk::same_device(op, "gate_up_proj", gate_up_proj, "hidden", hidden);
  chk::same_device(op, "down_proj", down_proj, "hidden", hidden);
  chk::same_device(op, "weights", weights, "hidden", hidden);
  chk::same_device(op, "indices", indices, "hidden", hidden);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& sorted_pairs,
    const at::Tensor& expert_offsets, const at::Tensor& gate_up_out) {
  const char* op = "moe_experts_backward";
  // The ATen calls below are our implementation, not something to differentiate.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t T = hidden.size(0), H = hidden.size(1), E = gate_up_proj.size(0);
  const int64_t I = gate_up_proj.size(1) / 2;
  const int64_t K = weights.size(1), S = T * K;
  chk::same_dtype(op, "grad_out", grad_out, "hidden", hidden);
  TORCH_CHECK_VALUE(grad_out.sizes() == hidden.sizes(), "latentmoe.moe_experts_backward: argument 'grad_out' has shape ",
                    grad_out.sizes(), " but 'hidden' has shape ", hidden.sizes());
  chk::same_device(op, "grad_out", grad_out, "hidden", hidden);
  chk::dtype(op, "sorted_pairs", sorted_pairs, at::kLong);
  TORCH_CHECK_VALUE(sorted_pairs.dim() == 1 && sorted_pairs.size(0) == S,
                    "latentmoe.moe_experts_backward: argument 'sorted_pairs' must be [T*k]");
  chk::dtype(op, "expert_offsets", expert_offsets, at::kLong);
  TORCH_CHECK_VALUE(expert_offsets.dim() == 1 && expert_offsets.size(0) == E + 1,
                    "latentmoe.moe_experts_backward: argument 'expert_offsets' must be [E+1]");
  chk::same_dtype(op, "gate_up_out", gate_up_out, "hidden", hidden);
  TORCH_CHECK_VALUE(gate_up_out.dim() == 2 && gate_up_out.size(0) == S && gate_up_out.size(1) == 2 * I,
                    "latentmoe.moe_experts_backward: argument 'gate_up_out' must be [T*k, 2I]");
  const auto dt = hidden.scalar_type();
  auto off = expert_offsets.to(at::kCPU);
  const int64_t* op_ = off.const_data_ptr<int64_t>();
  auto tok = at::div(sorted_pairs, K, "floor");
  auto w_s = weights.reshape({-1}).to(at::kFloat).index_select(0, sorted_pairs).unsqueeze(1);
  auto xs = hidden.index_select(0, tok);
  auto gy = grad_out.index_select(0, tok);
  auto g = gate_up_out.narrow(1, 0, I).to(at::kFloat);
  auto u = gate_up_out.narrow(1, I, I).to(at::kFloat);
  auto sig = at::sigmoid(g);
  auto silu = g * sig;
  auto act = (silu * u).to(dt);
  auto gyw = (gy.to(at::kFloat) * w_s).to(dt);
  auto ga_unweighted = at::empty({S, I}, hidden.options());
  auto grad_gu = at::zeros_like(gate_up_proj);
  auto grad_down = at::zeros_like(down_proj);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t o = op_[e], m = op_[e + 1] - op_[e];
    if (m == 0) continue;
    mm_into(ga_unweighted.narrow(0, o, m), gy.narrow(0, o, m), down_proj[e]);
    mm_into(grad_down[e], gyw.narrow(0, o, m).t(), act.narrow(0, o, m));
  }
  auto gau = ga_unweighted.to(at::kFloat);
  auto grad_w_s = (gau * act.to(at::kFloat)).sum(1);
  auto ga = gau * w_s;
  auto gh = at::cat({ga * u * sig * (1 + g * (1 - sig)), ga * silu}, 1).to(dt);
  auto gxs = at::empty({S, H}, hidden.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t o = op_[e], m = op_[e + 1] - op_[e];
    if (m == 0) continue;
    mm_into(grad_gu[e], gh.narrow(0, o, m).t(), xs.narrow(0, o, m));
    mm_into(gxs.narrow(0, o, m), gh.narrow(0, o, m), gate_up_proj[e]);
  }
  auto inv = at::empty_like(sorted_pairs).index_put_({sorted_pairs},
                                                     at::arange(S, sorted_pairs.options()));
  // Each token's k rows summed in k order (a fixed-order reduction, no atomics).
  auto grad_hidden = gxs.index_select(0, inv).view({T, K, H}).to(at::kFloat).sum(1).to(dt);
  auto grad_weights = grad_w_s.index_select(0, inv).view({T, K}).to(weights.scalar_type());
  return {grad_hidden, grad_gu, grad_down, grad_weights};
}

}  // namespace moe_host

namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k,
    int64_t n_group, int64_t topk_group, c10::string_view score_func, bool norm_topk_prob,
    double routed_scaling_factor) {
  const auto p = moe_host::check_route_args(logits, bias, top_k, n_group, topk_group,
                                            std::string(score_func), norm_topk_prob,
                                            routed_scaling_factor);
  auto l = logits.contiguous();
  std::optional<at::Tensor> b = bias.has_value() ? std::optional(bias->contiguous()) : std::nullopt;
  const int64_t T = l.size(0), E = p.num_experts, K = p.top_k;
  auto weights = at::empty({T, K}, l.options());
  auto indices = at::empty({T, K}, l.options().dtype(at::kLong));
  auto scores = at::empty({T, E}, l.options());
  const float* lp = l.const_data_ptr<float>();
  const float* bp = b.has_value() ? b->const_data_ptr<float>() : nullptr;
  float* wp = weights.mutable_data_ptr<float>();
  int64_t* ip = indices.mutable_data_ptr<int64_t>();
  float* sp = scores.mutable_data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> choice(E);
    for (int64_t t = begin; t < end; ++t)
      moe::route_token(lp + t * E, bp, p, sp + t * E, choice.data(), wp + t * K, ip + t * K);
  });
  return {weights, indices, scores};
}

at::Tensor moe_route_backward_cpu(const at::Tensor& grad_weights,
                                  const std::optional<at::Tensor>& grad_scores,
                                  const at::Tensor& scores, const at::Tensor& indices,
                                  c10::string_view score_func, bool norm_topk_prob,
                                  double routed_scaling_factor) {
  moe_host::check_route_backward_args(grad_weights, grad_scores, scores, indices);
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
  const float* gwp = gw.const_data_ptr<float>();
  const float* gsp = gs.has_value() ? gs->const_data_ptr<float>() : nullptr;
  const float* spp = s.const_data_ptr<float>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  float* gl = grad_logits.mutable_data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      moe::route_token_backward(gwp + t * K, gsp != nullptr ? gsp + t * E : nullptr,
                                spp + t * E, ip + t * K, p, gl + t * E);
  });
  return grad_logits;
}

// Counting sort of the T*K (token, k) pairs by expert; stable, so pairs of one expert keep
// ascending pair order. Fills sorted_pairs [S] and offsets [E+1]; rejects out-of-range ids.
void sort_pairs_by_expert(const int64_t* ids, int64_t S, int64_t E, int64_t* sorted_pairs,
                          int64_t* offsets) {
  std::vector<int64_t> cursor(E + 1, 0);
  for (int64_t p = 0; p < S; ++p) {
    const int64_t e = ids[p];
    TORCH_CHECK_VALUE(e >= 0 && e < E, "latentmoe.moe_experts: argument 'indices' holds ", e,
                      " at flat position ", p, ", outside [0, E=", E, ")");
    ++cursor[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) cursor[e + 1] += cursor[e];
  for (int64_t e = 0; e <= E; ++e) offsets[e] = cursor[e];
  for (int64_t p = 0; p < S; ++p) sorted_pairs[cursor[ids[p]]++] = p;
}

template <typename T>
void swiglu_rows(const T* gate_up, T* act, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* g = gate_up + r * 2 * I;
      const T* u = g + I;
      T* a = act + r * I;
      for (int64_t i = 0; i < I; ++i)
        a[i] = static_cast<T>(moe::swiglu(static_cast<float>(g[i]), static_cast<float>(u[i])));
    }
  });
}

// out[t] = sum_k w[t,k] * y[pos[t*K+k]], fp32 accumulation in k order.
template <typename T>
void combine_rows(const T* y, const float* w, const int64_t* pos, T* out, int64_t n_tokens,
                  int64_t K, int64_t H) {
  at::parallel_for(0, n_tokens, 4, [&](int64_t b, int64_t e) {
    std::vector<float> acc(H);
    for (int64_t t = b; t < e; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float wk = w[t * K + k];
        const T* yr = y + pos[t * K + k] * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) acc[h] += wk * static_cast<float>(yr[h]);
      }
      T* o = out + t * H;
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) o[h] = static_cast<T>(acc[h]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_cpu(
    const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
    const at::Tensor& weights, const at::Tensor& indices) {
  moe_host::check_experts_args("moe_experts", hidden, gate_up_proj, down_proj, weights, indices);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inner ATen GEMMs are implementation
  const int64_t T = hidden.size(0), H = hidden.size(1), E = gate_up_proj.size(0);
  const int64_t I = gate_up_proj.size(1) / 2, K = indices.size(1), S = T * K;
  auto x = hidden.contiguous();
  auto wgu = gate_up_proj.contiguous();
  auto wd = down_proj.contiguous();
  auto w = weights.to(at::kFloat).contiguous();
  auto idx = indices.contiguous();
  auto sorted_pairs = at::empty({S}, idx.options());
  auto offsets = at::empty({E + 1}, idx.options());
  int64_t* spp = sorted_pairs.mutable_data_ptr<int64_t>();
  const int64_t* off = offsets.mutable_data_ptr<int64_t>();
  sort_pairs_by_expert(idx.const_data_ptr<int64_t>(), S, E, spp, offsets.mutable_data_ptr<int64_t>());
  std::vector<int64_t> pos(S);
  for (int64_t i = 0; i < S; ++i) pos[spp[i]] = i;

  auto xs = at::empty({S, H}, x.options());
  auto gate_up_out = at::empty({S, 2 * I}, x.options());
  auto act = at::empty({S, I}, x.options());
  auto y = at::empty({S, H}, x.options());
  auto out = at::empty({T, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_experts_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* xsp = xs.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, S, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        std::memcpy(xsp + i * H, xp + (spp[i] / K) * H, H * sizeof(scalar_t));
    });
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = off[e], m = off[e + 1] - off[e];
      if (m == 0) continue;  // idle experts cost nothing
      auto gu_e = gate_up_out.narrow(0, o, m);
      mm_into(gu_e, xs.narrow(0, o, m), wgu[e].t());
      swiglu_rows<scalar_t>(gu_e.const_data_ptr<scalar_t>(),
                            act.mutable_data_ptr<scalar_t>() + o * I, m, I);
      mm_into(y.narrow(0, o, m), act.narrow(0, o, m), wd[e].t());
    }
    combine_rows<scalar_t>(y.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(), pos.data(),
                           out.mutable_data_ptr<scalar_t>(), T, K, H);
  });
  return {out, sorted_pairs, offsets, gate_up_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& sorted_pairs,
    const at::Tensor& expert_offsets, const at::Tensor& gate_up_out) {
  moe_host::check_experts_args("moe_experts_backward", hidden, gate_up_proj, down_proj, weights,
                               at::empty({hidden.size(0), weights.size(1)},
                                         hidden.options().dtype(at::kLong)));
  return moe_host::experts_backward(grad_out.contiguous(), hidden.contiguous(),
                                    gate_up_proj.contiguous(), down_proj.contiguous(), weights,
                                    sorted_pairs, expert_offsets, gate_up_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CPU, m) {
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_route_backward", &moe_route_backward_cpu);
  m.impl("moe_experts", &moe_experts_cpu);
  m.impl("moe_experts_backward", &moe_experts_backward_cpu);
}

}  // namespace cpu
}  // namespace latentmoe
