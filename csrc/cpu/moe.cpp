// MoE CPU kernels: DeepSeek-V3 routing (math in common/moe_math.h, shared with CUDA) and the
// routed SwiGLU experts: counting-sort permute of (token, k) pairs by expert; experts run
// concurrently, one thread each doing gate_up GEMM -> SwiGLU -> down GEMM (an AVX2 GEMM for
// fp32 compute, bf16dp's vdpbf16ps GEMMs for bf16 on AVX512_BF16 CPUs (cpu/gemm_bf16.h), else
// single-threaded BLAS / oneDNN), with multi-threaded GEMMs for an expert too
// large to share out and a weight-streaming path for experts with a few rows; then a weighted
// combine back to token order that sums each token's k rows in k order (bitwise deterministic,
// no atomics). Also the device-generic host helpers of csrc/cuda/moe/moe_host.h (checks, the
// ATen backward of moe_experts).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/Version.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/moe_math.h"
#include "common/settings.h"
#include "cpu/gemm_bf16.h"
#include "cpu/huge_pages.h"
#include "cpu/moe_common.h"
#include "cpu/vec8.h"
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
  TORCH_CHECK_VALUE(std::isfinite(routed_scaling_factor),
                    "latentmoe.moe_route: argument 'routed_scaling_factor' must be finite, got ", routed_scaling_factor);
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
                               const at::Tensor& scores, const at::Tensor& indices,
                               const std::string& score_func) {
  const char* op = "moe_route_backward";
  TORCH_CHECK_VALUE(score_func == "sigmoid" || score_func == "softmax",
                    "latentmoe.moe_route_backward: argument 'score_func' must be 'sigmoid' or 'softmax', got '",
                    score_func, "'");
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
  // No experts: every pair would be out of range (and check_values=False kernels would read the
  // empty weights).
  TORCH_CHECK_VALUE(E > 0, "latentmoe.", op, ": argument 'gate_up_proj' holds no experts (dim 0 is 0)");
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

void check_experts_backward_args(const at::Tensor& hidden, const at::Tensor& gate_up_proj,
                                 const at::Tensor& down_proj, const at::Tensor& weights) {
  // Ranks first: the stand-in below reads hidden.size(0) and weights.size(1).
  chk::dim("moe_experts_backward", "hidden", hidden, 2);
  chk::dim("moe_experts_backward", "weights", weights, 2);
  // Indices of the right shape stand in for the ones the forward already validated.
  check_experts_args("moe_experts_backward", hidden, gate_up_proj, down_proj, weights,
                     at::empty({hidden.size(0), weights.size(1)}, hidden.options().dtype(at::kLong)));
}

void check_experts_backward_tensors(const at::Tensor& grad_out, const at::Tensor& hidden,
                                    const at::Tensor& gate_up_proj, const at::Tensor& weights,
                                    const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets,
                                    const at::Tensor& gate_up_out) {
  const char* op = "moe_experts_backward";
  const int64_t E = gate_up_proj.size(0), I = gate_up_proj.size(1) / 2;
  const int64_t S = hidden.size(0) * weights.size(1);
  chk::same_dtype(op, "grad_out", grad_out, "hidden", hidden);
  TORCH_CHECK_VALUE(grad_out.sizes() == hidden.sizes(), "latentmoe.moe_experts_backward: argument 'grad_out' has shape ",
                    grad_out.sizes(), " but 'hidden' has shape ", hidden.sizes());
  chk::same_device(op, "grad_out", grad_out, "hidden", hidden);
  chk::dtype(op, "sorted_pairs", sorted_pairs, at::kLong);
  chk::same_device(op, "sorted_pairs", sorted_pairs, "hidden", hidden);
  TORCH_CHECK_VALUE(sorted_pairs.dim() == 1 && sorted_pairs.size(0) == S,
                    "latentmoe.moe_experts_backward: argument 'sorted_pairs' must be [T*k]");
  chk::dtype(op, "expert_offsets", expert_offsets, at::kLong);
  chk::same_device(op, "expert_offsets", expert_offsets, "hidden", hidden);
  TORCH_CHECK_VALUE(expert_offsets.dim() == 1 && expert_offsets.size(0) == E + 1,
                    "latentmoe.moe_experts_backward: argument 'expert_offsets' must be [E+1]");
  chk::same_dtype(op, "gate_up_out", gate_up_out, "hidden", hidden);
  chk::same_device(op, "gate_up_out", gate_up_out, "hidden", hidden);
  TORCH_CHECK_VALUE(gate_up_out.dim() == 2 && gate_up_out.size(0) == S && gate_up_out.size(1) == 2 * I,
                    "latentmoe.moe_experts_backward: argument 'gate_up_out' must be [T*k, 2I]");
}

std::optional<BackwardGemms> backward_gemm_setting() {
  switch (settings::choice("moe_experts_backward", "LATENTMOE_MOE_BACKWARD_GEMM", {"auto", "grouped", "loop"})) {
    case 1: return BackwardGemms::kGrouped;
    case 2: return BackwardGemms::kLoop;
    default: return std::nullopt;
  }
}

bool grouped_gemm_aligned(int64_t H, int64_t I, at::ScalarType dtype) {
  const int64_t es = static_cast<int64_t>(c10::elementSize(dtype));
  return (H * es) % 16 == 0 && (I * es) % 16 == 0;
}

std::optional<bool> forward_grouped_setting() {
  switch (settings::choice("moe_experts", "LATENTMOE_MOE_FORWARD_GEMM", {"auto", "grouped", "kernel"})) {
    case 1: return true;
    case 2: return false;
    default: return std::nullopt;
  }
}

std::tuple<at::Tensor, at::Tensor> experts_forward_grouped(
    const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
    const at::Tensor& weights, const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets,
    const at::Tensor& pos, const DeviceSteps& steps) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // (implementation, not to differentiate)
  const int64_t T = hidden.size(0), H = hidden.size(1), E = gate_up_proj.size(0);
  const int64_t I = gate_up_proj.size(1) / 2, K = weights.size(1), S = T * K;
  const auto dt = hidden.scalar_type();
  if (S == 0) return {at::zeros({T, H}, hidden.options()), at::empty({0, 2 * I}, hidden.options())};  // no GEMM
  TORCH_CHECK_VALUE(grouped_gemm_aligned(H, I, dt),
                    "latentmoe.moe_experts: the grouped GEMMs (LATENTMOE_MOE_FORWARD_GEMM=grouped) need the "
                    "hidden size and the intermediate size to be multiples of 16 bytes in ", dt, "; got H=", H,
                    ", I=", I);
  const auto ends = expert_offsets.narrow(0, 1, E).to(at::kInt);
  const auto xs = hidden.index_select(0, at::div(sorted_pairs, K, "floor"));
  // [S, H] @ [E, H, 2I] per group (rows past the last group are left unwritten; masked below).
  auto gate_up_out = at::_grouped_mm(xs, gate_up_proj.transpose(1, 2), ends);
  at::Tensor act;
  if (steps.swiglu) {
    act = at::empty({S, I}, hidden.options());
    steps.swiglu(gate_up_out, act);
  } else {
    const auto g = gate_up_out.narrow(1, 0, I).to(at::kFloat);
    act = (g * at::sigmoid(g) * gate_up_out.narrow(1, I, I).to(at::kFloat)).to(dt);
  }
  const auto y = at::_grouped_mm(act, down_proj.transpose(1, 2), ends);  // [S, I] @ [E, I, H]
  if (steps.combine) {
    auto out = at::empty({T, H}, hidden.options());
    steps.combine(y, weights.to(at::kFloat).contiguous(), pos, expert_offsets, out);
    return {out, gate_up_out};
  }
  const auto kept = ((pos >= expert_offsets.select(0, 0)) & (pos < expert_offsets.select(0, E))).view({T, K, 1});
  const auto yp = y.index_select(0, pos).to(at::kFloat).view({T, K, H});
  const auto w = weights.to(at::kFloat).reshape({T, K, 1});
  // where, not a multiply by 0: a dropped pair's row may hold anything (NaN included).
  auto out = at::where(kept, yp * w, at::zeros({}, yp.options())).sum(1).to(dt);
  return {out, gate_up_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& sorted_pairs,
    const at::Tensor& expert_offsets, const at::Tensor& gate_up_out, BackwardGemms gemms,
    const DeviceSteps& steps) {
  // The ATen calls below are our implementation, not something to differentiate.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  check_experts_backward_tensors(grad_out, hidden, gate_up_proj, weights, sorted_pairs, expert_offsets,
                                 gate_up_out);
  const int64_t T = hidden.size(0), H = hidden.size(1), E = gate_up_proj.size(0);
  const int64_t I = gate_up_proj.size(1) / 2;
  const int64_t K = weights.size(1), S = T * K;
  const auto dt = hidden.scalar_type();
  const bool grouped = gemms == BackwardGemms::kGrouped;
  TORCH_CHECK_VALUE(!grouped || grouped_gemm_aligned(H, I, dt),
                    "latentmoe.moe_experts_backward: the grouped GEMMs (LATENTMOE_MOE_BACKWARD_GEMM=grouped) need "
                    "the hidden size and the intermediate size to be multiples of 16 bytes in ", dt, "; got H=", H,
                    ", I=", I);
  // Group ends over the sorted rows, as at::_grouped_mm takes them (int32, on the device); the
  // loop reads the offsets on the host instead.
  at::Tensor ends, off;
  const int64_t* op_ = nullptr;
  if (grouped) {
    ends = expert_offsets.narrow(0, 1, E).to(at::kInt);
  } else {
    off = expert_offsets.to(at::kCPU).contiguous();
    op_ = off.const_data_ptr<int64_t>();
  }
  auto tok = at::div(sorted_pairs, K, "floor");
  auto w_s = weights.reshape({-1}).to(at::kFloat).index_select(0, sorted_pairs).unsqueeze(1);
  auto xs = hidden.index_select(0, tok);
  auto gy = grad_out.index_select(0, tok);
  // The SwiGLU's fp32 pieces, for the ATen steps only (a device step recomputes them per row).
  const bool fused = static_cast<bool>(steps.swiglu) && static_cast<bool>(steps.swiglu_backward);
  at::Tensor g, u, sig, silu, act;
  if (fused) {
    act = at::empty({S, I}, hidden.options());
    if (S > 0) steps.swiglu(gate_up_out, act);
  } else {
    g = gate_up_out.narrow(1, 0, I).to(at::kFloat);
    u = gate_up_out.narrow(1, I, I).to(at::kFloat);
    sig = at::sigmoid(g);
    silu = g * sig;
    act = (silu * u).to(dt);
  }
  auto gyw = (gy.to(at::kFloat) * w_s).to(dt);
  // Pairs outside [expert_offsets[0], expert_offsets[E]): ids out of range, which a CUDA forward
  // with check_values=False sorted before expert 0 or after expert E-1 and dropped (their
  // gate_up_out rows were never written). They get no gradient, and must not join expert 0's
  // group in at::_grouped_mm (which starts at row 0). A device mask: no host sync.
  const auto rows = at::arange(S, expert_offsets.options());
  const auto dropped = ((rows < expert_offsets.select(0, 0)) | (rows >= expert_offsets.select(0, E))).unsqueeze(1);
  act.masked_fill_(dropped, 0);
  gyw.masked_fill_(dropped, 0);
  // A total of 0 rows is no GEMM at all (at::_grouped_mm rejects an empty jagged dimension).
  const bool grouped_rows = grouped && S > 0;
  at::Tensor ga_unweighted, grad_down, grad_gu;
  if (grouped_rows) {
    ga_unweighted = at::_grouped_mm(gy, down_proj, ends);  // [S, H] @ [E, H, I] per group
    grad_down = at::_grouped_mm(gyw.t(), act, ends);       // [H, S] @ [S, I], K jagged: [E, H, I]
  } else {
    ga_unweighted = at::empty({S, I}, hidden.options());
    grad_gu = at::zeros_like(gate_up_proj);
    grad_down = at::zeros_like(down_proj);
  }
  for (int64_t e = 0; !grouped && e < E; ++e) {
    const int64_t o = op_[e], m = op_[e + 1] - op_[e];
    if (m == 0) continue;
    mm_into(ga_unweighted.narrow(0, o, m), gy.narrow(0, o, m), down_proj[e]);
    mm_into(grad_down[e], gyw.narrow(0, o, m).t(), act.narrow(0, o, m));
  }
  at::Tensor gh, grad_w_s;
  if (fused) {
    gh = at::empty({S, 2 * I}, hidden.options());
    grad_w_s = at::empty({S}, hidden.options().dtype(at::kFloat));
    steps.swiglu_backward(gate_up_out, ga_unweighted, w_s.view({S}), expert_offsets, gh, grad_w_s);
  } else {
    auto gau = ga_unweighted.to(at::kFloat);
    grad_w_s = (gau * act.to(at::kFloat)).sum(1);
    auto ga = gau * w_s;
    gh = at::cat({ga * u * sig * (1 + g * (1 - sig)), ga * silu}, 1).to(dt).masked_fill_(dropped, 0);
    grad_w_s.masked_fill_(dropped.squeeze(1), 0);
  }
  at::Tensor gxs;
  if (grouped_rows) {
    grad_gu = at::_grouped_mm(gh.t(), xs, ends);      // [2I, S] @ [S, H], K jagged: [E, 2I, H]
    gxs = at::_grouped_mm(gh, gate_up_proj, ends);    // [S, 2I] @ [E, 2I, H] per group
    // Experts with no rows get zero weight gradients here, not whatever the kernel leaves in an
    // empty group (public reports: non-zero on sm100). A masked_fill over both whole gradients
    // took 1.5 ms of a 3.5 ms bf16 training step on an H200 (h2048 i1408 E64, T 512); the
    // device step touches only the idle experts' slices.
    if (steps.zero_idle) {
      steps.zero_idle(grad_down, expert_offsets);
      steps.zero_idle(grad_gu, expert_offsets);
    } else {
      auto idle = (expert_offsets.narrow(0, 1, E) == expert_offsets.narrow(0, 0, E)).view({E, 1, 1});
      grad_down.masked_fill_(idle, 0);
      grad_gu.masked_fill_(idle, 0);
    }
  } else {
    gxs = at::empty({S, H}, hidden.options());
  }
  for (int64_t e = 0; !grouped && e < E; ++e) {
    const int64_t o = op_[e], m = op_[e + 1] - op_[e];
    if (m == 0) continue;
    mm_into(grad_gu[e], gh.narrow(0, o, m).t(), xs.narrow(0, o, m));
    mm_into(gxs.narrow(0, o, m), gh.narrow(0, o, m), gate_up_proj[e]);
  }
  gxs.masked_fill_(dropped, 0);  // (the loop leaves those rows unwritten)
  // zeros, not empty: were a pair repeated (CUDA does not check the sort), a slot no pair names
  // would otherwise hold garbage, then be read as an index.
  auto inv = at::zeros_like(sorted_pairs).index_put_({sorted_pairs},
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
  moe_host::check_route_backward_args(grad_weights, grad_scores, scores, indices,
                                      std::string(score_func));
  const int64_t T = scores.size(0), E = scores.size(1), K = indices.size(1);
  auto idx = chk::private_copy(indices);  // checked below, then read: not a tensor others may write
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < T * K; ++i)
    TORCH_CHECK_VALUE(ip[i] >= 0 && ip[i] < E, "latentmoe.moe_route_backward: argument 'indices' holds ",
                      ip[i], ", outside [0, E=", E, ")");
  moe::RouteParams p{static_cast<int>(E), static_cast<int>(K), 1, 1,
                     score_func == "sigmoid" ? moe::kSigmoid : moe::kSoftmax, norm_topk_prob,
                     static_cast<float>(routed_scaling_factor)};
  auto gw = grad_weights.contiguous();
  auto s = scores.contiguous();
  std::optional<at::Tensor> gs =
      grad_scores.has_value() ? std::optional(grad_scores->contiguous()) : std::nullopt;
  auto grad_logits = at::empty({T, E}, s.options());
  const float* gwp = gw.const_data_ptr<float>();
  const float* gsp = gs.has_value() ? gs->const_data_ptr<float>() : nullptr;
  const float* spp = s.const_data_ptr<float>();
  float* gl = grad_logits.mutable_data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      moe::route_token_backward(gwp + t * K, gsp != nullptr ? gsp + t * E : nullptr,
                                spp + t * E, ip + t * K, p, gl + t * E);
  });
  return grad_logits;
}


