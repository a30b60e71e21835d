// Shapes, strides and index helpers of the MLA prefill op, shared by the CPU and CUDA kernels
// (torch-free, so the .cu files can include it).
//
// Conventions. Row b of the latent cache holds `seqlen_b = cache_seqlens[b]` valid tokens (the S
// new ones included, as the last S). Query i (0 <= i < S) sits at position p_i = seqlen_b - S + i
// and sees keys j < seqlen_b with j <= p_i when causal and j >= p_i - window when window >= 0
// (as mla_decode). Causal: a row with seqlen_b < S has its first S - seqlen_b queries at negative
// positions: they see nothing and give output 0 and LSE -inf (as does every query of an empty row).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace latentmoe::mla_prefill {

// Element strides of the (possibly strided) inputs; every last dim has stride 1.
// The cache is contiguous-by-row ([B, Lmax, C+R], page_size == 0) or paged
// ([num_pages, page_size, C+R] with block_table [B, max_pages]: token t of row b lives in page
// block_table[b, t / page_size], slot t % page_size; Lmax = max_pages * page_size).
struct Params {
  int64_t B, S, H, Dn, R, C, Dv, Lmax;
  int64_t qn_sb, qn_ss, qn_sh;   // q_nope [B, S, H, Dn]
  int64_t qp_sb, qp_ss, qp_sh;   // q_pe [B, S, H, R]
  int64_t kv_sb, kv_sl;          // latent_cache dims 0 and 1 (row or page, token or slot)
  int64_t page_size;             // 0: contiguous cache
  int64_t bt_sb;                 // block_table row stride (paged only)
  int64_t rows_per_major;        // tokens per cache dim-0 entry: Lmax, or page_size if paged
  bool causal;                   // a query sees no key after its position
  int64_t window;                // >= 0: a query sees no key before position - window; -1: none
  int64_t wuk_sh, wuk_sd;        // w_uk [H, Dn, C]
  int64_t wuv_sh, wuv_sd;        // w_uv [H, Dv, C]
  float scale;
};

// Position of query i in its row (negative: the query sees nothing).
LMOE_HD int64_t query_pos(int64_t seqlen, int64_t S, int64_t i) { return seqlen - S + i; }

// Keys visible to the query at position `pos`: [key_begin, key_end) (non-empty for live queries).
LMOE_HD int64_t key_begin(const Params& p, int64_t pos) {
  // (pos > window, not pos - window > 0: a window near INT64_MAX, "unbounded", must not overflow)
  return p.window >= 0 && pos > p.window ? pos - p.window : 0;
}
LMOE_HD int64_t key_end(const Params& p, int64_t seqlen, int64_t pos) {
  return p.causal && pos + 1 < seqlen ? pos + 1 : seqlen;
}

// First query index that sees at least one key (S if none does). Later queries all see some key.
LMOE_HD int64_t first_live_query(const Params& p, int64_t seqlen) {
  if (seqlen <= 0) return p.S;
  if (!p.causal) return 0;
  return seqlen >= p.S ? 0 : p.S - seqlen;
}

// Queries [first, end) are those that see some key of [t0, t1) (key_end grows and key_begin grows
// with the position, so the set is an interval). Clamped to [0, S].
LMOE_HD int64_t first_query_seeing(const Params& p, int64_t seqlen, int64_t t0) {
  int64_t i = p.causal ? t0 - (seqlen - p.S) : 0;  // key_end(pos) > t0  <=>  pos >= t0 (causal)
  const int64_t live = first_live_query(p, seqlen);
  if (i < live) i = live;
  return i > p.S ? p.S : i;
}
LMOE_HD int64_t end_query_seeing(const Params& p, int64_t seqlen, int64_t t1) {
  // i >= S <=> window >= seqlen - t1: tested first, so t1 + window below cannot overflow.
  if (p.window < 0 || p.window >= seqlen - t1) return p.S;
  const int64_t i = t1 + p.window - (seqlen - p.S);  // key_begin(pos) < t1  <=>  pos < t1 + window
  return i < 0 ? 0 : (i > p.S ? p.S : i);
}

// Where token t of row b lives: (dim-0 index, dim-1 index) of the cache tensor.
struct CacheSlot {
  int64_t major, minor;
};

LMOE_HD CacheSlot cache_slot(const Params& p, const int32_t* block_table, int64_t b, int64_t t) {
  if (p.page_size == 0) return {b, t};
  return {static_cast<int64_t>(block_table[b * p.bt_sb + t / p.page_size]), t % p.page_size};
}

// Element offset of the token's row in the (strided) cache input.
LMOE_HD int64_t cache_offset(const Params& p, CacheSlot s) { return s.major * p.kv_sb + s.minor * p.kv_sl; }

// Row index of the token in a contiguous [dim0, dim1, C+R] gradient buffer.
LMOE_HD int64_t grad_cache_row(const Params& p, CacheSlot s) { return s.major * p.rows_per_major + s.minor; }

}  // namespace latentmoe::mla_prefill
