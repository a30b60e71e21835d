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

  // ---- MLA prefill ----
  // Causal MLA attention of S new tokens over the latent cache, decompressing the latent to
  // per-head K/V tile by tile inside the kernel (never materialised for all heads).
  // q_nope [B, S, H, Dn], q_pe [B, S, H, R] (rotated), latent_cache [B, Lmax, C+R]
  // (c_kv normalised | k_pe rotated; the S new tokens already written as each row's last S valid
  // tokens), cache_seqlens [B] int32 in [0, Lmax] (valid tokens per row, may differ),
  // w_uk [H, Dn, C], w_uv [H, Dv, C] (views of kv_b_proj.weight are fine). All floating inputs
  // share one dtype (fp32/bf16/fp16); last dims contiguous; fp32 accumulation.
  // Query i of row b sits at position cache_seqlens[b] - S + i and sees keys 0..that position;
  // queries at negative positions (rows shorter than S, e.g. length 0) give out 0 and lse -inf.
  // Returns out [B, S, H, Dv] (input dtype) and lse [B, S, H] (fp32, natural log of the sum of
  // exp(softmax_scale * score)). Extra memory O(tokens), independent of H*head_dim*L.
  // Paged cache: latent_cache [num_pages, page_size, C+R] and block_table [B, max_pages] int32
  // (token t of row b in page block_table[b, t / page_size], slot t % page_size; capacity
  // max_pages * page_size), as mla_decode.
  m.def(
      "mla_prefill_fused(Tensor q_nope, Tensor q_pe, Tensor latent_cache, Tensor cache_seqlens,"
      " Tensor w_uk, Tensor w_uv, float softmax_scale, Tensor? block_table=None)"
      " -> (Tensor out, Tensor lse)");
  // Backward of mla_prefill_fused (K/V recomputed per tile from the latent, probabilities from lse).
  // grad_out [B, S, H, Dv] (input dtype), grad_lse [B, S, H] fp32 (zeros if unused), out / lse as
  // returned by mla_prefill_fused. Returns grad_q_nope, grad_q_pe, grad_latent_cache (the cache's shape,
  // contiguous or paged; zero outside the rows read), grad_w_uk, grad_w_uv, all in the input dtype.
  m.def(
      "mla_prefill_fused_backward(Tensor grad_out, Tensor grad_lse, Tensor q_nope, Tensor q_pe,"
      " Tensor latent_cache, Tensor cache_seqlens, Tensor w_uk, Tensor w_uv, Tensor out,"
      " Tensor lse, float softmax_scale, Tensor? block_table=None) -> (Tensor grad_q_nope, Tensor grad_q_pe,"
      " Tensor grad_latent_cache, Tensor grad_w_uk, Tensor grad_w_uv)");
}