// Rows with at most this many tokens use the bandwidth-bound small-M path (each weight row is
// streamed once and dotted with every token row) instead of a BLAS call.
constexpr int64_t kSmallM = 4;

// Dot products of the small-M path, fp32 a with fp32 or bf16 b (bf16 -> fp32 is a 16-bit shift).
// The extension is built without -march: an AVX2+FMA instantiation and a portable one, picked by
// CPU feature (vec8::use_avx2), so AMD and Intel CPUs alike get the vector code.
// Four independent 8-lane accumulators: one chain of dependent FMAs would cap a core at one
// vector per FMA latency (~20 GB/s of weights), well below the memory's rate.
template <typename TW, bool kAvx>
LMOE_V8_INLINE float dot_body(const float* a, const TW* b, int64_t n) {
  vec8::v8f acc[4] = {vec8::splat(0.f), vec8::splat(0.f), vec8::splat(0.f), vec8::splat(0.f)};
  int64_t k = 0;
  for (; k + 32 <= n; k += 32)
    for (int u = 0; u < 4; ++u) acc[u] += vec8::load(a + k + 8 * u) * vec8::load_f32<TW, kAvx>(b + k + 8 * u);
  for (; k + 8 <= n; k += 8) acc[0] += vec8::load(a + k) * vec8::load_f32<TW, kAvx>(b + k);
  float s = vec8::hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; k < n; ++k) s += a[k] * static_cast<float>(b[k]);
  return s;
}

template <typename TW>
LMOE_CPU_AVX2 float dot_avx2(const float* a, const TW* b, int64_t n) {
  return dot_body<TW, true>(a, b, n);
}
template <typename TW>
float dot_generic(const float* a, const TW* b, int64_t n) {
  return dot_body<TW, false>(a, b, n);
}

// bf16 weights without any shuffle: 16 bf16 read as 8 32-bit lanes hold the even elements in
// their low halves and the odd ones in their high halves, so (lane << 16) and (lane & 0xFFFF0000)
// are the fp32 values of elements 0, 2, .., 14 and 1, 3, .., 15. `a` comes pre-split to match
// (split_pairs); the last n % 16 elements stay in order.
// One block of 16 elements into one pair of accumulators (even and odd halves).
LMOE_V8_INLINE void dot_bf16_split_step(const float* a, const uint16_t* b, int64_t k, vec8::v8f& lo,
                                        vec8::v8f& hi) {
  const vec8::v8u w = vec8::load_u32x8(b + k);
  const vec8::v8u wl = w << 16, wh = w & 0xFFFF0000u;
  lo += vec8::load(a + k) * reinterpret_cast<const vec8::v8f&>(wl);
  hi += vec8::load(a + k + 8) * reinterpret_cast<const vec8::v8f&>(wh);
}

// a . b[:n] for one bf16 weight row: two blocks of 16 per step into two pairs of accumulators
// (four independent FMA chains). One weight row at a time, so a thread's weights stream as one
// sequential read, as dot_bf16dp's do: 4 rows at a time (4 streams 2 KiB apart) ran 1.5-1.8x
// the weight-streaming floor at T = 1 (bf16, h1024 / i704 / E = 64, 2 Zen 3 cores without
// AVX-512, weights from memory), one row 1.2-1.35x in the same runs. `next` (or null): a row to
// prefetch to L2, a line per 32 k (without it: 1.5-2x).
template <bool kAvx>
LMOE_V8_INLINE float dot_bf16_split_body(const float* a, const uint16_t* b, int64_t n, const uint16_t* next) {
  vec8::v8f lo0 = vec8::splat(0.f), hi0 = lo0, lo1 = lo0, hi1 = lo0;
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    if (next != nullptr) __builtin_prefetch(next + k, 0, 2);
    dot_bf16_split_step(a, b, k, lo0, hi0);
    dot_bf16_split_step(a, b, k + 16, lo1, hi1);
  }
  if (next != nullptr && n > 0) __builtin_prefetch(next + n - 1, 0, 2);  // the row's last line
  for (; k + 16 <= n; k += 16) dot_bf16_split_step(a, b, k, lo0, hi0);
  float s = vec8::hsum((lo0 + hi0) + (lo1 + hi1));
  for (; k < n; ++k) {
    const uint32_t bits = static_cast<uint32_t>(b[k]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    s += a[k] * f;
  }
  return s;
}
LMOE_CPU_AVX2 float dot_bf16_split_avx2(const float* a, const uint16_t* b, int64_t n, const uint16_t* next) {
  return dot_bf16_split_body<true>(a, b, n, next);
}
float dot_bf16_split_generic(const float* a, const uint16_t* b, int64_t n, const uint16_t* next) {
  return dot_bf16_split_body<false>(a, b, n, next);
}

// The small-M path's dot products on AVX512_BF16 CPUs, where the compute type is bf16 (a's rows
// bf16, no split): a . b[:n] for one weight row by vdpbf16ps: 32 k per instruction, products
// exact and sums in fp32, two accumulators (lanes summed at the end), masked loads for the k
// tail. Per 64-byte line of weights one load and one vdpbf16ps, where the AVX2 split kernel takes
// two loads, two shifts / ands and four FMAs. One weight row at a time, so a thread's weights
// stream as one sequential read: 4 rows at a time (4 streams 2 KiB apart) ran 30% slower from
// memory (T = 1, bf16, h1024 / i704 / E = 64, 2 Zen 5 cores, the experts' weights from memory:
// 0.64 vs 0.44 ms a call; the split kernel, then 4 rows at a time, 0.75). `next` (or null): a row
// to prefetch to L2, a line per 32 k.
LMOE_CPU_AVX512BF16 float dot_bf16dp(const uint16_t* a, const uint16_t* b, int64_t n, const uint16_t* next) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    if (next != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(next + k), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + k + 32), _MM_HINT_T1);
    }
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(a + k), (__m512bh)_mm512_loadu_si512(b + k));
    acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(a + k + 32),
                            (__m512bh)_mm512_loadu_si512(b + k + 32));
  }
  for (; k < n; k += 32) {  // the tail: zeros past n in both operands
    const __mmask32 m = n - k >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << (n - k)) - 1);
    if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + k), _MM_HINT_T1);
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(m, a + k),
                            (__m512bh)_mm512_maskz_loadu_epi16(m, b + k));
  }
  if (next != nullptr && n > 0) _mm_prefetch(reinterpret_cast<const char*>(next + n - 1), _MM_HINT_T1);
  // Lanes summed by bf16dp's tree (_mm512_reduce_add_ps trips GCC 12's -Wuninitialized).
  __m512 sums[8] = {_mm512_add_ps(acc0, acc1)};
#pragma GCC unroll 7
  for (int j = 1; j < 8; ++j) sums[j] = _mm512_setzero_ps();
  float s[8];
  bf16dp::hsum8(sums, s);
  return s[0];
}

// dst = src with each full block of 16 reordered as [0, 2, .., 14, 1, 3, .., 15] (the layout
// dot_bf16_split_body expects); the last n % 16 values copied in order.
// (src in fp32 or the compute type C: converted to fp32 as it is copied.)
template <typename C>
void split_pairs(const C* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 8; ++j) {
      dst[k + j] = static_cast<float>(src[k + 2 * j]);
      dst[k + 8 + j] = static_cast<float>(src[k + 2 * j + 1]);
    }
  for (; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}

template <typename TW, typename C>
float dot(const C* x, const TW* w, int64_t n, bool avx) {
  if constexpr (std::is_same_v<C, float> &&
                (std::is_same_v<TW, float> || std::is_same_v<TW, c10::BFloat16> ||
                 std::is_same_v<TW, c10::Half>)) {
    return avx ? dot_avx2<TW>(x, w, n) : dot_generic<TW>(x, w, n);
  } else {
    float acc = 0.f;
    for (int64_t k = 0; k < n; ++k) acc += static_cast<float>(x[k]) * static_cast<float>(w[k]);
    return acc;
  }
}

// Single-threaded fp32 GEMM out[M, N] = a[M, K] @ w[N, K]^T for one expert's rows, with w (HF's
// [out, in] layout) in fp32, bf16 or fp16, for AVX2+FMA CPUs. w is packed one 16-column panel
// (kKc x 16, fp32, 16 KiB: stays in L1) at a time, straight from its own dtype, while the next
// panel is prefetched; a 6 x 16 register tile of out accumulates broadcast(a) * panel (BLIS
// style) with a read in place. Why not BLAS: at ~50 rows a single-threaded MKL sgemm spends
// ~30% of its time packing w (perf, AVX2 Zen 3), and a bf16 w first needed a whole fp32 copy
// of the expert. Below kRowsForPanels rows (many experts, few tokens each) packing would cost
// as much as the multiplication: gemm_rows then dots rows of a with w's rows (in place, or
// widened copies).
// Fixed summation order: bitwise deterministic.
namespace awt {

constexpr int64_t kMr = 6, kNr = 16;
constexpr int64_t kKc = 256;  // k block: the packed panel (16 KiB) and a 6-row tile of a in L1
constexpr int64_t kKcRows = 512;  // gemm_rows' k block: 4 rows of a and 3 of w (14 KiB) in L1
static_assert(3 * (kKcRows + 8) <= kKc * kNr, "gemm_rows' scratch fits in the panel's");

// AVX2 + FMA + F16C, unless LATENTMOE_CPU_ISA=generic asks for the portable path (tests).
bool cpu_supported() { return vec8::use_avx2(); }

// Row stride (floats) of the per-thread copies of a: rows 4 KiB apart (as [*, 1024] fp32) would
// fall in the same L1 sets as one another.
inline int64_t padded_stride(int64_t n) { return (n + 7) / 8 * 8 + 8; }

// 8 rows of 8 floats in, 8 columns out.
__attribute__((target("avx2,fma"))) inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

template <typename TW>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const TW* p) {
  if constexpr (std::is_same_v<TW, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<TW, c10::BFloat16>)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else
      return _mm256_cvtph_ps(h);
  }
}

