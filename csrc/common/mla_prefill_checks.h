// Argument checks of the MLA prefill ops, shared by the CPU kernels and the CUDA bindings
// (includes torch headers: never include it from a .cu file).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "common/checks.h"
#include "common/mla_prefill_math.h"

namespace latentmoe::mla_prefill {

namespace chk = latentmoe::checks;

inline void last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, "latentmoe.", op, ": argument '", name,
                    "' must have a contiguous last dim (stride 1), got strides ", t.strides());
}

// Checks the forward inputs (shapes, dtypes, devices, cache_seqlens values) and returns the
// shapes and element strides for the kernels.
// With a block_table the cache is paged; the caller passes block_table.contiguous() to the kernels.
inline Params check_args(const char* op, const at::Tensor& q_nope, const at::Tensor& q_pe,
                         const at::Tensor& latent_cache, const at::Tensor& cache_seqlens,
                         const at::Tensor& w_uk, const at::Tensor& w_uv, double softmax_scale,
                         const std::optional<at::Tensor>& block_table, bool causal, int64_t window) {
  chk::floating(op, "q_nope", q_nope);
  chk::dim(op, "q_nope", q_nope, 4);
  chk::dim(op, "q_pe", q_pe, 4);
  chk::dim(op, "latent_cache", latent_cache, 3);
  chk::dim(op, "cache_seqlens", cache_seqlens, 1);
  chk::dim(op, "w_uk", w_uk, 3);
  chk::dim(op, "w_uv", w_uv, 3);
  chk::same_dtype(op, "q_pe", q_pe, "q_nope", q_nope);
  chk::same_dtype(op, "latent_cache", latent_cache, "q_nope", q_nope);
  chk::same_dtype(op, "w_uk", w_uk, "q_nope", q_nope);
  chk::same_dtype(op, "w_uv", w_uv, "q_nope", q_nope);
  chk::dtype(op, "cache_seqlens", cache_seqlens, at::kInt);
  chk::same_device(op, "q_pe", q_pe, "q_nope", q_nope);
  chk::same_device(op, "latent_cache", latent_cache, "q_nope", q_nope);
  chk::same_device(op, "cache_seqlens", cache_seqlens, "q_nope", q_nope);
  chk::same_device(op, "w_uk", w_uk, "q_nope", q_nope);
  chk::same_device(op, "w_uv", w_uv, "q_nope", q_nope);

  Params p{};
  p.B = q_nope.size(0);
  p.S = q_nope.size(1);
  p.H = q_nope.size(2);
  p.Dn = q_nope.size(3);
  p.R = q_pe.size(3);
  p.C = w_uk.size(2);
  p.Dv = w_uv.size(1);
  const bool paged = block_table.has_value();
  if (paged) {
    chk::dim(op, "block_table", *block_table, 2);
    chk::dtype(op, "block_table", *block_table, at::kInt);
    chk::same_device(op, "block_table", *block_table, "q_nope", q_nope);
    chk::size(op, "block_table", *block_table, 0, p.B, "batch size B of q_nope");
    TORCH_CHECK_VALUE(latent_cache.size(1) >= 1, "latentmoe.", op,
                      ": argument 'latent_cache' (paged) needs page_size >= 1, got shape ", latent_cache.sizes());
    p.page_size = latent_cache.size(1);
    p.Lmax = block_table->size(1) * p.page_size;
    p.bt_sb = block_table->size(1);
    p.rows_per_major = p.page_size;
  } else {
    p.page_size = 0;
    p.Lmax = latent_cache.size(1);
    p.bt_sb = 0;
    p.rows_per_major = p.Lmax;
  }
  TORCH_CHECK_VALUE(p.H >= 1 && p.Dn >= 1, "latentmoe.", op,
                    ": argument 'q_nope' needs at least one head and one dim, got shape ", q_nope.sizes());
  TORCH_CHECK_VALUE(q_pe.size(0) == p.B && q_pe.size(1) == p.S && q_pe.size(2) == p.H, "latentmoe.", op,
                    ": argument 'q_pe' has shape ", q_pe.sizes(), " but 'q_nope' has shape ",
                    q_nope.sizes(), "; the first three dims [B, S, H] must match");
  if (!paged) chk::size(op, "latent_cache", latent_cache, 0, p.B, "batch size B of q_nope");
  TORCH_CHECK_VALUE(p.C >= 1, "latentmoe.", op, ": argument 'w_uk' needs C >= 1, got shape ", w_uk.sizes());
  chk::size(op, "latent_cache", latent_cache, 2, p.C + p.R, "C + R: kv_lora_rank of w_uk plus rope dim of q_pe");
  chk::size(op, "w_uk", w_uk, 0, p.H, "heads H of q_nope");
  chk::size(op, "w_uk", w_uk, 1, p.Dn, "qk_nope_head_dim of q_nope");
  chk::size(op, "w_uv", w_uv, 0, p.H, "heads H of q_nope");
  chk::size(op, "w_uv", w_uv, 2, p.C, "kv_lora_rank C of w_uk");
  TORCH_CHECK_VALUE(p.Dv >= 1, "latentmoe.", op, ": argument 'w_uv' needs v_head_dim >= 1, got shape ", w_uv.sizes());
  chk::size(op, "cache_seqlens", cache_seqlens, 0, p.B, "batch size B of q_nope");
  last_dim_contiguous(op, "q_nope", q_nope);
  last_dim_contiguous(op, "q_pe", q_pe);
  last_dim_contiguous(op, "latent_cache", latent_cache);
  last_dim_contiguous(op, "w_uk", w_uk);
  last_dim_contiguous(op, "w_uv", w_uv);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), "latentmoe.", op,
                    ": argument 'softmax_scale' must be finite, got ", softmax_scale);
  if (p.B > 0) {
    // One small device-to-host copy on CUDA: an out-of-range length would read out of bounds.
    // .contiguous(): a strided CPU tensor is its own .to(kCPU), and its values are read below as a
    // plain array (the kernels take cache_seqlens.contiguous(), so check those same values).
    auto lens = cache_seqlens.to(at::kCPU).contiguous();
    const int32_t* lp = lens.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < p.B; ++b) {
      TORCH_CHECK_VALUE(lp[b] >= 0 && lp[b] <= p.Lmax, "latentmoe.", op, ": argument 'cache_seqlens'[", b,
                        "] = ", lp[b], " is outside [0, ", p.Lmax, "] (the capacity of ",
                        paged ? "'block_table' rows: max_pages * page_size)" : "'latent_cache': Lmax)");
    }
    if (paged) {
      // Every page a row reads must exist (one more small device-to-host copy on CUDA).
      auto bt = block_table->to(at::kCPU).contiguous();
      const int32_t* bp = bt.const_data_ptr<int32_t>();
      const int64_t num_pages = latent_cache.size(0);
      for (int64_t b = 0; b < p.B; ++b) {
        const int64_t used = (lp[b] + p.page_size - 1) / p.page_size;
        for (int64_t k = 0; k < used; ++k) {
          const int32_t page = bp[b * p.bt_sb + k];
          TORCH_CHECK_VALUE(page >= 0 && page < num_pages, "latentmoe.", op, ": argument 'block_table'[", b, ", ",
                            k, "] = ", page, " is outside [0, ", num_pages, ") (pages of 'latent_cache')");
        }
      }
    }
  }
  p.qn_sb = q_nope.stride(0);
  p.qn_ss = q_nope.stride(1);
  p.qn_sh = q_nope.stride(2);
  p.qp_sb = q_pe.stride(0);
  p.qp_ss = q_pe.stride(1);
  p.qp_sh = q_pe.stride(2);
  p.kv_sb = latent_cache.stride(0);
  p.kv_sl = latent_cache.stride(1);
  p.wuk_sh = w_uk.stride(0);
  p.wuk_sd = w_uk.stride(1);
  p.wuv_sh = w_uv.stride(0);
  p.wuv_sd = w_uv.stride(1);
  p.scale = static_cast<float>(softmax_scale);
  TORCH_CHECK_VALUE(window >= -1, "latentmoe.", op, ": argument 'window' must be >= -1 (-1: no window), got ",
                    window);
  p.causal = causal;
  p.window = window;
  return p;
}

