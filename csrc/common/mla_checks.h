// Argument checks of the MLA ops, shared by the CPU and CUDA registrations. Every message names
// the op and the argument. Values (cache_seqlens, block_table) are checked on a host copy.
#pragma once

#include <algorithm>

#include <cmath>
#include <string>

#include <ATen/ATen.h>

#include "common/checks.h"

#include <utility>

namespace latentmoe::mla {

namespace chk = latentmoe::checks;

// Shapes of one mla_decode / mla_append_cache call.
struct CacheDims {
  int64_t B = 0;
  int64_t C = 0;          // kv_lora_rank
  int64_t R = 0;          // rope dim
  int64_t D = 0;          // C + R, one cache row
  bool paged = false;
  int64_t lmax = 0;       // contiguous: rows per batch entry
  int64_t num_pages = 0;  // paged
  int64_t page_size = 0;  // paged
  int64_t max_pages = 0;  // paged: block_table.size(1)
  int64_t capacity = 0;   // tokens a batch row can hold
  bool split = false;     // k_pe rows live in a separate pe_cache
  int64_t kv_stride = 0;  // values per row of kv_cache (C+R, or C when split)
  int64_t pe_stride = 0;  // values per row of the k_pe source (C+R, or R when split)
};

// kv_cache: contiguous [B, Lmax, C+R] or paged [num_pages, page_size, C+R] with block_table
// [B, max_pages] int32. With `pe_cache` given, kv_cache holds only c_kv (last dim C) and pe_cache
// the k_pe rows (same leading dims, last dim R). Checks shapes, dtypes, devices and contiguity
// (not values).
inline CacheDims check_cache(const char* op, const at::Tensor& kv_cache, const at::Tensor& cache_seqlens,
                             const c10::optional<at::Tensor>& block_table, int64_t B, int64_t C, int64_t R,
                             const at::Tensor& ref, const char* ref_name,
                             const c10::optional<at::Tensor>& pe_cache = c10::nullopt) {
  CacheDims d;
  d.B = B;
  d.C = C;
  d.R = R;
  d.D = C + R;
  d.split = pe_cache.has_value();
  d.kv_stride = d.split ? C : d.D;
  d.pe_stride = d.split ? R : d.D;
  chk::same_dtype(op, "kv_cache", kv_cache, ref_name, ref);
  chk::same_device(op, "kv_cache", kv_cache, ref_name, ref);
  chk::dim(op, "kv_cache", kv_cache, 3);
  if (d.split) {
    chk::size(op, "kv_cache", kv_cache, 2, C, "kv_lora_rank (k_pe rows are in pe_cache)");
  } else {
    const std::string what = "kv_lora_rank C=" + std::to_string(C) + " + rope dim R=" + std::to_string(R) +
                             ", as the other arguments give them";
    chk::size(op, "kv_cache", kv_cache, 2, d.D, what.c_str());
  }
  // Not chk::contiguous's "call .contiguous()": mla_append_cache writes into the cache in place, and
  // a contiguous copy would take the writes.
  TORCH_CHECK_VALUE(kv_cache.is_contiguous(), "latentmoe.", op, ": argument 'kv_cache' must be contiguous, got strides ",
                    kv_cache.strides(), "; allocate the cache contiguous (mla_append_cache writes into it in place)");
  if (d.split) {
    const at::Tensor& pe = *pe_cache;
    chk::same_dtype(op, "pe_cache", pe, ref_name, ref);
    chk::same_device(op, "pe_cache", pe, ref_name, ref);
    chk::dim(op, "pe_cache", pe, 3);
    chk::size(op, "pe_cache", pe, 0, kv_cache.size(0), "same leading dims as kv_cache");
    chk::size(op, "pe_cache", pe, 1, kv_cache.size(1), "same leading dims as kv_cache");
    chk::size(op, "pe_cache", pe, 2, R, "rope dim");
    chk::contiguous(op, "pe_cache", pe);
  }
  chk::dtype(op, "cache_seqlens", cache_seqlens, at::kInt);
  chk::same_device(op, "cache_seqlens", cache_seqlens, ref_name, ref);
  chk::dim(op, "cache_seqlens", cache_seqlens, 1);
  chk::size(op, "cache_seqlens", cache_seqlens, 0, B, "batch");
  chk::contiguous(op, "cache_seqlens", cache_seqlens);
  d.paged = block_table.has_value();
  if (d.paged) {
    const at::Tensor& bt = *block_table;
    chk::dtype(op, "block_table", bt, at::kInt);
    chk::same_device(op, "block_table", bt, ref_name, ref);
    chk::dim(op, "block_table", bt, 2);
    chk::size(op, "block_table", bt, 0, B, "batch");
    chk::contiguous(op, "block_table", bt);
    d.num_pages = kv_cache.size(0);
    d.page_size = kv_cache.size(1);
    d.max_pages = bt.size(1);
    TORCH_CHECK_VALUE(d.page_size >= 1, "latentmoe.", op, ": argument 'kv_cache' has page_size 0");
    // The unchecked paths clamp table entries into [0, num_pages): an empty pool has no such page.
    TORCH_CHECK_VALUE(d.num_pages >= 1, "latentmoe.", op, ": argument 'kv_cache' (paged) has no pages");
    d.capacity = d.max_pages * d.page_size;
  } else {
    chk::size(op, "kv_cache", kv_cache, 0, B, "batch (contiguous cache [B, Lmax, C+R])");
    d.lmax = kv_cache.size(1);
    d.capacity = d.lmax;
  }
  return d;
}

// Every row's token count `seqlens[b] + extra` must lie in [0, capacity]; block-table entries of
// pages holding those tokens must lie in [0, num_pages). One small device-to-host copy on CUDA.
// Returns the longest cache_seqlens entry (before `extra`), which sizes the decode splits.
inline int64_t check_cache_values(const char* op, const CacheDims& d, const at::Tensor& cache_seqlens,
                                  const c10::optional<at::Tensor>& block_table, int64_t extra) {
  // One host copy of lengths and table together (a single device sync on CUDA).
  // Host copy layout: [B lengths | B * max_pages table entries (paged only)].
  at::Tensor host = d.paged ? at::cat({cache_seqlens, block_table->reshape({-1})}) : cache_seqlens;
  host = host.to(at::kCPU);
  const int32_t* lp = host.const_data_ptr<int32_t>();
  const int32_t* table_base = lp + d.B;
  int64_t longest = 0;
  for (int64_t b = 0; b < d.B; ++b) {
    const int64_t n = static_cast<int64_t>(lp[b]) + extra;
    TORCH_CHECK_VALUE(lp[b] >= 0, "latentmoe.", op, ": argument 'cache_seqlens' has a negative entry ",
                      lp[b], " at row ", b);
    TORCH_CHECK_VALUE(n <= d.capacity, "latentmoe.", op, ": argument 'cache_seqlens' row ", b, " needs ", n,
                      " tokens but the cache holds ", d.capacity, " per row");
    longest = std::max<int64_t>(longest, lp[b]);
    if (d.paged) {
      const int32_t* tp = table_base + b * d.max_pages;
      const int64_t used = (n + d.page_size - 1) / d.page_size;
      for (int64_t p = 0; p < used; ++p) {
        TORCH_CHECK_VALUE(tp[p] >= 0 && tp[p] < d.num_pages, "latentmoe.", op,
                          ": argument 'block_table' entry [", b, ", ", p, "] = ", tp[p],
                          " is out of range [0, ", d.num_pages, ")");
      }
    }
  }
  return longest;
}

// mla_decode's max_seqlen: -1 means "check cache_seqlens and the block table on the host and take
// the longest row" (returns -1 for the caller to do that); otherwise a caller-given bound on every
// cache_seqlens entry (no host copy: CUDA graphs can capture the call), at most the capacity.
inline int64_t check_max_seqlen(const char* op, int64_t max_seqlen, const CacheDims& d) {
  TORCH_CHECK_VALUE(max_seqlen >= -1 && max_seqlen <= d.capacity, "latentmoe.", op,
                    ": argument 'max_seqlen' must be -1 (check lengths on the host) or in [0, capacity = ",
                    d.capacity, "], got ", max_seqlen);
  return max_seqlen;
}

// q_latent [B, Sq, H, C], q_pe [B, Sq, H, R]: floating, same dtype/device, contiguous.
// Scalar arguments of mla_decode.
inline void check_decode_scalars(double softmax_scale, int64_t window, const char* op = "mla_decode") {
  TORCH_CHECK_VALUE(window >= -1, "latentmoe.", op, ": argument 'window' must be >= -1 (-1 = no window), got ",
                    window);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), "latentmoe.", op, ": argument 'softmax_scale' must be finite");
}