// panel[k * 16 + r] = fp32(w[r * ldw + k]) for k < kc, r < rows (<= 16); zero for r >= rows.
template <typename TW>
__attribute__((target("avx2,fma,f16c"))) void pack_panel(const TW* w, int64_t ldw, int64_t rows,
                                                        int64_t kc, float* panel) {
  for (int64_t r0 = 0; r0 < kNr; r0 += 8) {
    if (rows >= r0 + 8) {
      int64_t k = 0;
      for (; k + 8 <= kc; k += 8) {
        __m256 r[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) r[i] = load8<TW>(w + (r0 + i) * ldw + k);
        transpose8(r);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(panel + (k + j) * kNr + r0, r[j]);
      }
      for (; k < kc; ++k)
        for (int64_t i = 0; i < 8; ++i)
          panel[k * kNr + r0 + i] = static_cast<float>(w[(r0 + i) * ldw + k]);
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t i = 0; i < 8; ++i)
          panel[k * kNr + r0 + i] = r0 + i < rows ? static_cast<float>(w[(r0 + i) * ldw + k]) : 0.f;
    }
  }
}

// out[MR, nr] (+)= a[MR, kc] @ panel[kc, 16] (first nr columns), a's rows lda apart (kATrans:
// a given transposed, a[i, k] at a[k * lda + i]).
template <int MR, bool kATrans = false>
__attribute__((target("avx2,fma"))) void tile(const float* a, int64_t lda, const float* panel,
                                              int64_t kc, float* out, int64_t ldo, int64_t nr,
                                              bool accumulate) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kNr), b1 = _mm256_loadu_ps(panel + k * kNr + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(kATrans ? a + k * lda + i : a + i * lda + k);
      c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
    }
  }
  if (nr == kNr) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      float* o = out + i * ldo;
      if (accumulate) {
        c0[i] = _mm256_add_ps(_mm256_loadu_ps(o), c0[i]);
        c1[i] = _mm256_add_ps(_mm256_loadu_ps(o + 8), c1[i]);
      }
      _mm256_storeu_ps(o, c0[i]);
      _mm256_storeu_ps(o + 8, c1[i]);
    }
  } else {
    alignas(32) float row[kNr];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      _mm256_store_ps(row, c0[i]);
      _mm256_store_ps(row + 8, c1[i]);
      float* o = out + i * ldo;
      for (int64_t j = 0; j < nr; ++j) o[j] = accumulate ? o[j] + row[j] : row[j];
    }
  }
}

// Fewer rows than this take gemm_rows below instead of the packed-panel GEMM (measured on Zen 3:
// gemm_rows is faster up to about 32 rows; from 36 rows the panels are, 2 threads on fp32 at 36
// rows: 135 vs 110 GFLOP/s). bf16 weights from 25 rows: there gemm_rows widens each weight row
// into a copy too, and the panels' one widening serves all the rows (2 threads, 256 experts of
// [512, 512] / [512, 256] from memory: at 24 rows 123-126 vs 112-125, at 32 rows 133-141 vs
// 104-127 GFLOP/s). (Since the copies' rows are prefetched, gemm_rows on 2 Zen 1 cores is 4-7%
// faster than the panels at 28 rows and as fast at 32 (bf16, 48 experts of h1024 / i512); left at 25
// for want of a Zen 3 measurement, where the panels led by more.)
constexpr int64_t kRowsForPanels = 33;
constexpr int64_t kRowsForPanelsBf16 = 25;
// Below this many rows gemm_rows dots bf16 / fp16 weight rows widened in registers (per m-tile)
// instead of widening each row once into a copy: at 12 rows (E = 256, top-6, 512 tokens) 25-40%
// faster (Zen 3, weights from memory); at 24 rows the copy's one widening per row is as fast.
// (That was before the copies' rows were prefetched too. With the prefetch, on 2 Zen 1 cores,
// the copy at 12 rows was as fast as in place: 205-207 ms either way at E = 256, h1024 / i512,
// bf16.) fp32 weights always go in place (nothing to widen).
constexpr int64_t kRowsWidenInPlace = 16;
// gemm_rows prefetches the weight rows this far ahead (2 groups of 3 rows) when it reads them
// in place.
constexpr int64_t kRowsPrefetch = 6;

// out[i, j] (+)= dot(a[i, :kc], w[j, :kc]) for i < MR, j < NR: 4 x 3 vector accumulators along k,
// summed across lanes at the end. w's rows in their own dtype (bf16 / fp16 widened in registers).
// (Tried on a Zen 1: 6 x 2 tiles, 2 m-tiles at 12 rows and so one widening fewer per weight row,
// ran 13% faster in L1 alone but no faster in the op: 12 rows per expert at E = 256 took as long.)
template <int MR, int NR, typename TW>
__attribute__((target("avx2,fma,f16c"))) void dot_tile_w(const float* a, int64_t lda, const TW* w,
                                                        int64_t ldw, int64_t kc, float* out,
                                                        int64_t ldo, bool accumulate) {
  __m256 acc[NR][4];
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[j][i] = _mm256_setzero_ps();
  int64_t k = 0;
#pragma GCC unroll 2
  for (; k + 8 <= kc; k += 8) {
    __m256 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) wv[j] = load8<TW>(w + j * ldw + k);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_loadu_ps(a + i * lda + k);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[j][i] = _mm256_fmadd_ps(av, wv[j], acc[j][i]);
    }
  }
  if (k < kc) {  // the last kc % 8 columns, masked (16-bit w through a zero-padded copy)
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(kc - k)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      if constexpr (std::is_same_v<TW, float>) {
        wv[j] = _mm256_maskload_ps(w + j * ldw + k, mask);
      } else {
        alignas(32) float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int64_t kk = k; kk < kc; ++kk) t[kk - k] = static_cast<float>(w[j * ldw + kk]);
        wv[j] = _mm256_load_ps(t);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_maskload_ps(a + i * lda + k, mask);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[j][i] = _mm256_fmadd_ps(av, wv[j], acc[j][i]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j) {
    const vec8::v4f sums = vec8::hsum4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    for (int i = 0; i < MR; ++i) {
      float* o = out + i * ldo + j;
      *o = accumulate ? *o + sums[i] : sums[i];
    }
  }
}

template <int MR, typename TW>
__attribute__((target("avx2,fma,f16c"))) void dot_tile_w_n(int64_t nr, const float* a, int64_t lda,
                                                          const TW* w, int64_t ldw, int64_t kc,
                                                          float* out, int64_t ldo, bool accumulate) {
  if (nr == 3) dot_tile_w<MR, 3, TW>(a, lda, w, ldw, kc, out, ldo, accumulate);
  else if (nr == 2) dot_tile_w<MR, 2, TW>(a, lda, w, ldw, kc, out, ldo, accumulate);
  else dot_tile_w<MR, 1, TW>(a, lda, w, ldw, kc, out, ldo, accumulate);
}

// dot_tile_w for mr (1..4) rows of a and nr (1..3) rows of w.
template <typename TW>
__attribute__((target("avx2,fma,f16c"))) void dot_tile_w_rows(int64_t mr, int64_t nr, const float* a,
                                                             int64_t lda, const TW* w, int64_t ldw,
                                                             int64_t kc, float* out, int64_t ldo,
                                                             bool accumulate) {
  switch (mr) {
    case 4: return dot_tile_w_n<4, TW>(nr, a, lda, w, ldw, kc, out, ldo, accumulate);
    case 3: return dot_tile_w_n<3, TW>(nr, a, lda, w, ldw, kc, out, ldo, accumulate);
    case 2: return dot_tile_w_n<2, TW>(nr, a, lda, w, ldw, kc, out, ldo, accumulate);
    default: return dot_tile_w_n<1, TW>(nr, a, lda, w, ldw, kc, out, ldo, accumulate);
  }
}

// gemm for few rows (M < kRowsForPanels), where packing w into panels would cost as much as
// the multiplication: rows of w are dotted with 4 rows of a at a time, 3 rows of w per group.
// fp32 weights are read in place, and 16-bit ones too (widened in registers by every m-tile)
// up to kRowsWidenInPlace rows. Above it each group is widened once into `scratch` (3 *
// padded_stride(kKcRows) floats) and the tiles read the copy. The same summation order either
// way. Both prefetch the weight rows kRowsPrefetch ahead to L2, a few lines per m-tile (the copy
// too: without it the copy waits on memory row by row; 20 rows per expert, 64 experts of h1024 /
// i512 in bf16 from memory, 2 Zen 1 cores, alternated: 76-80 ms against 84-88).
template <typename TW>
__attribute__((target("avx2,fma,f16c"))) void gemm_rows(const float* a, int64_t lda, const TW* w,
                                                       int64_t ldw, float* out, int64_t ldo,
                                                       int64_t M, int64_t N, int64_t K,
                                                       float* scratch) {
  constexpr int64_t kEl = static_cast<int64_t>(sizeof(TW));
  const bool in_place = std::is_same_v<TW, float> || M <= kRowsWidenInPlace;
  const int64_t n_mtiles = (M + 3) / 4;
  for (int64_t k0 = 0; k0 < K; k0 += kKcRows) {
    const int64_t kc = std::min(kKcRows, K - k0);
    const int64_t ldb = padded_stride(kc), lines = (kc * kEl + 63) / 64;
    for (int64_t n0 = 0; n0 < N; n0 += 3) {
      const int64_t nr = std::min<int64_t>(3, N - n0);
      const int64_t pn = n0 + kRowsPrefetch;
      const int64_t p_rows = pn < N ? std::min<int64_t>(3, N - pn) : 0;
      if (!in_place) {
        for (int64_t r = 0; r < nr; ++r) {
          const TW* src = w + (n0 + r) * ldw + k0;
          float* dst = scratch + r * ldb;
          int64_t k = 0;
          for (; k + 8 <= kc; k += 8) _mm256_storeu_ps(dst + k, load8<TW>(src + k));
          for (; k < kc; ++k) dst[k] = static_cast<float>(src[k]);
        }
      }
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t t = m0 / 4;
        for (int64_t r = 0; r < p_rows; ++r)
          for (int64_t l = lines * t / n_mtiles; l < lines * (t + 1) / n_mtiles; ++l)
            _mm_prefetch(reinterpret_cast<const char*>(w + (pn + r) * ldw + k0) + 64 * l, _MM_HINT_T1);
        const float* at = a + m0 * lda + k0;
        float* ot = out + m0 * ldo + n0;
        const int64_t mr = std::min<int64_t>(4, M - m0);
        if (in_place) dot_tile_w_rows<TW>(mr, nr, at, lda, w + n0 * ldw + k0, ldw, kc, ot, ldo, k0 > 0);
        else dot_tile_w_rows<float>(mr, nr, at, lda, scratch, ldb, kc, ot, ldo, k0 > 0);
      }
    }
  }
}

// panel[k * 16 + j] = fp32(w[k * ldw + j]) for k < kc, j < nr (<= 16); zero for j >= nr: a
// panel of w in [K, N] layout (n contiguous), a straight copy (no transpose).
template <typename TW>
__attribute__((target("avx2,fma,f16c"))) void pack_panel_kn(const TW* w, int64_t ldw, int64_t nr,
                                                           int64_t kc, float* panel) {
  if (nr == kNr) {
    for (int64_t k = 0; k < kc; ++k) {
      _mm256_storeu_ps(panel + k * kNr, load8<TW>(w + k * ldw));
      _mm256_storeu_ps(panel + k * kNr + 8, load8<TW>(w + k * ldw + 8));
    }
    return;
  }
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t j = 0; j < kNr; ++j) panel[k * kNr + j] = j < nr ? static_cast<float>(w[k * ldw + j]) : 0.f;
}

