// Shapes, strides and index helpers of the MLA prefill op, shared by the CPU and CUDA kernels
// (torch-free, so the .cu files can include it).
//
// Conventions. Row b of the latent cache holds `seqlen_b = cache_seqlens[b]` valid tokens (the S
// new ones included, as the last S). Query i (0 <= i < S) sits at position p_i = seqlen_b - S + i
// and sees keys 0..p_i. A row with seqlen_b < S has its first S - seqlen_b queries at negative
// positions: they see nothing and give output 0 and LSE -inf (this also covers seqlen_b == 0).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace latentmoe::mla_prefill {

// Element strides of the (possibly strided) inputs; every last dim has stride 1.
struct Params {
  int64_t B, S, H, Dn, R, C, Dv, Lmax;
  int64_t qn_sb, qn_ss, qn_sh;   // q_nope [B, S, H, Dn]
  int64_t qp_sb, qp_ss, qp_sh;   // q_pe [B, S, H, R]
  int64_t kv_sb, kv_sl;          // latent_cache [B, Lmax, C+R]
  int64_t wuk_sh, wuk_sd;        // w_uk [H, Dn, C]
  int64_t wuv_sh, wuv_sd;        // w_uv [H, Dv, C]
  float scale;
};

// Position of query i in its row (negative: the query sees nothing).
LMOE_HD int64_t query_pos(int64_t seqlen, int64_t S, int64_t i) { return seqlen - S + i; }

// First query index with a non-negative position (it sees at least key 0).
LMOE_HD int64_t first_live_query(int64_t seqlen, int64_t S) {
  return seqlen >= S ? 0 : S - seqlen;
}

// First query index that sees key j (every later query sees it too).
LMOE_HD int64_t first_query_seeing(int64_t seqlen, int64_t S, int64_t j) {
  int64_t i = j - (seqlen - S);
  return i < 0 ? 0 : i;
}

}  // namespace latentmoe::mla_prefill
