// MLA math shared by the CPU and CUDA kernels (float in, float out; no torch types):
// which cache positions a query sees, where a token lives in a contiguous or paged latent cache,
// merging split partials by their log-sum-exp, and HF's two RoPE layouts.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/math.h"

namespace latentmoe::mla {

// Keys [lo, hi) of the cache that query `q_index` (of `num_queries` new tokens, the last ones of a
// sequence of `seqlen` cached tokens) may attend to. The query sits at position
// p = seqlen - num_queries + q_index; causal keeps j <= p; window >= 0 keeps j >= p - window
// (FlashAttention's left window). hi <= lo means no visible key (output 0, LSE -inf).
struct KeyRange {
  int64_t lo;
  int64_t hi;
};

LMOE_HD KeyRange visible_keys(int64_t seqlen, int64_t num_queries, int64_t q_index, bool causal,
                              int64_t window) {
  const int64_t p = seqlen - num_queries + q_index;
  KeyRange r{0, seqlen};
  if (causal && p + 1 < r.hi) r.hi = p + 1;
  if (window >= 0 && p > window) r.lo = p - window;  // (not p - window > 0: no overflow near INT64_MAX)
  if (r.hi < r.lo) r.hi = r.lo;
  return r;
}

// Row index (in units of cache rows of C+R values) of token `t` (< capacity) of batch row `b`.
// Contiguous cache [B, Lmax, D]: b * Lmax + t. Paged cache [num_pages, page_size, D]:
// block_table[b, t / page_size] * page_size + t % page_size, with the page clamped to
// [0, num_pages): a no-op for checked tables, and unchecked ones (ops called without the host
// check) still never address memory outside the pool.
LMOE_HD int64_t cache_row(const int32_t* block_table, int64_t max_pages, int64_t page_size,
                          int64_t lmax, int64_t num_pages, int64_t b, int64_t t) {
  if (block_table == nullptr) return b * lmax + t;
  int64_t page = block_table[b * max_pages + t / page_size];
  page = page < 0 ? 0 : (page >= num_pages ? num_pages - 1 : page);
  return page * page_size + t % page_size;
}

// Merge of split partials (running max m_i, sum l_i, unnormalised accumulators) of one query
// row: weight of split i is exp(m_i - m_max). Empty splits (l_i == 0, m_i == -inf) weigh 0; a
// split whose sum is NaN (a NaN score) weighs NaN, so the NaN reaches the output and LSE.
LMOE_HD float merge_weight(float m_i, float l_i, float m_max) {
  if (l_i != l_i) return l_i;
  return (l_i > 0.0f && m_i != -INFINITY) ? math::fast_exp(m_i - m_max) : 0.0f;
}

// HF RoPE for one rotary pair index i of a vector of R (= 2*half) values, reading x with
// `x(k)`, cos with `cs(k)` and sin with `sn(k)` (the full cos/sin rows, HF's cat(freqs, freqs)
// layout, length R); the results are the values for positions i and half + i.
// interleave: pair (x[2i], x[2i+1]) with cos[i], sin[i].
// rotate_half: lo = x[i] cos[i] - x[half+i] sin[i]; hi = x[half+i] cos[half+i] + x[i] sin[half+i].
// The accessors let a caller read straight from memory of any dtype (the CUDA append kernel: no
// staging buffer, so any R), or from float rows (rope_pair below).
template <typename X, typename Cs, typename Sn>
LMOE_HD void rope_pair_at(const X& x, const Cs& cs, const Sn& sn, int64_t half, int64_t i, bool interleave,
                          float* lo, float* hi) {
  if (interleave) {
    math::rope_rotate(x(2 * i), x(2 * i + 1), cs(i), sn(i), lo, hi);
  } else {
    const float x1 = x(i), x2 = x(half + i);
    *lo = x1 * cs(i) - x2 * sn(i);
    *hi = x2 * cs(half + i) + x1 * sn(half + i);
  }
}

// rope_pair_at on float rows x, cos, sin of length R; results go to out[i] and out[half + i].
LMOE_HD void rope_pair(const float* x, const float* cos, const float* sin, int64_t half, int64_t i,
                       bool interleave, float* out) {
  rope_pair_at([x](int64_t k) { return x[k]; }, [cos](int64_t k) { return cos[k]; },
               [sin](int64_t k) { return sin[k]; }, half, i, interleave, &out[i], &out[half + i]);
}

}  // namespace latentmoe::mla