// out[mr, nr] (+)= a @ panel for mr (1..6) rows: tile<MR, kATrans> by mr.
template <bool kATrans>
__attribute__((target("avx2,fma"))) inline void tile_rows(int64_t mr, const float* a, int64_t lda,
                                                         const float* panel, int64_t kc, float* out,
                                                         int64_t ldo, int64_t nr, bool acc) {
  switch (mr) {
    case 6: return tile<6, kATrans>(a, lda, panel, kc, out, ldo, nr, acc);
    case 5: return tile<5, kATrans>(a, lda, panel, kc, out, ldo, nr, acc);
    case 4: return tile<4, kATrans>(a, lda, panel, kc, out, ldo, nr, acc);
    case 3: return tile<3, kATrans>(a, lda, panel, kc, out, ldo, nr, acc);
    case 2: return tile<2, kATrans>(a, lda, panel, kc, out, ldo, nr, acc);
    default: return tile<1, kATrans>(a, lda, panel, kc, out, ldo, nr, acc);
  }
}

// out[M, n_begin:n_end] = a @ w through packed 16-column panels (n_begin a multiple of 16).
// w is [N, K] (kWKMajor false: HF's [out, in], out = a @ w^T; panels transposed as packed) or
// [K, N] (true: out = a @ w; panels a straight copy). a is [M, K] row-major, or kATrans [K, M]
// (a[i, k] at a[k * lda + i]). n outer, k inner: out's 16 columns stay in L1 across the k
// blocks. The next panel (along k, else the first of the next n block) is prefetched to L2, a
// few rows per tile: packing reads w from memory and would otherwise wait on it (+5-10%; for
// [K, N] each of its rows is one line, on a page of its own where ldw is 4 KiB). Each output
// element sums over k in the same order whatever the column range: bitwise the same however a
// caller splits the columns or the rows.
template <typename TW, bool kWKMajor, bool kATrans>
__attribute__((target("avx2,fma,f16c"))) void panel_gemm(const float* a, int64_t lda, const TW* w,
                                                        int64_t ldw, float* out, int64_t ldo, int64_t M,
                                                        int64_t n_begin, int64_t n_end, int64_t K,
                                                        float* panel) {
  if (K == 0) {  // an empty sum (hidden size 0): the k loops below would leave out unwritten
    for (int64_t m = 0; m < M; ++m) std::fill(out + m * ldo + n_begin, out + m * ldo + n_end, 0.f);
    return;
  }
  constexpr int64_t kEl = static_cast<int64_t>(sizeof(TW));
  const int64_t n_mtiles = (M + kMr - 1) / kMr;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kNr) {
    const int64_t nr = std::min(kNr, n_end - n0);
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      if constexpr (kWKMajor) pack_panel_kn<TW>(w + k0 * ldw + n0, ldw, nr, kc, panel);
      else pack_panel<TW>(w + n0 * ldw + k0, ldw, nr, kc, panel);
      const bool last_k = k0 + kKc >= K;
      const int64_t next_n0 = last_k ? n0 + kNr : n0, next_k0 = last_k ? 0 : k0 + kKc;
      const int64_t next_nr = next_n0 < n_end ? std::min(kNr, n_end - next_n0) : 0;
      const int64_t next_kc = std::min(kKc, K - next_k0);
      // The next panel as rows of w: its rows (and bytes per row) in w's layout.
      const int64_t pf_rows = next_nr == 0 ? 0 : (kWKMajor ? next_kc : next_nr);
      const int64_t pf_bytes = (kWKMajor ? next_nr : next_kc) * kEl;
      const char* pf = reinterpret_cast<const char*>(kWKMajor ? w + next_k0 * ldw + next_n0
                                                              : w + next_n0 * ldw + next_k0);
      for (int64_t m0 = 0; m0 < M; m0 += kMr) {
        const int64_t t = m0 / kMr;
        for (int64_t r = pf_rows * t / n_mtiles; r < pf_rows * (t + 1) / n_mtiles; ++r) {
          for (int64_t b = 0; b < pf_bytes; b += 64) _mm_prefetch(pf + r * ldw * kEl + b, _MM_HINT_T1);
          _mm_prefetch(pf + r * ldw * kEl + pf_bytes - 1, _MM_HINT_T1);
        }
        const float* at = kATrans ? a + k0 * lda + m0 : a + m0 * lda + k0;
        tile_rows<kATrans>(std::min(kMr, M - m0), at, lda, panel, kc, out + m0 * ldo + n0, ldo, nr, k0 > 0);
      }
    }
  }
}

// out[M, N] = a[M, K] @ w[N, K]^T (row strides lda, ldw, ldo). panel: kKc * kNr floats of scratch.
template <typename TW>
__attribute__((target("avx2,fma,f16c"))) void gemm(const float* a, int64_t lda, const TW* w,
                                                  int64_t ldw, float* out, int64_t ldo, int64_t M,
                                                  int64_t N, int64_t K, float* panel) {
  const int64_t rows_for_panels = std::is_same_v<TW, c10::BFloat16> ? kRowsForPanelsBf16 : kRowsForPanels;
  if (K > 0 && M < rows_for_panels) return gemm_rows<TW>(a, lda, w, ldw, out, ldo, M, N, K, panel);
  panel_gemm<TW, false, false>(a, lda, w, ldw, out, ldo, M, 0, N, K, panel);
}

// out[M, N] = a[M, K] @ w[K, N] for output columns [n_begin, n_end) (n_begin a multiple of 16),
// w in [K, N] layout (fp32 / bf16 / fp16), a row-major or (kATrans) given as [K, M]. The
// backward's GEMMs: activation gradients (a the rows' gradients, w an expert's weight as
// stored) and weight gradients (a and w both the expert's rows, K = its row count).
template <typename TW, bool kATrans>
__attribute__((target("avx2,fma,f16c"))) void gemm_kn(const float* a, int64_t lda, const TW* w,
                                                     int64_t ldw, float* out, int64_t ldo,
                                                     int64_t M, int64_t n_begin, int64_t n_end,
                                                     int64_t K, float* panel) {
  panel_gemm<TW, true, kATrans>(a, lda, w, ldw, out, ldo, M, n_begin, n_end, K, panel);
}

}  // namespace awt

// One expert's GEMM out[m, N] = a[m, K] @ W^T with W = weight[e] ([N, K], dtype T), computed in
// C by BLAS / oneDNN: on W itself when C == T, or on an fp32 copy in `w_buf` when the CPU lacks
// fast bf16/fp16 GEMMs.
template <typename T, typename C>
void expert_gemm(const at::Tensor& a, const at::Tensor& weight_e, at::Tensor out, at::Tensor& w_buf) {
  const int64_t N = weight_e.size(0), K = weight_e.size(1);
  if constexpr (std::is_same_v<T, C>) {
    mm_into(out, a, weight_e.t());
  } else {
    auto wb = w_buf.narrow(0, 0, N * K).view({N, K});
    wb.copy_(weight_e);
    mm_into(out, a, wb.t());
  }
}


// One row of swiglu_rows with fp32 gate|up: 8 lanes at a time.
template <typename T, bool kAvx>
LMOE_V8_INLINE void swiglu_row_body(const float* gc, T* go, float* a, int64_t I) {
  int64_t i = 0;
  for (; i + 32 <= I; i += 32) {  // 4 vectors at a time: silu8_n's interleaved exps
    vec8::v8f g[4], u[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      g[j] = vec8::round_to<T, kAvx>(vec8::load(gc + i + 8 * j));
      u[j] = vec8::round_to<T, kAvx>(vec8::load(gc + I + i + 8 * j));
      vec8::store_from_f32<T, kAvx>(go + i + 8 * j, g[j]);
      vec8::store_from_f32<T, kAvx>(go + I + i + 8 * j, u[j]);
    }
    silu8_n<4>(g);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) vec8::store(a + i + 8 * j, vec8::round_to<T, kAvx>(g[j] * u[j]));
  }
  for (; i + 8 <= I; i += 8) {
    const vec8::v8f g = vec8::round_to<T, kAvx>(vec8::load(gc + i));
    const vec8::v8f u = vec8::round_to<T, kAvx>(vec8::load(gc + I + i));
    vec8::store_from_f32<T, kAvx>(go + i, g);
    vec8::store_from_f32<T, kAvx>(go + I + i, u);
    vec8::store(a + i, vec8::round_to<T, kAvx>(silu8(g) * u));
  }
  for (; i < I; ++i) {
    const T g = static_cast<T>(gc[i]), u = static_cast<T>(gc[I + i]);
    go[i] = g;
    go[I + i] = u;
    a[i] = static_cast<float>(static_cast<T>(silu1(static_cast<float>(g)) * static_cast<float>(u)));
  }
}
template <typename T>
LMOE_CPU_AVX2 void swiglu_row_avx2(const float* gc, T* go, float* a, int64_t I) {
  swiglu_row_body<T, true>(gc, go, a, I);
}
template <typename T>
void swiglu_row_generic(const float* gc, T* go, float* a, int64_t I) {
  swiglu_row_body<T, false>(gc, go, a, I);
}

// One row of swiglu_rows with gate|up already in T (native 16-bit GEMMs): widened 8 lanes at a
// time, act rounded to T.
template <typename T, bool kAvx>
LMOE_V8_INLINE void swiglu_row_lowp_body(const T* gc, T* go, T* a, int64_t I) {
  std::memcpy(go, gc, sizeof(T) * 2 * I);
  int64_t i = 0;
  for (; i + 32 <= I; i += 32) {  // 4 vectors at a time: silu8_n's interleaved exps
    vec8::v8f g[4], u[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      g[j] = vec8::load_f32<T, kAvx>(gc + i + 8 * j);
      u[j] = vec8::load_f32<T, kAvx>(gc + I + i + 8 * j);
    }
    silu8_n<4>(g);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) vec8::store_from_f32<T, kAvx>(a + i + 8 * j, g[j] * u[j]);
  }
  for (; i + 8 <= I; i += 8) {
    const vec8::v8f g = vec8::load_f32<T, kAvx>(gc + i);
    const vec8::v8f u = vec8::load_f32<T, kAvx>(gc + I + i);
    vec8::store_from_f32<T, kAvx>(a + i, silu8(g) * u);
  }
  for (; i < I; ++i) a[i] = static_cast<T>(silu1(static_cast<float>(gc[i])) * static_cast<float>(gc[I + i]));
}
template <typename T>
LMOE_CPU_AVX2 void swiglu_row_lowp_avx2(const T* gc, T* go, T* a, int64_t I) {
  swiglu_row_lowp_body<T, true>(gc, go, a, I);
}

// The SwiGLU between the GEMMs for one expert's rows: gate|up (compute type C) are rounded to T
// (as a GEMM in T would), stored to gate_up_out for the backward, and act = T(silu(g) * u).
// Vectorized where C is fp32 (the silu's exp is exp_nonpos, ~2 ulp; the scalar loop of std::exp
// cost ~10% of a decode step).
// avx: the op's one reading of vec8::use_avx2() (a concurrent reload_settings() must not switch
// the path between two of its steps).
template <typename T, typename C>
void swiglu_rows(const C* gate_up_c, T* gate_up_out, C* act, int64_t rows, int64_t I, bool avx) {
  // gate|up already in a 16-bit T (native GEMMs): the widening row kernel.
  constexpr bool kLowp = std::is_same_v<C, T> && (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>);
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const C* gc = gate_up_c + r * 2 * I;
      T* go = gate_up_out + r * 2 * I;
      C* a = act + r * I;
      if constexpr (std::is_same_v<C, float>) {
        if (avx) swiglu_row_avx2<T>(gc, go, a, I);
        else swiglu_row_generic<T>(gc, go, a, I);
      } else if (kLowp && avx) {
        // (The scalar loop below, with std::exp, took ~40% of a native bf16 call at 512 tokens.)
        if constexpr (kLowp) swiglu_row_lowp_avx2<T>(gc, go, a, I);
      } else {
        for (int64_t i = 0; i < I; ++i) {
          const T g = static_cast<T>(gc[i]), u = static_cast<T>(gc[I + i]);
          go[i] = g;
          go[I + i] = u;
          a[i] = static_cast<C>(static_cast<T>(moe::swiglu(static_cast<float>(g), static_cast<float>(u))));
        }
      }
    }
  });
}


// Whether bf16/fp16 GEMMs should run natively (oneDNN on AVX-512 / AMX CPUs) rather than as fp32
// GEMMs on upconverted tiles (AVX2 and others, where the native path is several times slower).
// LATENTMOE_CPU_LOWP_GEMM=native|fp32 forces either (tests exercise both paths); under `auto` a
// native-capable CPU still takes the fp32 path for calls with fewer than kNativeMinRows rows per
// active expert: each native GEMM call costs more than few rows repay. Measured on a 2-core Zen 4
// (avx512_bf16), bf16, 512 tokens, top-6, h512 / i256: 12 rows per expert (E = 256) took 29.7 ms
// native against 18.8 ms fp32; 48 rows (E = 64) 14.5 against 15.4; 192 rows (E = 16) 9.9 against
// 13.3. A decode step (1 row per expert) streams its weights through the fp32 dot either way.
constexpr int64_t kNativeMinRows = 32;