// Extra checks of the backward: grad_out / out [B, S, H, Dv] in the input dtype, grad_lse / lse
// [B, S, H] fp32.
inline void check_backward_args(const char* op, const Params& p, const at::Tensor& q_nope,
                                const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> o_shape{p.B, p.S, p.H, p.Dv};
  const std::vector<int64_t> l_shape{p.B, p.S, p.H};
  chk::same_dtype(op, "grad_out", grad_out, "q_nope", q_nope);
  chk::same_dtype(op, "out", out, "q_nope", q_nope);
  chk::dtype(op, "grad_lse", grad_lse, at::kFloat);
  chk::dtype(op, "lse", lse, at::kFloat);
  chk::same_device(op, "grad_out", grad_out, "q_nope", q_nope);
  chk::same_device(op, "grad_lse", grad_lse, "q_nope", q_nope);
  chk::same_device(op, "out", out, "q_nope", q_nope);
  chk::same_device(op, "lse", lse, "q_nope", q_nope);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(o_shape), "latentmoe.", op,
                    ": argument 'grad_out' must have shape [B, S, H, Dv] = ", at::IntArrayRef(o_shape),
                    ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(o_shape), "latentmoe.", op,
                    ": argument 'out' must have shape [B, S, H, Dv] = ", at::IntArrayRef(o_shape), ", got ",
                    out.sizes());
  TORCH_CHECK_VALUE(grad_lse.sizes() == at::IntArrayRef(l_shape), "latentmoe.", op,
                    ": argument 'grad_lse' must have shape [B, S, H] = ", at::IntArrayRef(l_shape), ", got ",
                    grad_lse.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(l_shape), "latentmoe.", op,
                    ": argument 'lse' must have shape [B, S, H] = ", at::IntArrayRef(l_shape), ", got ",
                    lse.sizes());
}

