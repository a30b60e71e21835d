// The Autograd kernels of the ops with a backward in C++ (torch::autograd::Functions): rms_norm,
// add_rms_norm, mla_prefill, moe_route and moe_experts, their backwards the rms_norm_backward /
// mla_prefill_backward / moe_route_backward / moe_experts_backward ops on the tensors the forwards
// save. Why not torch.library's Python
// register_autograd (which it replaced): that ran a Python function and a Python redispatch on
// every call, gradient or not, ~15-20 us per call on a 2-core Zen 1: for moe_experts ~1.6% of a
// decode-step call (T = 1, bf16, h1024 / i704, top-6 of 64, ~1.4 ms), and 2/3 of an rms_norm of
// one 512-wide row (30 us against 10 below autograd), per layer per token.
//
// The op's ADInplaceOrView kernel (autograd_forbid.cpp's forward-mode AD check) still runs below
// this one.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "common/checks.h"

namespace latentmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Four = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
namespace chk = latentmoe::checks;

struct MoeExperts : public torch::autograd::Function<MoeExperts> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
                               const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& indices,
                               bool check_values) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("latentmoe::moe_experts", "")
                               .typed<Four(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, bool)>();
    Four r;
    {
      at::AutoDispatchBelowAutograd guard;
      r = op.call(hidden, gate_up_proj, down_proj, weights, indices, check_values);
    }
    auto& [out, sorted_pairs, expert_offsets, gate_up_out] = r;
    ctx->save_for_backward({hidden, gate_up_proj, down_proj, weights, sorted_pairs, expert_offsets, gate_up_out});
    // gate_up_out is the backward's saved pre-activation, not a differentiable output (the backward
    // has no term for it: a gradient reaching it would be dropped silently).
    ctx->mark_non_differentiable({sorted_pairs, expert_offsets, gate_up_out});
    ctx->set_materialize_grads(false);  // (no zeros made for the outputs without a gradient)
    return {out, sorted_pairs, expert_offsets, gate_up_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("latentmoe::moe_experts_backward", "")
                               .typed<Four(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&)>();
    if (!grads[0].defined()) return variable_list(6);  // out unused: no gradient anywhere
    const variable_list s = ctx->get_saved_variables();
    auto [g_hidden, g_gate_up, g_down, g_weights] =
        op.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    return {g_hidden, g_gate_up, g_down, g_weights, at::Tensor(), at::Tensor()};  // none for indices / check_values
  }
};

using Two = std::tuple<at::Tensor, at::Tensor>;
using Three = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// rms_norm_backward(grad_out, x, weight, rstd) -> (grad_x, grad_weight).
Two rms_norm_backward_call(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& rstd) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("latentmoe::rms_norm_backward", "")
                             .typed<Two(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_out.contiguous(), x, weight, rstd);
}

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight, double eps) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("latentmoe::rms_norm", "")
                               .typed<Two(const at::Tensor&, const at::Tensor&, double)>();
    Two r;
    {
      at::AutoDispatchBelowAutograd guard;
      r = op.call(input, weight, eps);
    }
    auto& [out, rstd] = r;
    ctx->save_for_backward({input, weight, rstd});
    ctx->mark_non_differentiable({rstd});  // (the backward has no term for it: no silent zero gradient)
    ctx->set_materialize_grads(false);
    return {out, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list s = ctx->get_saved_variables();
    auto [gx, gw] = rms_norm_backward_call(grads[0], s[0], s[1], s[2]);
    return {gx, gw, at::Tensor()};
  }
};

struct AddRmsNorm : public torch::autograd::Function<AddRmsNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& residual,
                               const at::Tensor& weight, double eps) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("latentmoe::add_rms_norm", "")
                               .typed<Three(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
    Three r;
    {
      at::AutoDispatchBelowAutograd guard;
      r = op.call(input, residual, weight, eps);
    }
    auto& [out, h, rstd] = r;
    ctx->save_for_backward({h, weight, rstd});
    ctx->mark_non_differentiable({rstd});
    ctx->set_materialize_grads(false);
    return {out, h, rstd};
  }

  // out = rms_norm(h) and h = input + residual: h's gradient is out's through the norm plus h's own.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor gx, gw;
    if (grads[0].defined()) {
      const variable_list s = ctx->get_saved_variables();
      std::tie(gx, gw) = rms_norm_backward_call(grads[0], s[0], s[1], s[2]);
    }
    if (grads[1].defined()) gx = gx.defined() ? gx + grads[1] : grads[1];
    return {gx, gx, gw, at::Tensor()};
  }
};

Two rms_norm_autograd(const at::Tensor& input, const at::Tensor& weight, double eps) {
  chk::defined("rms_norm", "input", input);
  chk::defined("rms_norm", "weight", weight);
  const variable_list r = RmsNorm::apply(input, weight, eps);
  return {r[0], r[1]};
}

Three add_rms_norm_autograd(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& weight,
                            double eps) {
  chk::defined("add_rms_norm", "input", input);
  chk::defined("add_rms_norm", "residual", residual);
  chk::defined("add_rms_norm", "weight", weight);
  const variable_list r = AddRmsNorm::apply(input, residual, weight, eps);
  return {r[0], r[1], r[2]};
}