// LATENTMOE_CPU_LOWP_GEMM forced to native (true) or fp32 (false); nullopt under auto.
std::optional<bool> cpu_low_precision_gemm_forced() {
  const char* env = settings::get("LATENTMOE_CPU_LOWP_GEMM");
  if (env != nullptr && std::string(env) == "native") return true;
  if (env != nullptr && std::string(env) == "fp32") return false;
  return std::nullopt;
}

// Whether oneDNN's GEMMs in dt (bf16 / fp16) are fast here: bf16 on AVX-512 CPUs, fp16 only with
// AVX512_FP16 (Sapphire Rapids and later). Without it oneDNN's fp16 GEMMs crawl: on a 2-core Zen 4
// (AVX-512 with bf16, no fp16), fp16, 512 tokens, top-6, the forward at h1024 / i704 / E = 64 took
// 333 ms native against 78 on the fp32 path, and the backward at h512 / i256 / E = 16 1335 ms
// against 34; `auto` used to take native there (the capability alone said AVX512).
bool cpu_fast_low_precision_gemm(at::ScalarType dt) {
  static const bool avx512 = at::get_cpu_capability().find("AVX512") != std::string::npos;
  static const bool avx512_fp16 = avx512 && __builtin_cpu_supports("avx512fp16");
  return dt == at::kHalf ? avx512_fp16 : avx512;
}

// The choice for one call in dt with `rows` (token, expert) pairs over `active` experts.
bool cpu_native_low_precision_gemm(at::ScalarType dt, int64_t rows, int64_t active) {
  if (const auto forced = cpu_low_precision_gemm_forced()) return *forced;
  return cpu_fast_low_precision_gemm(dt) && active > 0 && rows >= kNativeMinRows * active;
}

// The forward's choice. bf16 on a CPU with AVX512_BF16 runs bf16dp's GEMMs whatever the row count
// (bf16, 512 tokens, top-6, 2-core Zen 4: h512 / i256 at E = 256, 12 rows per expert, 15.9 ms
// against 20.3 on the fp32 path and 34 through oneDNN; h1024 / i704 at E = 64, 44 against 53
// through oneDNN and 87 on the fp32 path).
bool cpu_native_forward(at::ScalarType dt, int64_t rows, int64_t active) {
  if (dt == at::kBFloat16 && bf16dp::cpu_supported())
    return cpu_low_precision_gemm_forced().value_or(true);
  return cpu_native_low_precision_gemm(dt, rows, active);
}

// The backward's choice: native means ATen (oneDNN) GEMMs. bf16 where bf16dp runs never takes
// them: experts_backward_awt runs bf16dp's GEMMs there (auto or native; fp32 forced: its fp32
// panel GEMMs). oneDNN's was the slowest of the three on the 2-core Zen 4 (bf16, 512 tokens,
// top-6; bf16dp / fp32 panels / oneDNN: h1024 / i704 / E = 64 174 / 233 / 231 ms; h512 / i256 /
// E = 16 19 / 31 / 38; E = 256 90 / 99 / 118).
bool cpu_native_backward(at::ScalarType dt, int64_t rows, int64_t active) {
  if (dt == at::kBFloat16 && bf16dp::cpu_supported()) return false;
  return cpu_native_low_precision_gemm(dt, rows, active);
}

// Experts holding at least one row, from the [E + 1] offsets.
int64_t active_experts(const int64_t* off, int64_t E) {
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e) n += off[e + 1] > off[e];
  return n;
}

// One expert's gate_up GEMM -> SwiGLU -> down GEMM on rows [o, o + m) of the permuted buffers.
template <typename T, typename C>
void expert_mlp(const at::Tensor& xs, const at::Tensor& wgu_e, const at::Tensor& wd_e, int64_t o,
                int64_t m, at::Tensor& gu_c, at::Tensor& act, at::Tensor& y,
                at::Tensor& gate_up_out, at::Tensor& w_buf, bool avx) {
  const int64_t I = wd_e.size(1);
  at::Tensor gu_e = gu_c.narrow(0, o, m);
  expert_gemm<T, C>(xs.narrow(0, o, m), wgu_e, gu_e, w_buf);
  swiglu_rows<T, C>(gu_e.const_data_ptr<C>(), gate_up_out.mutable_data_ptr<T>() + o * 2 * I,
                    act.mutable_data_ptr<C>() + o * I, m, I, avx);
  expert_gemm<T, C>(act.narrow(0, o, m), wd_e, y.narrow(0, o, m), w_buf);
}

// Permuted rows [b, e) of x (pair i is token sorted_pairs[i] / K), converted to C.
template <typename T, typename C>
void gather_rows(const T* x, const int64_t* sorted_pairs, int64_t K, int64_t H, int64_t b,
                 int64_t e, C* dst) {
  for (int64_t i = b; i < e; ++i) {
    const T* src = x + (sorted_pairs[i] / K) * H;
    C* d = dst + (i - b) * H;
    for (int64_t h = 0; h < H; ++h) d[h] = static_cast<C>(src[h]);
  }
}


// One expert's rows through bf16dp (AVX512_BF16 CPUs, so the epilogues' AVX-512 code runs too;
// x rows gathered into xa, row stride ldx): gate columns
// [j_begin, j_end) of the gate_up GEMM with its SwiGLU (gate_up_out rows, act rows of stride lda),
// then output columns [n_begin, n_end) of the down GEMM into y (row stride H). A caller that
// splits the columns across threads runs the gate_up part everywhere before any down part.
void dp_expert_rows(const c10::BFloat16* xa, int64_t ldx, const c10::BFloat16* wgu_e, const c10::BFloat16* wd_e,
                    int64_t H, int64_t I, int64_t m, c10::BFloat16* guo, c10::BFloat16* act, int64_t lda,
                    c10::BFloat16* y, int64_t j_begin, int64_t j_end, int64_t n_begin, int64_t n_end, float* res) {
  if (j_end > j_begin)
    bf16dp::gemm_gate_up(xa, ldx, wgu_e, H, I, m, j_begin, j_end, res,
                         [&](int64_t r, int64_t j0, const float* g, const float* u, int64_t n) {
                           c10::BFloat16* gr = guo + r * 2 * I;
                           dp_swiglu_cols_avx512(g, u, gr + j0, gr + I + j0, act + r * lda + j0, n);
                         });
  if (n_end > n_begin)
    bf16dp::gemm(act, lda, wd_e, I, m, I, n_begin, n_end, res,
                 [&](int64_t r, int64_t n0, const float* v, int64_t n) { store_bf16_avx512(v, y + r * H + n0, n); });
}

// An expert too large to share out (bf16dp path): its GEMMs' columns split across the threads.
void dp_expert_parallel(const at::Tensor& x, const at::Tensor& wgu, const at::Tensor& wd, const int64_t* sorted_pairs,
                        int64_t K, int64_t e, int64_t o, int64_t m, at::Tensor& gate_up_out, at::Tensor& y) {
  using T = c10::BFloat16;
  const int64_t H = x.size(1), I = wd.size(2);
  const int64_t ldx = bf16dp::padded_stride(H), lda = bf16dp::padded_stride(I);
  const T nan(std::numeric_limits<float>::quiet_NaN());  // row padding the GEMMs must never read
  std::vector<T> xa(m * ldx, nan), act(m * lda, nan);
  const T* xp = x.const_data_ptr<T>();
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t end) {
    for (int64_t r = b; r < end; ++r) gather_rows<T, T>(xp, sorted_pairs, K, H, o + r, o + r + 1, xa.data() + r * ldx);
  });
  const T* wgu_e = wgu.const_data_ptr<T>() + e * 2 * I * H;
  const T* wd_e = wd.const_data_ptr<T>() + e * H * I;
  T* guo = gate_up_out.mutable_data_ptr<T>() + o * 2 * I;
  T* yp = y.mutable_data_ptr<T>() + o * H;
  const int64_t res_n = bf16dp::scratch_floats(m, std::min(H, I));
  // Columns per task: one epilogue span (gate_up: gate columns; down: output columns).
  constexpr int64_t kG = bf16dp::kSpan * bf16dp::kNr / 2, kD = bf16dp::kSpan * bf16dp::kNr;
  at::parallel_for(0, (I + kG - 1) / kG, 1, [&](int64_t b, int64_t end) {
    std::vector<float> res(res_n);
    dp_expert_rows(xa.data(), ldx, wgu_e, wd_e, H, I, m, guo, act.data(), lda, yp, b * kG, std::min(I, end * kG), 0,
                   0, res.data());
  });
  at::parallel_for(0, (H + kD - 1) / kD, 1, [&](int64_t b, int64_t end) {
    std::vector<float> res(res_n);
    dp_expert_rows(xa.data(), ldx, wgu_e, wd_e, H, I, m, guo, act.data(), lda, yp, 0, 0, b * kD,
                   std::min(H, end * kD), res.data());
  });
}