inline void check_decode_queries(const char* op, const at::Tensor& q_latent, const at::Tensor& q_pe) {
  chk::floating(op, "q_latent", q_latent);
  chk::dim(op, "q_latent", q_latent, 4);
  chk::same_dtype(op, "q_pe", q_pe, "q_latent", q_latent);
  chk::same_device(op, "q_pe", q_pe, "q_latent", q_latent);
  chk::dim(op, "q_pe", q_pe, 4);
  for (int64_t i = 0; i < 3; ++i) {
    TORCH_CHECK_VALUE(q_pe.size(i) == q_latent.size(i), "latentmoe.", op, ": argument 'q_pe' has shape ",
                      q_pe.sizes(), " but 'q_latent' has shape ", q_latent.sizes(),
                      "; dims B, Sq, H must match");
  }
  chk::contiguous(op, "q_latent", q_latent);
  chk::contiguous(op, "q_pe", q_pe);
  chk::nonempty(op, "q_latent", q_latent);
}

// mla_append_cache inputs: kv_latent [B, S, C], k_pe / cos / sin [B, S, R] (R even), norm_weight
// [C]; floating, one dtype and device; kv_latent and k_pe with unit-stride rows (any other strides:
// e.g. the two slices of kv_a_proj_with_mqa's output), the others contiguous; eps finite and >= 0.
// (The cache is checked by check_cache.)
inline void check_append_args(const char* op, const at::Tensor& kv_latent,
                       const at::Tensor& k_pe, const at::Tensor& norm_weight, const at::Tensor& cos,
                       const at::Tensor& sin, double eps) {
  chk::floating(op, "kv_latent", kv_latent);
  chk::dim(op, "kv_latent", kv_latent, 3);
  chk::rows_contiguous(op, "kv_latent", kv_latent);
  chk::rows_contiguous(op, "k_pe", k_pe);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"k_pe", k_pe}, {"cos", cos}, {"sin", sin}}) {
    chk::same_dtype(op, name, t, "kv_latent", kv_latent);
    chk::same_device(op, name, t, "kv_latent", kv_latent);
    chk::dim(op, name, t, 3);
    TORCH_CHECK_VALUE(t.size(0) == kv_latent.size(0) && t.size(1) == kv_latent.size(1), "latentmoe.", op,
                      ": argument '", name, "' has shape ", t.sizes(), " but 'kv_latent' has shape ",
                      kv_latent.sizes(), "; dims B, S must match");
  }
  TORCH_CHECK_VALUE(k_pe.size(2) % 2 == 0, "latentmoe.", op, ": argument 'k_pe' rope dim must be even, got ",
                    k_pe.size(2));
  chk::size(op, "cos", cos, 2, k_pe.size(2), "rope dim of k_pe");
  chk::size(op, "sin", sin, 2, k_pe.size(2), "rope dim of k_pe");
  chk::contiguous(op, "cos", cos);
  chk::contiguous(op, "sin", sin);
  chk::same_dtype(op, "norm_weight", norm_weight, "kv_latent", kv_latent);
  chk::same_device(op, "norm_weight", norm_weight, "kv_latent", kv_latent);
  chk::dim(op, "norm_weight", norm_weight, 1);
  chk::size(op, "norm_weight", norm_weight, 0, kv_latent.size(2), "kv_lora_rank");
  chk::contiguous(op, "norm_weight", norm_weight);
  chk::nonempty(op, "kv_latent", kv_latent);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "latentmoe.", op, ": argument 'eps' must be finite and >= 0, got ",
                    eps);
}