// Validated, contiguous inputs and freshly allocated gradients of mla_prefill_backward, shared by
// the CPU kernel and the CUDA binding. Gradients of the cache and weights accumulate in fp32.
struct BackwardIO {
  Params p;
  at::Tensor block_table, grad_out, grad_lse, out, lse, seqlens;
  at::Tensor grad_q_nope, grad_q_pe, grad_cache, grad_w_uk, grad_w_uv;

  // (grad_q_nope, grad_q_pe, grad_latent_cache, grad_w_uk, grad_w_uv) in the inputs' dtype.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> results() const {
    const auto dt = grad_q_nope.scalar_type();
    return {grad_q_nope, grad_q_pe, grad_cache.to(dt), grad_w_uk.to(dt), grad_w_uv.to(dt)};
  }
};

inline BackwardIO prepare_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                   const at::Tensor& q_nope, const at::Tensor& q_pe,
                                   const at::Tensor& latent_cache, const at::Tensor& cache_seqlens,
                                   const at::Tensor& w_uk, const at::Tensor& w_uv, const at::Tensor& out,
                                   const at::Tensor& lse, double softmax_scale,
                                   const std::optional<at::Tensor>& block_table, bool causal, int64_t window) {
  BackwardIO io;
  io.p = check_args(op, q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, softmax_scale, block_table,
                    causal, window);
  check_backward_args(op, io.p, q_nope, grad_out, grad_lse, out, lse);
  const Params& p = io.p;
  io.block_table = block_table.has_value() ? block_table->contiguous() : at::Tensor();
  io.grad_out = grad_out.contiguous();
  io.grad_lse = grad_lse.contiguous();
  io.out = out.contiguous();
  io.lse = lse.contiguous();
  io.seqlens = cache_seqlens.contiguous();
  auto f32 = q_nope.options().dtype(at::kFloat);
  io.grad_q_nope = at::empty({p.B, p.S, p.H, p.Dn}, q_nope.options());
  io.grad_q_pe = at::empty({p.B, p.S, p.H, p.R}, q_nope.options());
  io.grad_cache = at::zeros(latent_cache.sizes(), f32);
  io.grad_w_uk = at::zeros({p.H, p.Dn, p.C}, f32);
  io.grad_w_uv = at::zeros({p.H, p.Dv, p.C}, f32);
  return io;
}

}  // namespace latentmoe::mla_prefill