template <typename T, typename C>
void experts_forward(const at::Tensor& x, const at::Tensor& wgu, const at::Tensor& wd,
                     const float* w, const int64_t* sorted_pairs, const int64_t* off,
                     const int64_t* pos, int64_t K, at::Tensor& gate_up_out, at::Tensor& out) {
  const int64_t T_ = x.size(0), H = x.size(1), E = wgu.size(0), I = wgu.size(1) / 2, S = T_ * K;
  const at::TensorOptions copt = x.options().dtype(c10::CppTypeToScalarType<C>::value);
  // Experts with few rows (decode) go through the weight-streaming path below. The others run
  // concurrently, one thread per expert (far faster at ~50 rows than one multi-threaded GEMM
  // after another), taken largest first from a shared counter (LPT). An expert with more rows
  // than a thread's fair share would leave the other threads idle: those get multi-threaded
  // GEMMs, one expert after another. Which thread computes an expert does not change its result
  // (bitwise deterministic). Idle experts cost nothing.
  const int64_t n_threads = at::get_num_threads();
  std::vector<int64_t> small, large, concurrent;
  int64_t rows_left = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = off[e + 1] - off[e];
    if (m == 0) continue;
    if (m <= kSmallM) small.push_back(e);
    else rows_left += m;
  }
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = off[e + 1] - off[e];
    if (m <= kSmallM) continue;
    if (n_threads > 1 && m * n_threads > rows_left) large.push_back(e);  // LPT cannot balance it
    else concurrent.push_back(e);
  }
  std::stable_sort(concurrent.begin(), concurrent.end(), [&](int64_t a, int64_t b) {
    return off[a + 1] - off[a] > off[b + 1] - off[b];
  });
  // Concurrent experts use awt::gemm on per-thread scratch where the compute type is fp32;
  // elsewhere (native bf16/fp16 GEMMs, CPUs without AVX2) single-threaded ATen GEMMs on the
  // permuted buffers below.
  constexpr bool kAwtTypes = std::is_same_v<C, float> &&
                             (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                              std::is_same_v<T, c10::Half>);
  // The ISA read once for the whole call (awt::cpu_supported() is vec8::use_avx2()): every step
  // below takes the same path even if reload_settings() runs meanwhile in another thread.
  const bool avx = vec8::use_avx2();
  const bool awt_path = kAwtTypes && avx;
  // bf16 in and bf16 GEMMs (the native path) on a CPU with AVX512_BF16: bf16dp's GEMMs, the
  // SwiGLU in the gate_up GEMM's epilogue, instead of oneDNN calls.
  constexpr bool kDpTypes = std::is_same_v<T, c10::BFloat16> && std::is_same_v<C, c10::BFloat16>;
  const bool dp_path = kDpTypes && bf16dp::cpu_supported();
  at::Tensor y = empty_huge({S, H}, copt);
  at::Tensor xs, gu_c, act;
  if (!(awt_path || dp_path) || !small.empty() || (!large.empty() && !dp_path)) {
    xs = empty_huge({S, H}, copt);
    gu_c = empty_huge({S, 2 * I}, copt);
    act = empty_huge({S, I}, copt);
    at::parallel_for(0, S, 16, [&](int64_t b, int64_t e) {
      gather_rows<T, C>(x.const_data_ptr<T>(), sorted_pairs, K, H, b, e,
                        xs.mutable_data_ptr<C>() + b * H);
    });
  }
  auto make_w_buf = [&]() {
    return std::is_same_v<T, C> ? at::Tensor() : at::empty({2 * I * H}, copt);
  };
  if (!large.empty()) {
    if constexpr (kDpTypes) {
      if (dp_path) {
        for (int64_t e : large) dp_expert_parallel(x, wgu, wd, sorted_pairs, K, e, off[e], off[e + 1] - off[e],
                                                   gate_up_out, y);
      }
    }
    if (!dp_path) {
      at::Tensor w_buf = make_w_buf();
      for (int64_t e : large)
        expert_mlp<T, C>(xs, wgu[e], wd[e], off[e], off[e + 1] - off[e], gu_c, act, y, gate_up_out, w_buf, avx);
    }
  }
  if (!concurrent.empty()) {
    const int64_t n_conc = static_cast<int64_t>(concurrent.size());
    const int64_t m_max = off[concurrent[0] + 1] - off[concurrent[0]];
    std::atomic<int64_t> next{0};
    const at::ThreadLocalState tls;  // the caller's dispatch state (below autograd) for the workers
    at::parallel_for(0, std::min(n_threads, n_conc), 1, [&](int64_t, int64_t) {
      const at::ThreadLocalStateGuard tls_guard(tls);
      if constexpr (kAwtTypes) {
        if (awt_path) {
          // Per thread: one packed weight panel, the expert's rows of x, its SwiGLU rows and its
          // gate|up rows (fp32; when T is fp32 they go straight into gate_up_out).
          constexpr bool kF32 = std::is_same_v<T, float>;
          const int64_t ldx = awt::padded_stride(H), lda = awt::padded_stride(I);
          const int64_t n_panel = awt::kKc * awt::kNr;
          const int64_t n_scratch = n_panel + m_max * (ldx + lda) + (kF32 ? 0 : m_max * 2 * I);
          std::unique_ptr<float[]> scratch(new float[n_scratch]);
          float* panel = scratch.get();
          float* xa = panel + n_panel;
          float* act_e = xa + m_max * ldx;
          float* gu_buf = act_e + m_max * lda;
          const T* wgu_p = wgu.const_data_ptr<T>();
          const T* wd_p = wd.const_data_ptr<T>();
          T* guo = gate_up_out.mutable_data_ptr<T>();
          float* yp = y.mutable_data_ptr<float>();
          for (int64_t i = next.fetch_add(1); i < n_conc; i = next.fetch_add(1)) {
            const int64_t e = concurrent[i], o = off[e], m = off[e + 1] - o;
            for (int64_t r = 0; r < m; ++r)
              gather_rows<T, float>(x.const_data_ptr<T>(), sorted_pairs, K, H, o + r, o + r + 1,
                                    xa + r * ldx);
            float* gu_e;
            if constexpr (kF32) gu_e = guo + o * 2 * I;
            else gu_e = gu_buf;
            awt::gemm<T>(xa, ldx, wgu_p + e * 2 * I * H, H, gu_e, 2 * I, m, 2 * I, H, panel);
            for (int64_t r = 0; r < m; ++r)  // the row kernel itself: already on a worker thread
              swiglu_row_avx2<T>(gu_e + r * 2 * I, guo + (o + r) * 2 * I, act_e + r * lda, I);
            awt::gemm<T>(act_e, lda, wd_p + e * H * I, I, yp + o * H, H, m, H, I, panel);
          }
          return;
        }
      }
      if constexpr (kDpTypes) {
        if (dp_path) {
          // Per thread: the expert's rows of x and its SwiGLU rows (bf16, padded rows) and the
          // GEMMs' fp32 sums of one column block.
          const int64_t ldx = bf16dp::padded_stride(H), lda = bf16dp::padded_stride(I);
          // (NaN-filled: the row padding the GEMMs must never read)
          const T nan(std::numeric_limits<float>::quiet_NaN());
          std::vector<T> xa(m_max * ldx, nan), act_e(m_max * lda, nan);
          std::vector<float> res(bf16dp::scratch_floats(m_max, std::min(H, I)));
          const T* xp = x.const_data_ptr<T>();
          for (int64_t i = next.fetch_add(1); i < n_conc; i = next.fetch_add(1)) {
            const int64_t e = concurrent[i], o = off[e], m = off[e + 1] - o;
            for (int64_t r = 0; r < m; ++r)
              gather_rows<T, T>(xp, sorted_pairs, K, H, o + r, o + r + 1, xa.data() + r * ldx);
            dp_expert_rows(xa.data(), ldx, wgu.const_data_ptr<T>() + e * 2 * I * H,
                           wd.const_data_ptr<T>() + e * H * I, H, I, m, gate_up_out.mutable_data_ptr<T>() + o * 2 * I,
                           act_e.data(), lda, y.mutable_data_ptr<T>() + o * H, 0, I, 0, H, res.data());
          }
          return;
        }
      }
      at::Tensor w_buf = make_w_buf();
      for (int64_t i = next.fetch_add(1); i < n_conc; i = next.fetch_add(1)) {
        const int64_t e = concurrent[i];
        expert_mlp<T, C>(xs, wgu[e], wd[e], off[e], off[e + 1] - off[e], gu_c, act, y, gate_up_out,
                         w_buf, avx);
      }
    });
  }
  if (!small.empty()) {
    const int64_t n_small = static_cast<int64_t>(small.size());
    // out[o + r, n] = dot(a[o + r, :], weight[e, n, :]) for the small experts' rows, in fp32
    // whatever the compute type C (also where C is bf16 / fp16 because the CPU has native
    // low-precision GEMMs: those are for many rows; here the weights' bytes set the time, and a
    // bf16 / fp16 C would leave the vector kernels), the result rounded to C.
    // bf16 weights: the rows of the small experts are split into even / odd halves once
    // (split_pairs, in fp32), then every weight row is dotted without shuffles. A 16-bit C with
    // other weights: the rows are widened to fp32 once.
    constexpr bool kSplit = std::is_same_v<T, c10::BFloat16>;
    constexpr bool kWiden = !kSplit && !std::is_same_v<C, float>;
    std::vector<int64_t> slot(kSplit || kWiden ? S : 0, -1);
    int64_t n_rows = 0;
    if constexpr (kSplit || kWiden) {
      for (int64_t e : small)
        for (int64_t r = off[e]; r < off[e + 1]; ++r) slot[r] = n_rows++;
    }
    // (dp_path: bf16 rows and weights on an AVX512_BF16 CPU, dotted as they are by dot_bf16dp: no split)
    std::vector<float> split_buf((kSplit && !dp_path) || kWiden ? n_rows * std::max(H, I) : 0);
    auto stream_gemm = [&](const C* a, const T* weight, int64_t N, int64_t Kd, C* dst) {
      if constexpr (kSplit) {
        if (!dp_path)
          for (int64_t e : small)
            for (int64_t r = off[e]; r < off[e + 1]; ++r)
              split_pairs(a + r * Kd, split_buf.data() + slot[r] * Kd, Kd);
        // Groups of kGroup weight rows of one expert. Each thread takes one contiguous range of
        // groups (faster than chunks from a shared counter, which break the threads' sequential
        // streams: measured), and each group prefetches the rows of the group after next while it
        // computes (the next one's were asked for a group earlier: at T = 1, bf16, h1024 / i704,
        // 2 threads on a Zen 4 this took the call from 1.5-1.6x to 1.2-1.3x the weight-streaming
        // floor; 4 or 8 groups ahead gained less). Within a group each weight row is dotted on
        // its own (dot_bf16dp / dot_bf16_split_*), so a thread's weights stream as one read.
        // Which thread computes a group does not change its result.
        constexpr int64_t kGroup = 4;
        const int64_t G = (N + kGroup - 1) / kGroup;  // groups per expert
        const auto* wb = reinterpret_cast<const uint16_t*>(weight);
        auto rows_of = [&](int64_t j) { return wb + (small[j / G] * N + (j % G) * kGroup) * Kd; };
        at::parallel_for(0, n_small * G, 16, [&](int64_t jb, int64_t je) {
          for (int64_t j = jb; j < je; ++j) {
            const int64_t e = small[j / G], n = (j % G) * kGroup;
            const int64_t nr = std::min(kGroup, N - n);
            const uint16_t* next = j + 2 < je ? rows_of(j + 2) : nullptr;
            float res[kGroup];
            for (int64_t r = off[e]; r < off[e + 1]; ++r) {
              const uint16_t* pf = r == off[e] ? next : nullptr;
              for (int64_t q = 0; q < nr; ++q) {
                const uint16_t* wq = rows_of(j) + q * Kd;
                const uint16_t* pq = pf != nullptr ? pf + q * Kd : nullptr;
                if (dp_path)  // (C is bf16 there)
                  res[q] = dot_bf16dp(reinterpret_cast<const uint16_t*>(a + r * Kd), wq, Kd, pq);
                else if (avx)
                  res[q] = dot_bf16_split_avx2(split_buf.data() + slot[r] * Kd, wq, Kd, pq);
                else
                  res[q] = dot_bf16_split_generic(split_buf.data() + slot[r] * Kd, wq, Kd, pq);
              }
              for (int64_t i = 0; i < nr; ++i) dst[r * N + n + i] = static_cast<C>(res[i]);
            }
          }
        });
      } else {
        // fp32 rows: a itself (C = fp32) or its rows widened once.
        auto row_of = [&](int64_t r) -> const float* {
          if constexpr (kWiden) return split_buf.data() + slot[r] * Kd;
          else return a + r * Kd;
        };
        if constexpr (kWiden) {
          for (int64_t e : small)
            for (int64_t r = off[e]; r < off[e + 1]; ++r)
              for (int64_t k = 0; k < Kd; ++k) split_buf[slot[r] * Kd + k] = static_cast<float>(a[r * Kd + k]);
        }
        // No software prefetch here: the row after next asked for into L2 (as the bf16 path's
        // groups do) made the call slower (T = 1, top-6 of 64 experts, 2-core Zen 4, alternated
        // runs, without it: h2048 / i1408 fp32 0.75-0.88x the time, fp16 0.93-0.96x; h1024 / i704
        // fp32 0.94-0.95x, and in bench_moe's T = 1 rows 1.64-1.68 ms against 1.77-1.85); the
        // hardware prefetcher follows each thread's sequential stream on its own.
        at::parallel_for(0, n_small * N, 64, [&](int64_t jb, int64_t je) {
          for (int64_t j = jb; j < je; ++j) {
            const int64_t e = small[j / N], n = j % N;
            const T* wr = weight + (e * N + n) * Kd;
            for (int64_t r = off[e]; r < off[e + 1]; ++r)
              dst[r * N + n] = static_cast<C>(dot<T, float>(row_of(r), wr, Kd, avx));
          }
        });
      }
    };
    stream_gemm(xs.const_data_ptr<C>(), wgu.const_data_ptr<T>(), 2 * I, H, gu_c.mutable_data_ptr<C>());
    for (int64_t e : small) {
      const int64_t o = off[e];
      swiglu_rows<T, C>(gu_c.const_data_ptr<C>() + o * 2 * I,
                        gate_up_out.mutable_data_ptr<T>() + o * 2 * I,
                        act.mutable_data_ptr<C>() + o * I, off[e + 1] - o, I, avx);
    }
    stream_gemm(act.const_data_ptr<C>(), wd.const_data_ptr<T>(), H, I, y.mutable_data_ptr<C>());
  }
  combine_rows<T, C>(y.const_data_ptr<C>(), w, pos, out.mutable_data_ptr<T>(), T_, K, H);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_cpu(
    const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
    const at::Tensor& weights, const at::Tensor& indices, bool /*check_values*/) {
  // The index range is checked either way here (no device sync to save on the CPU).
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
  sort_pairs_by_expert(idx.const_data_ptr<int64_t>(), S, E, spp, offsets.mutable_data_ptr<int64_t>());
  std::vector<int64_t> pos(S);
  for (int64_t i = 0; i < S; ++i) pos[spp[i]] = i;
  if (moe_host::forward_grouped_setting().value_or(false)) {
    // LATENTMOE_MOE_FORWARD_GEMM=grouped: the device-generic forward CUDA can take (tests run it here).
    auto pos_t = at::from_blob(pos.data(), {S}, idx.options()).clone();
    auto [out, gate_up_out] =
        moe_host::experts_forward_grouped(x, wgu, wd, weights, sorted_pairs, offsets, pos_t);
    return {out, sorted_pairs, offsets, gate_up_out};
  }
  auto gate_up_out = empty_huge({S, 2 * I}, x.options());
  auto out = empty_huge({T, H}, x.options());
  const bool native = x.scalar_type() == at::kFloat ||
                      cpu_native_forward(x.scalar_type(), S, active_experts(offsets.const_data_ptr<int64_t>(), E));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_experts_cpu", [&] {
    if (native) {
      experts_forward<scalar_t, scalar_t>(x, wgu, wd, w.const_data_ptr<float>(), spp,
                                          offsets.const_data_ptr<int64_t>(), pos.data(), K,
                                          gate_up_out, out);
    } else {
      experts_forward<scalar_t, float>(x, wgu, wd, w.const_data_ptr<float>(), spp,
                                       offsets.const_data_ptr<int64_t>(), pos.data(), K,
                                       gate_up_out, out);
    }
  });
  return {out, sorted_pairs, offsets, gate_up_out};
}