struct MoeRoute : public torch::autograd::Function<MoeRoute> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                               int64_t top_k, int64_t n_group, int64_t topk_group, const std::string& score_func,
                               bool norm, double scale) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("latentmoe::moe_route", "")
                               .typed<Three(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                                            int64_t, c10::string_view, bool, double)>();
    Three r;
    {
      at::AutoDispatchBelowAutograd guard;
      r = op.call(logits, bias, top_k, n_group, topk_group, score_func, norm, scale);
    }
    auto& [weights, indices, scores] = r;
    ctx->save_for_backward({scores, indices});
    ctx->saved_data["score_func"] = score_func;
    ctx->saved_data["norm"] = norm;
    ctx->saved_data["scale"] = scale;
    ctx->set_materialize_grads(false);  // (an unused scores output: no gradient term for it)
    return {weights, indices, scores};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("latentmoe::moe_route_backward", "")
                               .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const at::Tensor&, const at::Tensor&, c10::string_view, bool,
                                                 double)>();
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& scores = s[0];
    const at::Tensor& indices = s[1];
    const at::Tensor g_weights = grads[0].defined() ? grads[0].contiguous() : scores.new_zeros(indices.sizes());
    const std::optional<at::Tensor> g_scores =
        grads[2].defined() ? std::optional<at::Tensor>(grads[2].contiguous()) : std::nullopt;
    const at::Tensor g_logits = op.call(g_weights, g_scores, scores, indices, ctx->saved_data["score_func"].toStringRef(),
                                        ctx->saved_data["norm"].toBool(), ctx->saved_data["scale"].toDouble());
    // The logits' gradient only (the bias steers the selection: no gradient).
    return {g_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Three moe_route_autograd(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k,
                         int64_t n_group, int64_t topk_group, c10::string_view score_func, bool norm, double scale) {
  chk::defined("moe_route", "logits", logits);
  const variable_list r =
      MoeRoute::apply(logits, bias, top_k, n_group, topk_group, std::string(score_func), norm, scale);
  return {r[0], r[1], r[2]};
}

using Five = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct MlaPrefill : public torch::autograd::Function<MlaPrefill> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q_nope, const at::Tensor& q_pe,
                               const at::Tensor& latent_cache, const at::Tensor& cache_seqlens, const at::Tensor& w_uk,
                               const at::Tensor& w_uv, double softmax_scale,
                               const std::optional<at::Tensor>& block_table, bool causal, int64_t window) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("latentmoe::mla_prefill", "")
                               .typed<Two(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, double,
                                          const std::optional<at::Tensor>&, bool, int64_t)>();
    Two r;
    {
      at::AutoDispatchBelowAutograd guard;
      r = op.call(q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, softmax_scale, block_table, causal, window);
    }
    auto& [out, lse] = r;
    // (The cache is saved: a later mla_append_cache into it bumps its version, and the backward
    // then raises instead of reading the new contents.)
    ctx->save_for_backward({q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, out, lse,
                            block_table.value_or(at::Tensor())});
    ctx->saved_data["softmax_scale"] = softmax_scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["window"] = window;
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("latentmoe::mla_prefill_backward", "")
            .typed<Five(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        double, const std::optional<at::Tensor>&, bool, int64_t)>();
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(10);
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& out = s[6];
    const at::Tensor& lse = s[7];
    const at::Tensor g_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(out);
    const at::Tensor g_lse = grads[1].defined() ? grads[1].to(at::kFloat).contiguous() : at::zeros_like(lse);
    const std::optional<at::Tensor> block_table = s[8].defined() ? std::optional<at::Tensor>(s[8]) : std::nullopt;
    auto [g_qn, g_qp, g_cache, g_wuk, g_wuv] =
        op.call(g_out, g_lse, s[0], s[1], s[2], s[3], s[4], s[5], out, lse, ctx->saved_data["softmax_scale"].toDouble(),
                block_table, ctx->saved_data["causal"].toBool(), ctx->saved_data["window"].toInt());
    return {g_qn,      g_qp,        g_cache,     at::Tensor(), g_wuk, g_wuv, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

Two mla_prefill_autograd(const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& latent_cache,
                         const at::Tensor& cache_seqlens, const at::Tensor& w_uk, const at::Tensor& w_uv,
                         double softmax_scale, const std::optional<at::Tensor>& block_table, bool causal,
                         int64_t window) {
  const char* op = "mla_prefill";
  chk::defined(op, "q_nope", q_nope);
  chk::defined(op, "q_pe", q_pe);
  chk::defined(op, "latent_cache", latent_cache);
  chk::defined(op, "cache_seqlens", cache_seqlens);
  chk::defined(op, "w_uk", w_uk);
  chk::defined(op, "w_uv", w_uv);
  const variable_list r = MlaPrefill::apply(q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, softmax_scale,
                                            block_table, causal, window);
  return {r[0], r[1]};
}

Four moe_experts_autograd(const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                          const at::Tensor& weights, const at::Tensor& indices, bool check_values) {
  // (A None named as the kernels below would name it; autograd would fail on it first.)
  const char* op = "moe_experts";
  chk::defined(op, "hidden", hidden);
  chk::defined(op, "gate_up_proj", gate_up_proj);
  chk::defined(op, "down_proj", down_proj);
  chk::defined(op, "weights", weights);
  chk::defined(op, "indices", indices);
  const variable_list r = MoeExperts::apply(hidden, gate_up_proj, down_proj, weights, indices, check_values);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("add_rms_norm", &add_rms_norm_autograd);
  m.impl("mla_prefill", &mla_prefill_autograd);
  m.impl("moe_route", &moe_route_autograd);
  m.impl("moe_experts", &moe_experts_autograd);
}

}  // namespace latentmoe