// Shapes of one mla_decode_absorbed call.
struct AbsorbedDims {
  int64_t B = 0, S = 0, H = 0;
  int64_t N = 0;  // nope dim: q's first N values per head, W_UK's rows per head
  int64_t R = 0;  // rope dim: q's last R values per head
  int64_t C = 0;  // kv_lora_rank: kv_b_weight's columns
  int64_t V = 0;  // value dim: W_UV's rows per head
};

// mla_decode_absorbed's own arguments (the cache is checked by check_cache): q [B, S, H, N + R]
// with nope_dim = N and R even, cos / sin [B or 1, S, R], kv_b_weight [H * (N + V), C] with C >= 1;
// one floating dtype and device, contiguous, at most max_rows query rows (B * S).
inline AbsorbedDims check_absorbed_args(const char* op, const at::Tensor& q, const at::Tensor& cos,
                                        const at::Tensor& sin, const at::Tensor& kv_b_weight, int64_t nope_dim,
                                        int64_t max_rows) {
  AbsorbedDims a;
  chk::floating(op, "q", q);
  chk::dim(op, "q", q, 4);
  chk::contiguous(op, "q", q);
  chk::nonempty(op, "q", q);
  a.B = q.size(0);
  a.S = q.size(1);
  a.H = q.size(2);
  TORCH_CHECK_VALUE(a.B * a.S <= max_rows, "latentmoe.", op, ": argument 'q' has ", a.B * a.S,
                    " query rows (batch * tokens); the op takes at most ", max_rows,
                    " (a decode step; use mla_decode with torch.bmm for more)");
  TORCH_CHECK_VALUE(nope_dim >= 0 && nope_dim <= q.size(3), "latentmoe.", op, ": argument 'nope_dim' (", nope_dim,
                    ") must be in [0, q.size(3) = ", q.size(3), "]");
  a.N = nope_dim;
  a.R = q.size(3) - nope_dim;
  TORCH_CHECK_VALUE(a.R % 2 == 0, "latentmoe.", op, ": argument 'q' gives the rope dim q.size(3) - nope_dim = ", a.R,
                    ", which must be even (shape ", q.sizes(), ", nope_dim ", nope_dim, ")");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    chk::same_dtype(op, name, t, "q", q);
    chk::same_device(op, name, t, "q", q);
    chk::dim(op, name, t, 3);
    chk::contiguous(op, name, t);
    TORCH_CHECK_VALUE((t.size(0) == a.B || t.size(0) == 1) && t.size(1) == a.S && t.size(2) == a.R, "latentmoe.",
                      op, ": argument '", name, "' has shape ", t.sizes(), " but must be [B or 1, S, R] = [", a.B,
                      " or 1, ", a.S, ", ", a.R, "] for 'q' of shape ", q.sizes(), " and nope_dim ", nope_dim);
  }
  chk::same_dtype(op, "kv_b_weight", kv_b_weight, "q", q);
  chk::same_device(op, "kv_b_weight", kv_b_weight, "q", q);
  chk::dim(op, "kv_b_weight", kv_b_weight, 2);
  chk::contiguous(op, "kv_b_weight", kv_b_weight);
  const int64_t rows = kv_b_weight.size(0);
  TORCH_CHECK_VALUE(rows % a.H == 0 && rows / a.H >= a.N && kv_b_weight.size(1) >= 1, "latentmoe.", op,
                    ": argument 'kv_b_weight' has shape ", kv_b_weight.sizes(), " but must be [H * (nope_dim + V), C] ",
                    "with H = ", a.H, " heads (q.size(2)), nope_dim = ", a.N, ", some V >= 0 and C >= 1");
  a.C = kv_b_weight.size(1);
  a.V = rows / a.H - a.N;
  return a;
}

}  // namespace latentmoe::mla
