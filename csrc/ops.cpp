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
  // Absorbed MLA attention on the latent cache (decode, MTP/speculative Sq > 1).
  //   q_latent [B, Sq, H, C] (= W_UK^T q_nope), q_pe [B, Sq, H, R] (rotated), fp32/bf16/fp16.
  //   kv_cache: contiguous [B, Lmax, C+R], or paged [num_pages, page_size, C+R] with
  //   block_table [B, max_pages] int32; rows are [c_kv | k_pe]. cache_seqlens [B] int32 counts the
  //   cached tokens per row, the Sq new ones included (query i sits at cache_seqlens - Sq + i).
  //   causal: query i sees keys <= its position; window >= 0: keys >= position - window; -1 = none.
  // Returns out_latent [B, Sq, H, C] (q dtype; sum_j p_j c_kv_j) and lse [B, Sq, H] (fp32, natural
  // log). Rows with no visible key give 0 and -inf. Reads only; mutates nothing.
  m.def(
      "mla_decode(Tensor q_latent, Tensor q_pe, Tensor kv_cache, Tensor cache_seqlens,"
      " Tensor? block_table, float softmax_scale, bool causal=True, int window=-1)"
      " -> (Tensor out_latent, Tensor lse)");
  // Fused cache append: c = kv_a_layernorm(kv_latent) (HF RMSNorm numerics), k_pe rotated with
  // HF's (cos, sin) in either RoPE layout, rows [c | k_pe] written at token slots
  // cache_seqlens[b] + s of row b (contiguous or paged cache). MUTATES kv_cache (only those slots).
  //   kv_latent [B, S, C], k_pe [B, S, R], norm_weight [C], cos/sin [B, S, R] (HF layout),
  //   cache_seqlens [B] int32 = tokens already cached (not updated here).
  m.def(
      "mla_append_cache(Tensor(a!) kv_cache, Tensor kv_latent, Tensor k_pe, Tensor norm_weight,"
      " float eps, Tensor cos, Tensor sin, Tensor cache_seqlens, Tensor? block_table,"
      " bool rope_interleave) -> ()");

  // ---- MoE (routing and experts) ---------------------------------------------------------------
}