// ---- backward on AVX2 -----------------------------------------------------------------------
// Per expert, in fp32 (16-bit operands widened as they are read), with the rounding points of
// the forward (act and the SwiGLU gradient rounded to the input dtype):
//   ga_u = gy @ W_down[e]          act = T(silu(g) * u)       gyw = T(gy * w)
//   dW_down[e] = gyw^T @ act       dw = rowsum(ga_u * act)    ga = ga_u * w
//   gh = T([ga * u * silu'(g), ga * silu(g)])
//   dW_gate_up[e] = gh^T @ xs      dxs = gh @ W_gate_up[e]
// Experts run concurrently, one thread each, largest first (as the forward); an expert too big
// to share out runs alone with its GEMMs split across the threads (columns of the activation
// gradients, rows of the weight gradients: the same sums either way). Each token's k rows of dxs
// are added in k order: bitwise deterministic, whatever the thread count. No weight is copied
// whole (the ATen path widened every expert's weights to fp32 for bf16 / fp16).

// Rows [o, o + m) of one expert: the gathered inputs and the SwiGLU terms. act and gyw rounded to T.
template <typename T>
LMOE_CPU_AVX2 void backward_rows_in(const T* x, const T* gout, const T* guo, const float* wts,
                                    const int64_t* sorted_pairs, int64_t K, int64_t H, int64_t I,
                                    int64_t o, int64_t r_begin, int64_t r_end, float* xs, float* gy,
                                    float* gyw, float* gu, float* act, float* ws, int64_t ldh,
                                    int64_t ld2i, int64_t ldi) {
  using vec8::v8f;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t p = sorted_pairs[o + r], tok = p / K;
    const float w = wts[p];
    ws[r] = w;
    const T* xr = x + tok * H;
    const T* gr = gout + tok * H;
    float* xsr = xs + r * ldh;
    float* gyr = gy + r * ldh;
    float* gwr = gyw + r * ldh;
    int64_t h = 0;
    for (; h + 8 <= H; h += 8) {
      const v8f gv = vec8::load_f32<T, true>(gr + h);
      vec8::store(xsr + h, vec8::load_f32<T, true>(xr + h));
      vec8::store(gyr + h, gv);
      vec8::store(gwr + h, vec8::round_to<T, true>(gv * vec8::splat(w)));
    }
    for (; h < H; ++h) {
      xsr[h] = static_cast<float>(xr[h]);
      gyr[h] = static_cast<float>(gr[h]);
      gwr[h] = static_cast<float>(static_cast<T>(gyr[h] * w));
    }
    const T* gur = guo + (o + r) * 2 * I;
    float* gus = gu + r * ld2i;
    float* ar = act + r * ldi;
    int64_t i = 0;
    for (; i + 32 <= I; i += 32) {  // 4 vectors at a time: silu8_n's interleaved exps
      v8f g[4], u[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        g[j] = vec8::load_f32<T, true>(gur + i + 8 * j), u[j] = vec8::load_f32<T, true>(gur + I + i + 8 * j);
        vec8::store(gus + i + 8 * j, g[j]);
        vec8::store(gus + I + i + 8 * j, u[j]);
      }
      silu8_n<4>(g);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) vec8::store(ar + i + 8 * j, vec8::round_to<T, true>(g[j] * u[j]));
    }
    for (; i + 8 <= I; i += 8) {
      const v8f g = vec8::load_f32<T, true>(gur + i), u = vec8::load_f32<T, true>(gur + I + i);
      vec8::store(gus + i, g);
      vec8::store(gus + I + i, u);
      vec8::store(ar + i, vec8::round_to<T, true>(silu8(g) * u));
    }
    for (; i < I; ++i) {
      const float g = static_cast<float>(gur[i]), u = static_cast<float>(gur[I + i]);
      gus[i] = g;
      gus[I + i] = u;
      ar[i] = static_cast<float>(static_cast<T>(silu1(g) * u));
    }
  }
}

// Rows [r_begin, r_end): dw[o + r] = sum_i ga_u * act, and gh (rounded to T), with
// d silu(g) / dg = sig * (1 + g * (1 - sig)).
template <typename T>
LMOE_CPU_AVX2 void backward_rows_gh(const float* gau, const float* act, const float* gu, const float* ws,
                                    int64_t I, int64_t o, int64_t r_begin, int64_t r_end, float* gh,
                                    float* grad_ws, int64_t ld2i, int64_t ldi) {
  using vec8::v8f;
  const v8f one = vec8::splat(1.f);
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float* gar = gau + r * ldi;
    const float* ar = act + r * ldi;
    const float* gur = gu + r * ld2i;
    float* ghr = gh + r * ld2i;
    const v8f w = vec8::splat(ws[r]);
    v8f dot = vec8::splat(0.f);
    float dot_tail = 0.f;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const v8f ga_u = vec8::load(gar + i);
      dot += ga_u * vec8::load(ar + i);
      const v8f ga = ga_u * w, g = vec8::load(gur + i), u = vec8::load(gur + I + i);
      const v8f sig = sigmoid8(g);
      vec8::store(ghr + i, vec8::round_to<T, true>(ga * u * sig * (one + g * (one - sig))));
      vec8::store(ghr + I + i, vec8::round_to<T, true>(ga * (g * sig)));
    }
    for (; i < I; ++i) {
      dot_tail += gar[i] * ar[i];
      const float ga = gar[i] * ws[r], g = gur[i], u = gur[I + i];
      const float sig = sigmoid1(g);
      ghr[i] = static_cast<float>(static_cast<T>(ga * u * sig * (1.f + g * (1.f - sig))));
      ghr[I + i] = static_cast<float>(static_cast<T>(ga * (g * sig)));
    }
    grad_ws[o + r] = vec8::hsum(dot) + dot_tail;
  }
}


// Rows [r_begin, r_end) of a weight gradient out[M, N] (T) = a^T @ w, a given [K, M] (lda), w
// [K, N] (ldw), both fp32. In blocks of 48 rows, so the tiles' stores stay within 48 rows of
// out (whole rows 4 KiB apart at N = 1024 fp32 made every tile store a new page: fp32 ran at
// half the rate of bf16, which goes through an fp32 block and is converted row by row).
template <typename T>
void weight_grad_rows(const float* a, int64_t lda, const float* w, int64_t ldw, T* out, int64_t N,
                      int64_t K, int64_t r_begin, int64_t r_end) {
  constexpr int64_t kBlock = 48;
  std::vector<float> panel(awt::kKc * awt::kNr);
  std::vector<float> buf(std::is_same_v<T, float> ? 0 : kBlock * N);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kBlock) {
    const int64_t nr = std::min(kBlock, r_end - r0);
    if constexpr (std::is_same_v<T, float>) {
      awt::gemm_kn<float, true>(a + r0, lda, w, ldw, out + r0 * N, N, nr, 0, N, K, panel.data());
    } else {
      awt::gemm_kn<float, true>(a + r0, lda, w, ldw, buf.data(), N, nr, 0, N, K, panel.data());
      store_as<T>(buf.data(), out + r0 * N, nr * N);
    }
  }
}

