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

  // ---- projections ---------------------------------------------------------------------------
  // out [M, N] = input [M, K] @ weight [N, K]^T (+ bias [N]) for M <= 16 rows (decode-step
  // projections; nn.Linear's weight layout). Same dtype throughout (fp32/bf16/fp16, contiguous),
  // fp32 accumulation, out in input's dtype. CPU: streams each weight row once, threads split N,
  // deterministic. CUDA: cuBLAS. No autograd (inference; the modules use nn.Linear when a gradient
  // is needed).
  m.def("linear_small(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  // out [G, M, N] = input [G, M, K] @ weight [G, K, N] (torch.bmm) for M <= 16 rows per entry
  // (MLA's absorbed per-head products in a decode step). input contiguous; weight the same dtype
  // (fp32/bf16/fp16) with rows of N adjacent (stride(2) == 1) or a transposed view with rows of K
  // adjacent (stride(1) == 1), any other strides (slices of kv_b_proj's weight read in place).
  // fp32 accumulation, out in input's dtype, deterministic. CPU only, no autograd (inference).
  m.def("bmm_small(Tensor input, Tensor weight) -> Tensor");
  // out [M, N] = input [M, K] @ weight [N, K]^T (+ bias [N]) in fp32, any M: the CPU's own GEMM
  // tiles (csrc/cpu/gemm_f32.h) for large projections where ATen's fp32 GEMM runs below the
  // CPU's FMA rate (MKL on AMD CPUs). fp32, contiguous, deterministic. CPU only, no autograd
  // (inference; the modules use nn.Linear when a gradient is needed).
  m.def("linear_f32(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");

  // ---- MLA (multi-head latent attention) -------------------------------------------------------
  // Absorbed MLA attention on the latent cache (decode, MTP/speculative Sq > 1).
  //   q_latent [B, Sq, H, C] (= W_UK^T q_nope), q_pe [B, Sq, H, R] (rotated), fp32/bf16/fp16.
  //   kv_cache: contiguous [B, Lmax, C+R], or paged [num_pages, page_size, C+R] with
  //   block_table [B, max_pages] int32; rows are [c_kv | k_pe]. cache_seqlens [B] int32 counts the
  //   cached tokens per row, the Sq new ones included (query i sits at cache_seqlens - Sq + i).
  //   causal: query i sees keys <= its position; window >= 0: keys >= position - window; -1 = none.
  //   pe_cache: optional; when given, kv_cache holds only c_kv (last dim C) and pe_cache the k_pe
  //   rows (same leading dims, last dim R), e.g. HF's cache keys/values without a concat.
  // Returns out_latent [B, Sq, H, C] (q dtype; sum_j p_j c_kv_j) and lse [B, Sq, H] (fp32, natural
  // log). Rows with no visible key give 0 and -inf. Reads only; mutates nothing.
  //   max_seqlen: -1 = check cache_seqlens and the used block_table entries on a host copy (one
  //   device sync on CUDA); >= 0 = the caller's bound on every cache_seqlens entry (<= capacity):
  //   no host copy on CUDA (the call can be captured in a CUDA graph), rows longer than it are cut
  //   there and table entries are clamped into the pool, so bad values never read out of bounds.
  //   The CPU kernel checks the values either way. A SymInt, so a traced decode step over a
  //   growing cache (torch.compile, HF DynamicCache) keeps the length symbolic; the kernels get
  //   it concrete (int64_t).
  m.def(
      "mla_decode(Tensor q_latent, Tensor q_pe, Tensor kv_cache, Tensor cache_seqlens,"
      " Tensor? block_table, float softmax_scale, bool causal=True, int window=-1,"
      " Tensor? pe_cache=None, SymInt max_seqlen=-1) -> (Tensor out_latent, Tensor lse)");
  // A decode step's attention from the q projection's per-head queries (CPU only): q [B, S, H, N+R]
  // (q_nope = the first nope_dim = N values of each head, then the un-rotated rope part, R even),
  // cos / sin [B or 1, S, R] (HF rotary embeddings), kv_b_weight [H*(N+V), C] (kv_b_proj.weight:
  // per head N rows of W_UK, then V rows of W_UV), one dtype (fp32/bf16/fp16), contiguous, at most
  // 16 query rows B*S. Computes q_pe = RoPE(q[..., N:]) (rope_interleave: HF's layouts), q_latent =
  // q_nope @ W_UK per head, mla_decode(q_latent, q_pe, cache, ...) with the cache arguments as
  // mla_decode's (in q's dtype), and returns out [B, S, H, V] = o_latent @ W_UV^T per head, in q's
  // dtype; fp32 accumulation, each product rounded to the dtype as the separate ops round it.
  // Deterministic at a given thread count (mla_decode's key splits). No autograd (inference).
  m.def(
      "mla_decode_absorbed(Tensor q, Tensor cos, Tensor sin, Tensor kv_b_weight, Tensor kv_cache,"
      " Tensor cache_seqlens, Tensor? block_table, float softmax_scale, int nope_dim,"
      " bool rope_interleave=True, bool causal=True, int window=-1, Tensor? pe_cache=None,"
      " SymInt max_seqlen=-1) -> Tensor");
  // Fused cache append: c = kv_a_layernorm(kv_latent) (HF RMSNorm numerics), k_pe rotated with
  // HF's (cos, sin) in either RoPE layout, rows [c | k_pe] written at token slots
  // cache_seqlens[b] + s of row b (contiguous or paged cache). MUTATES kv_cache (only those slots).
  //   kv_latent [B, S, C], k_pe [B, S, R], norm_weight [C], cos/sin [B, S, R] (HF layout),
  //   cache_seqlens [B] int32 = tokens already cached (not updated here).
  //   check_values: check cache_seqlens + S <= capacity and the used block_table entries on a host
  //   copy (one device sync on CUDA). false (CUDA): no copy; slots outside the cache are skipped and
  //   pages clamped, so bad values never write out of bounds. The CPU kernel checks either way.
  m.def(
      "mla_append_cache(Tensor(a!) kv_cache, Tensor kv_latent, Tensor k_pe, Tensor norm_weight,"
      " float eps, Tensor cos, Tensor sin, Tensor cache_seqlens, Tensor? block_table,"
      " bool rope_interleave, bool check_values=True) -> ()");

  // ---- MoE (routing and experts) ---------------------------------------------------------------
  // DeepSeek-V3 top-k routing from fp32 router logits [T, E] (HF DeepseekV3TopkRouter semantics):
  // scores = sigmoid | softmax (score_func "sigmoid" | "softmax"); selection on scores + bias
  // (bias [E] fp32, optional, selection only); group-limited: keep the topk_group of n_group
  // groups with the largest top-2 sums, others excluded; top_k experts in descending biased
  // score, ties -> lower index. weights = scores at the experts, / (sum + 1e-20) if
  // norm_topk_prob, * routed_scaling_factor. Returns weights [T, k] fp32, indices [T, k] int64,
  // scores [T, E] fp32 (unbiased, for the aux loss and backward).
  m.def(
      "moe_route(Tensor logits, Tensor? e_score_correction_bias, int top_k, int n_group,"
      " int topk_group, str score_func, bool norm_topk_prob, float routed_scaling_factor)"
      " -> (Tensor weights, Tensor indices, Tensor scores)");
  // Gradient of moe_route's weights (and, optionally, its scores) w.r.t. the logits [T, E] fp32.
  m.def(
      "moe_route_backward(Tensor grad_weights, Tensor? grad_scores, Tensor scores, Tensor indices,"
      " str score_func, bool norm_topk_prob, float routed_scaling_factor) -> Tensor grad_logits");
  // Routed SwiGLU experts, HF layout: hidden [T, H], gate_up_proj [E, 2I, H] (gate rows then up
  // rows), down_proj [E, H, I], weights [T, k] (fp32 or hidden's dtype), indices [T, k] int64.
  //   out[t] = sum_k weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t),  e = indices[t, k]
  // (the k-sum in fp32, in k order: bitwise deterministic). (token, k) pairs are counting-sorted
  // by expert; experts with no tokens cost nothing. Also returns, for the backward:
  // sorted_pairs [T*k] int64 (pair id t*k+j in expert order, stable), expert_offsets [E+1] int64,
  // gate_up_out [T*k, 2I] (pre-activation gate|up, hidden's dtype, in sorted order).
  // check_values=false (CUDA): no host copy of the index range (no sync, CUDA-graph capturable);
  // pairs whose index lies outside [0, E) are then dropped, never read out of bounds. The CPU
  // checks either way.
  m.def(
      "moe_experts(Tensor hidden, Tensor gate_up_proj, Tensor down_proj, Tensor weights,"
      " Tensor indices, bool check_values=True) -> (Tensor out, Tensor sorted_pairs,"
      " Tensor expert_offsets, Tensor gate_up_out)");
  // Backward of moe_experts: grad_hidden [T, H], grad_gate_up_proj [E, 2I, H],
  // grad_down_proj [E, H, I], grad_weights [T, k] (weights' dtype). Deterministic.
  m.def(
      "moe_experts_backward(Tensor grad_out, Tensor hidden, Tensor gate_up_proj,"
      " Tensor down_proj, Tensor weights, Tensor sorted_pairs, Tensor expert_offsets,"
      " Tensor gate_up_out) -> (Tensor grad_hidden, Tensor grad_gate_up_proj,"
      " Tensor grad_down_proj, Tensor grad_weights)");
  // Prepacked experts (CPU, inference; csrc/cpu/moe_packed.cpp). moe_pack_weight copies an
  // HF-layout expert weight [E, N, K] (bf16 or fp32) into panels of 64 output columns:
  // gate_up=false (down_proj): column c of panel p is row 64p + c, P = ceil(N/64); gate_up=true
  // (gate_up_proj [E, 2I, H]): columns c < 32 are gate rows 32p + c, c >= 32 the up rows
  // I + 32p + c - 32, P = ceil(I/32); columns past the end are 0. bf16: [E, P, ceil(K/2), 64, 2],
  // element [e, p, q, c, j] = weight[e, row, 2q + j] (0 past K); fp32: [E, P, K, 64], element
  // [e, p, k, c] = weight[e, row, k]. The weight is not changed.
  m.def("moe_pack_weight(Tensor weight, bool gate_up) -> Tensor");
  // moe_experts's output (same math; sums in another order) from packed weights: hidden [T, H]
  // bf16 or fp32, gate_up_packed / down_packed from moe_pack_weight in hidden's dtype (bf16:
  // [E, ceil(I/32), ceil(H/2), 64, 2] and [E, ceil(H/64), ceil(I/2), 64, 2]; fp32:
  // [E, ceil(I/32), H, 64] and [E, ceil(H/64), I, 64]), weights [T, k] fp32 or hidden's dtype,
  // indices [T, k] int64 in [0, E), intermediate_size I. Returns out [T, H] in hidden's dtype.
  // No autograd (inference). Deterministic.
  m.def(
      "moe_experts_packed(Tensor hidden, Tensor gate_up_packed, Tensor down_packed, Tensor weights,"
      " Tensor indices, int intermediate_size) -> Tensor");

  // ---- MLA prefill ----
  // MLA attention of S new tokens over the latent cache (causal / windowed), decompressing the
  // latent to per-head K/V tile by tile inside the kernel (never materialised for all heads).
  // q_nope [B, S, H, Dn], q_pe [B, S, H, R] (rotated), latent_cache [B, Lmax, C+R]
  // (c_kv normalised | k_pe rotated; the S new tokens already written as each row's last S valid
  // tokens), cache_seqlens [B] int32 in [0, Lmax] (valid tokens per row, may differ),
  // w_uk [H, Dn, C], w_uv [H, Dv, C] (views of kv_b_proj.weight are fine). All floating inputs
  // share one dtype (fp32/bf16/fp16); last dims contiguous; fp32 accumulation.
  // Query i of row b sits at position p = cache_seqlens[b] - S + i and sees keys j < cache_seqlens[b]
  // with j <= p if causal and j >= p - window if window >= 0 (as mla_decode). Queries that see no
  // key (causal: rows shorter than S; empty rows) give out 0 and lse -inf.
  // Returns out [B, S, H, Dv] (input dtype) and lse [B, S, H] (fp32, natural log of the sum of
  // exp(softmax_scale * score)). Extra memory O(tokens), independent of H*head_dim*L.
  // Paged cache: latent_cache [num_pages, page_size, C+R] and block_table [B, max_pages] int32
  // (token t of row b in page block_table[b, t / page_size], slot t % page_size; capacity
  // max_pages * page_size), as mla_decode.
  m.def(
      "mla_prefill(Tensor q_nope, Tensor q_pe, Tensor latent_cache, Tensor cache_seqlens,"
      " Tensor w_uk, Tensor w_uv, float softmax_scale, Tensor? block_table=None, bool causal=True,"
      " int window=-1) -> (Tensor out, Tensor lse)");
  // Backward of mla_prefill (K/V recomputed per tile from the latent, probabilities from lse).
  // grad_out [B, S, H, Dv] (input dtype), grad_lse [B, S, H] fp32 (zeros if unused), out / lse as
  // returned by mla_prefill. Returns grad_q_nope, grad_q_pe, grad_latent_cache (the cache's shape,
  // contiguous or paged; zero outside the rows read), grad_w_uk, grad_w_uv, all in the input dtype.
  m.def(
      "mla_prefill_backward(Tensor grad_out, Tensor grad_lse, Tensor q_nope, Tensor q_pe,"
      " Tensor latent_cache, Tensor cache_seqlens, Tensor w_uk, Tensor w_uv, Tensor out,"
      " Tensor lse, float softmax_scale, Tensor? block_table=None, bool causal=True, int window=-1)"
      " -> (Tensor grad_q_nope, Tensor grad_q_pe,"
      " Tensor grad_latent_cache, Tensor grad_w_uk, Tensor grad_w_uv)");
}