// fn(begin, end) over [0, n): split across the threads (par), or in one call.
template <typename F>
void for_range(bool par, int64_t n, int64_t grain, const F& fn) {
  if (par) at::parallel_for(0, n, grain, fn);
  else if (n > 0) fn(0, n);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward_awt(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& sorted_pairs,
    const at::Tensor& expert_offsets, const at::Tensor& gate_up_out) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t T_ = hidden.size(0), H = hidden.size(1), E = gate_up_proj.size(0);
  const int64_t I = gate_up_proj.size(1) / 2, K = weights.size(1), S = T_ * K;
  auto x = hidden.contiguous();
  auto gout = grad_out.contiguous();
  auto wgu = gate_up_proj.contiguous();
  auto wd = down_proj.contiguous();
  auto guo = gate_up_out.contiguous();
  auto wts = weights.to(at::kFloat).contiguous();
  // sorted_pairs / expert_offsets: the caller's checked private copies (check_cpu_sort).
  const int64_t* off = expert_offsets.const_data_ptr<int64_t>();
  const int64_t* spp = sorted_pairs.const_data_ptr<int64_t>();
  // (Fresh mappings on every call from their size on: huge pages, cpu/huge_pages.h.)
  auto grad_gu = empty_huge(wgu.sizes(), wgu.options());
  auto grad_down = empty_huge(wd.sizes(), wd.options());
  auto gxs = empty_huge({S, H}, x.options().dtype(at::kFloat));
  auto grad_ws = at::empty({S}, x.options().dtype(at::kFloat));
  const int64_t ldh = awt::padded_stride(H), ldi = awt::padded_stride(I), ld2i = awt::padded_stride(2 * I);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = gout.const_data_ptr<T>();
  const T* gup = guo.const_data_ptr<T>();
  const T* wgu_p = wgu.const_data_ptr<T>();
  const T* wd_p = wd.const_data_ptr<T>();
  const float* wtp = wts.const_data_ptr<float>();
  T* ggu = grad_gu.mutable_data_ptr<T>();
  T* gdn = grad_down.mutable_data_ptr<T>();
  float* gxs_p = gxs.mutable_data_ptr<float>();
  float* gws_p = grad_ws.mutable_data_ptr<float>();
  const int64_t per_row = 3 * ldh + 2 * ld2i + 2 * ldi + 1;  // xs, gy, gyw, gu, gh, act, ga_u, w
  // bf16 with bf16dp's GEMMs (AVX512_BF16; LATENTMOE_CPU_LOWP_GEMM auto or native): the same fp32
  // row buffers and elementwise steps, the four GEMMs on bf16 copies of their operands (all of
  // them bf16 values: the products are exact either way, the sums fp32 in another order).
  const bool use_dp = std::is_same_v<T, c10::BFloat16> && bf16dp::cpu_supported() &&
                      cpu_low_precision_gemm_forced().value_or(true);
  auto dp_expert_backward = [&](int64_t e, int64_t m, int64_t o, bool par, const float* xs, const float* gy,
                                const float* gyw, const float* gu, const float* act, float* gau, float* gh,
                                const float* ws) {
    const T* wd_e = wd_p + e * H * I;
    const T* wgu_e = wgu_p + e * 2 * I * H;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      using B16 = c10::BFloat16;
      namespace dp = bf16dp;
      const int64_t lhb = dp::padded_stride(H), lib = dp::padded_stride(I), l2ib = dp::padded_stride(2 * I);
      const int64_t mp = (m + 1) / 2;  // pairs of rows
      // (uninitialised: every element a GEMM reads is written first)
      std::unique_ptr<B16[]> gy_b(new B16[m * lhb]), xs_b(new B16[m * lhb]), act_b(new B16[m * lib]),
          gh_b(new B16[m * l2ib]);
      std::unique_ptr<uint32_t[]> gyw_pk(new uint32_t[mp * (H + 16)]), gh_pk(new uint32_t[mp * (2 * I + 16)]);
      for_range(par, m, 4, [&](int64_t b, int64_t en) {
        dp::rows_to_bf16(gy + b * ldh, ldh, en - b, H, gy_b.get() + b * lhb, lhb);
        dp::rows_to_bf16(xs + b * ldh, ldh, en - b, H, xs_b.get() + b * lhb, lhb);
        dp::rows_to_bf16(act + b * ldi, ldi, en - b, I, act_b.get() + b * lib, lib);
      });
      dp::row_pairs_to_bf16(gyw, ldh, m, H, gyw_pk.get(), H + 16);
      auto cols = [&](int64_t N, const auto& fn) {  // fn(n_begin, n_end, panel) over column blocks
        for_range(par, (N + dp::kNp - 1) / dp::kNp, 1, [&](int64_t b, int64_t en) {
          std::unique_ptr<uint32_t[]> panel(new uint32_t[dp::kKnPanelWords]);
          fn(b * dp::kNp, std::min(N, en * dp::kNp), panel.get());
        });
      };
      // ga_u [m, I] = gy @ W_down[e] ([H, I]).
      cols(I, [&](int64_t nb, int64_t ne, uint32_t* panel) {
        std::unique_ptr<float[]> res(new float[dp::kn_res_floats(m, H, nb, ne)]);
        dp::gemm_kn(reinterpret_cast<const uint32_t*>(gy_b.get()), lhb / 2, 1, wd_e, I, m, H, nb, ne, panel,
                    res.get(), [&](int64_t r, int64_t n0, const float* v, int64_t n) {
                      std::memcpy(gau + r * ldi + n0, v, sizeof(float) * n);
                    });
      });
      // dW_down[e] [H, I] = gyw^T @ act.
      cols(I, [&](int64_t nb, int64_t ne, uint32_t* panel) {
        std::unique_ptr<float[]> res(new float[dp::kn_res_floats(H, m, nb, ne)]);
        dp::gemm_kn(gyw_pk.get(), 1, H + 16, act_b.get(), lib, H, m, nb, ne, panel, res.get(),
                    [&](int64_t r, int64_t n0, const float* v, int64_t n) {
                      store_as(v, gdn + e * H * I + r * I + n0, n);
                    });
      });
      for_range(par, m, 4, [&](int64_t b, int64_t en) {
        backward_rows_gh<T>(gau, act, gu, ws, I, o, b, en, gh, gws_p, ld2i, ldi);
        dp::rows_to_bf16(gh + b * ld2i, ld2i, en - b, 2 * I, gh_b.get() + b * l2ib, l2ib);
      });
      dp::row_pairs_to_bf16(gh, ld2i, m, 2 * I, gh_pk.get(), 2 * I + 16);
      // dW_gate_up[e] [2I, H] = gh^T @ xs.
      cols(H, [&](int64_t nb, int64_t ne, uint32_t* panel) {
        std::unique_ptr<float[]> res(new float[dp::kn_res_floats(2 * I, m, nb, ne)]);
        dp::gemm_kn(gh_pk.get(), 1, 2 * I + 16, xs_b.get(), lhb, 2 * I, m, nb, ne, panel, res.get(),
                    [&](int64_t r, int64_t n0, const float* v, int64_t n) {
                      store_as(v, ggu + e * 2 * I * H + r * H + n0, n);
                    });
      });
      // dxs [m, H] = gh @ W_gate_up[e] ([2I, H]).
      cols(H, [&](int64_t nb, int64_t ne, uint32_t* panel) {
        std::unique_ptr<float[]> res(new float[dp::kn_res_floats(m, 2 * I, nb, ne)]);
        dp::gemm_kn(reinterpret_cast<const uint32_t*>(gh_b.get()), l2ib / 2, 1, wgu_e, H, m, 2 * I, nb, ne, panel,
                    res.get(), [&](int64_t r, int64_t n0, const float* v, int64_t n) {
                      std::memcpy(gxs_p + (o + r) * H + n0, v, sizeof(float) * n);
                    });
      });
    }
  };

  // One expert (rows [o, o + m)); par: its row loops and GEMMs split across the threads.
  auto expert = [&](int64_t e, float* buf, bool par) {
    const int64_t o = off[e], m = off[e + 1] - o;
    float* xs = buf;
    float* gy = xs + m * ldh;
    float* gyw = gy + m * ldh;
    float* gu = gyw + m * ldh;
    float* gh = gu + m * ld2i;
    float* act = gh + m * ld2i;
    float* gau = act + m * ldi;
    float* ws = gau + m * ldi;
    for_range(par, m, 4, [&](int64_t b, int64_t en) {
      backward_rows_in<T>(xp, gp, gup, wtp, spp, K, H, I, o, b, en, xs, gy, gyw, gu, act, ws, ldh, ld2i, ldi);
    });
    const T* wd_e = wd_p + e * H * I;
    const T* wgu_e = wgu_p + e * 2 * I * H;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (use_dp) {
        dp_expert_backward(e, m, o, par, xs, gy, gyw, gu, act, gau, gh, ws);
        return;
      }
    }
    // ga_u [m, I] = gy @ W_down[e] ([H, I]): columns split.
    for_range(par, (I + awt::kNr - 1) / awt::kNr, 1, [&](int64_t b, int64_t en) {
      std::vector<float> panel(awt::kKc * awt::kNr);
      awt::gemm_kn<T, false>(gy, ldh, wd_e, I, gau, ldi, m, b * awt::kNr, std::min(I, en * awt::kNr), H,
                             panel.data());
    });
    // dW_down[e] [H, I] = gyw^T @ act: rows split.
    for_range(par, (H + awt::kMr - 1) / awt::kMr, 8, [&](int64_t b, int64_t en) {
      weight_grad_rows<T>(gyw, ldh, act, ldi, gdn + e * H * I, I, m, b * awt::kMr, std::min(H, en * awt::kMr));
    });
    for_range(par, m, 4, [&](int64_t b, int64_t en) {
      backward_rows_gh<T>(gau, act, gu, ws, I, o, b, en, gh, gws_p, ld2i, ldi);
    });
    // dW_gate_up[e] [2I, H] = gh^T @ xs: rows split.
    for_range(par, (2 * I + awt::kMr - 1) / awt::kMr, 8, [&](int64_t b, int64_t en) {
      weight_grad_rows<T>(gh, ld2i, xs, ldh, ggu + e * 2 * I * H, H, m, b * awt::kMr,
                          std::min(2 * I, en * awt::kMr));
    });
    // dxs [m, H] = gh @ W_gate_up[e] ([2I, H]): columns split.
    for_range(par, (H + awt::kNr - 1) / awt::kNr, 1, [&](int64_t b, int64_t en) {
      std::vector<float> panel(awt::kKc * awt::kNr);
      awt::gemm_kn<T, false>(gh, ld2i, wgu_e, H, gxs_p + o * H, H, m, b * awt::kNr, std::min(H, en * awt::kNr),
                             2 * I, panel.data());
    });
  };

  // Idle experts: zero gradients. Large ones alone (split); the rest concurrently, largest first.
  const int64_t n_threads = at::get_num_threads();
  std::vector<int64_t> large, concurrent;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = off[e + 1] - off[e];
    if (m == 0) {
      std::fill(ggu + e * 2 * I * H, ggu + (e + 1) * 2 * I * H, static_cast<T>(0.f));
      std::fill(gdn + e * H * I, gdn + (e + 1) * H * I, static_cast<T>(0.f));
    } else if (n_threads > 1 && m * n_threads > S) {
      large.push_back(e);
    } else {
      concurrent.push_back(e);
    }
  }
  for (int64_t e : large) {
    std::vector<float> buf((off[e + 1] - off[e]) * per_row);
    expert(e, buf.data(), true);
  }
  if (!concurrent.empty()) {
    std::stable_sort(concurrent.begin(), concurrent.end(), [&](int64_t a, int64_t b) {
      return off[a + 1] - off[a] > off[b + 1] - off[b];
    });
    const int64_t n_conc = static_cast<int64_t>(concurrent.size());
    const int64_t m_max = off[concurrent[0] + 1] - off[concurrent[0]];
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(n_threads, n_conc), 1, [&](int64_t, int64_t) {
      std::vector<float> buf(m_max * per_row);
      for (int64_t i = next.fetch_add(1); i < n_conc; i = next.fetch_add(1)) expert(concurrent[i], buf.data(), false);
    });
  }
  // Each token's k rows, added in k order: the forward's combine with unit weights (1 * x is x).
  std::vector<int64_t> pos(S);
  for (int64_t i = 0; i < S; ++i) pos[spp[i]] = i;
  auto grad_hidden = empty_huge({T_, H}, x.options());
  const std::vector<float> ones(S, 1.f);
  combine_rows<T, float>(gxs_p, ones.data(), pos.data(), grad_hidden.mutable_data_ptr<T>(), T_, K, H);
  auto grad_weights = at::empty({T_, K}, x.options().dtype(at::kFloat));
  float* gwp = grad_weights.mutable_data_ptr<float>();
  for (int64_t i = 0; i < S; ++i) gwp[i] = gws_p[pos[i]];
  return {grad_hidden, grad_gu, grad_down, grad_weights.to(weights.scalar_type())};
}

// The forward's sort, as every CPU backward path reads it: offsets non-decreasing within [0, T*k],
// from 0 to T*k unless dropped_ok (the device-generic ATen backward, which also serves a CUDA
// forward with check_values=False, takes pairs outside them as dropped; the AVX2 path has none);
// the pairs a permutation of [0, T*k) (each token's k slots once: a pair out of range would send a
// read or write out of bounds, a repeated one leaves another pair's gradient unwritten).
void check_cpu_sort(const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets, bool dropped_ok) {
  const int64_t S = sorted_pairs.numel(), E = expert_offsets.numel() - 1;
  const int64_t* off = expert_offsets.const_data_ptr<int64_t>();
  const int64_t* spp = sorted_pairs.const_data_ptr<int64_t>();
  if (dropped_ok) {
    TORCH_CHECK_VALUE(off[0] >= 0 && off[E] <= S, "latentmoe.moe_experts_backward: argument 'expert_offsets' must "
                      "lie within [0, T*k = ", S, "], got ", off[0], " to ", off[E]);
  } else {
    TORCH_CHECK_VALUE(off[0] == 0 && off[E] == S, "latentmoe.moe_experts_backward: argument 'expert_offsets' must "
                      "run from 0 to T*k = ", S, " on this path (no dropped pairs), got ", off[0], " to ", off[E]);
  }
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK_VALUE(off[e] <= off[e + 1],
                      "latentmoe.moe_experts_backward: argument 'expert_offsets' must be non-decreasing");
  std::vector<bool> seen(static_cast<size_t>(S), false);
  for (int64_t i = 0; i < S; ++i) {
    TORCH_CHECK_VALUE(spp[i] >= 0 && spp[i] < S,
                      "latentmoe.moe_experts_backward: argument 'sorted_pairs' has an entry outside [0, T*k)");
    TORCH_CHECK_VALUE(!seen[spp[i]], "latentmoe.moe_experts_backward: argument 'sorted_pairs' must be a "
                      "permutation of [0, T*k) (the forward's sort), but ", spp[i], " appears twice");
    seen[spp[i]] = true;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& sorted_pairs_in,
    const at::Tensor& expert_offsets_in, const at::Tensor& gate_up_out) {
  moe_host::check_experts_backward_args(hidden, gate_up_proj, down_proj, weights);
  const auto dt = hidden.scalar_type();
  // The ATen backward below loops over the experts unless told otherwise: on the CPU,
  // at::_grouped_mm is itself a loop of GEMMs (tests force it to check the grouped calls' forms).
  const auto gemms = moe_host::backward_gemm_setting().value_or(moe_host::BackwardGemms::kLoop);
  // Before any path converts them (the fp32 fallback below would otherwise pass a wrong dtype).
  moe_host::check_experts_backward_tensors(grad_out, hidden, gate_up_proj, weights, sorted_pairs_in,
                                           expert_offsets_in, gate_up_out);
  // Every path below reads the pairs and offsets as indices: private copies, checked once here.
  const auto sorted_pairs = chk::private_copy(sorted_pairs_in);
  const auto expert_offsets = chk::private_copy(expert_offsets_in);
  // Native or fp32 GEMMs for 16-bit types (cpu_native_backward; active_experts only compares
  // neighbouring offsets, so it may read them before the check).
  const bool native = dt != at::kFloat &&
                      cpu_native_backward(dt, sorted_pairs.numel(),
                                          active_experts(expert_offsets.const_data_ptr<int64_t>(), gate_up_proj.size(0)));
  const bool awt_path = awt::cpu_supported() && (dt == at::kFloat || !native) &&
                        (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf);
  check_cpu_sort(sorted_pairs, expert_offsets, /*dropped_ok=*/!awt_path);
  if (awt_path) {
    const auto run = [&](auto tag) {
      return experts_backward_awt<decltype(tag)>(grad_out, hidden, gate_up_proj, down_proj, weights,
                                                 sorted_pairs, expert_offsets, gate_up_out);
    };
    if (dt == at::kBFloat16) return run(c10::BFloat16{});
    if (dt == at::kHalf) return run(c10::Half{});
    return run(float{});
  }
  if (dt != at::kFloat && !native) {
    // As in the forward: fp32 GEMMs on upconverted operands where bf16/fp16 GEMMs are slow.
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    auto f = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
    auto [gx, ggu, gd, gw] = moe_host::experts_backward(
        f(grad_out), f(hidden), f(gate_up_proj), f(down_proj), weights, sorted_pairs,
        expert_offsets, f(gate_up_out), gemms);
    return {gx.to(dt), ggu.to(dt), gd.to(dt), gw};
  }
  return moe_host::experts_backward(grad_out.contiguous(), hidden.contiguous(),
                                    gate_up_proj.contiguous(), down_proj.contiguous(), weights,
                                    sorted_pairs, expert_offsets, gate_up_out, gemms);
}

}  // namespace

// latentmoe._C.cpu_bf16dp() (csrc/module.cpp): whether bf16 MoE experts run bf16dp's GEMMs.
bool bf16dp_active() { return bf16dp::cpu_supported(); }

TORCH_LIBRARY_IMPL(latentmoe, CPU, m) {
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_route_backward", &moe_route_backward_cpu);
  m.impl("moe_experts", &moe_experts_cpu);
  m.impl("moe_experts_backward", &moe_experts_backward_cpu);
}

}  // namespace cpu
}  // namespace latentmoe
