// MLA CPU kernels: absorbed decode on the latent cache and the fused cache append.
//
// mla_decode: work items are (batch row, group of query rows, split of the keys), run with
// at::parallel_for. An item walks its keys in tiles of kTile cache rows; each tile is read once
// for all query rows of the group (query row = (s, h) pair) and stays in L2 between its two uses:
// scores and the weighted sum are register-blocked fp32 micro-kernels (vec8.h: AVX2+FMA clone
// where the CPU has it), with a vectorised online softmax per row in between (common/math.h
// state). fp32 accumulators; splits are merged by their LSE.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/math.h"
#include "common/mla_checks.h"
#include "common/mla_math.h"
#include "cpu/vec8.h"

namespace latentmoe::cpu {
namespace {

namespace chk = latentmoe::checks;

constexpr int64_t kTile = 128;       // cache rows per tile (128 x 576 fp32 = 288 KiB: fits L2)
constexpr int64_t kRowGroup = 64;    // query rows per work item
constexpr int64_t kMinSplit = 256;   // fewest keys worth a split of its own

// One tile of n keys (fp32 rows k[n, D], row stride ldk) for the item's m query rows: scores,
// online softmax per row, then acc[m, C] += weights . k[:, :C]. Rows with no visible key in the
// tile (a >= e) get weights 0 and keep their state.
struct TileRows {
  const mla::KeyRange* ranges;  // per query row, in absolute key positions
  int64_t t0;                   // absolute position of the tile's first key
};

using DecodeTileFn = void (*)(int64_t m, int64_t n, int64_t D, int64_t C, const float* q, const float* k, int64_t ldk,
                              float* scores, int64_t lds, float* acc, TileRows rows, math::SoftmaxState* st);

struct DecodeParams {
  int64_t B, Sq, H, C, R, D;
  int64_t lmax, page_size, max_pages, num_pages;
  int64_t kv_stride, pe_stride;  // row strides of the c_kv and k_pe sources
  bool split;                    // k_pe rows come from a separate pe_cache
  const int32_t* block_table;    // null: contiguous
  const int32_t* seqlens;
  float scale;
  bool causal;
  int64_t window;
  int64_t n_splits, split_len, n_groups;
  DecodeTileFn tile_fn;          // decode_tile_avx2 or decode_tile_generic
  bool avx2;                     // the AVX2+FMA(+F16C) tile kernel and cache-row widening
};

namespace v8 = latentmoe::cpu::vec8;
using v8::v8f;

// ---- fp32 tile micro-kernels (vec8.h; inlined into decode_tile_avx2 and decode_tile_generic) ----
// Register blocks: scores 4 query rows x 3 keys (12 accumulators, reduced over D in lanes of 8);
// weighted sum 4 query rows x 24 latent columns (12 accumulators, over the tile's keys).

// s[i, j] = q[i, :D] . k[j, :D] for i < MR, j < NR.
template <int MR, int NR>
LMOE_V8_INLINE void scores_block(int64_t D, const float* q, int64_t ldq, const float* k, int64_t ldk, float* s,
                                 int64_t lds) {
  v8f acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = v8::splat(0.f);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    v8f kv[NR];
    for (int j = 0; j < NR; ++j) kv[j] = v8::load(k + j * ldk + d);
    for (int i = 0; i < MR; ++i) {
      const v8f qv = v8::load(q + i * ldq + d);
      for (int j = 0; j < NR; ++j) acc[i][j] += qv * kv[j];
    }
  }
  for (int j = 0; j < NR; ++j) {
    // The MR rows' lane sums for key j in one reduction (rows past MR padded with zeros).
    const auto row = [&](int i) { return i < MR ? acc[i < MR ? i : 0][j] : v8::splat(0.f); };
    const v8::v4f t = v8::hsum4(row(0), row(1), row(2), row(3));
    for (int i = 0; i < MR; ++i) {
      float u = t[i];
      for (int64_t dd = d; dd < D; ++dd) u += q[i * ldq + dd] * k[j * ldk + dd];
      s[i * lds + j] = u;
    }
  }
}

template <int MR>
LMOE_V8_INLINE void scores_rows(int64_t n, int64_t D, const float* q, int64_t ldq, const float* k, int64_t ldk,
                                float* s, int64_t lds) {
  int64_t j = 0;
  for (; j + 3 <= n; j += 3) scores_block<MR, 3>(D, q, ldq, k + j * ldk, ldk, s + j, lds);
  if (n - j == 2) scores_block<MR, 2>(D, q, ldq, k + j * ldk, ldk, s + j, lds);
  if (n - j == 1) scores_block<MR, 1>(D, q, ldq, k + j * ldk, ldk, s + j, lds);
}

// acc[i, c] += sum_j p[i, j] * v[j, c] for i < MR, c in [c0, c0 + 8 NV), j < n.
template <int MR, int NV>
LMOE_V8_INLINE void pv_block(int64_t n, const float* p, int64_t ldp, const float* v, int64_t ldv, float* acc,
                             int64_t ldacc) {
  v8f o[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < NV; ++c) o[i][c] = v8::load(acc + i * ldacc + 8 * c);
  for (int64_t j = 0; j < n; ++j) {
    v8f vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = v8::load(v + j * ldv + 8 * c);
    for (int i = 0; i < MR; ++i) {
      const float w = p[i * ldp + j];  // vector * scalar: one broadcast
      for (int c = 0; c < NV; ++c) o[i][c] += vv[c] * w;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < NV; ++c) v8::store(acc + i * ldacc + 8 * c, o[i][c]);
}

template <int MR>
LMOE_V8_INLINE void pv_rows(int64_t n, int64_t C, const float* p, int64_t ldp, const float* v, int64_t ldv,
                            float* acc, int64_t ldacc) {
  int64_t c = 0;
  for (; c + 24 <= C; c += 24) pv_block<MR, 3>(n, p, ldp, v + c, ldv, acc + c, ldacc);
  for (; c + 8 <= C; c += 8) pv_block<MR, 1>(n, p, ldp, v + c, ldv, acc + c, ldacc);
  for (int i = 0; i < MR; ++i)  // columns past the last multiple of 8
    for (int64_t cc = c; cc < C; ++cc) {
      float t = acc[i * ldacc + cc];
      for (int64_t j = 0; j < n; ++j) t += p[i * ldp + j] * v[j * ldv + cc];
      acc[i * ldacc + cc] = t;
    }
}

// Row i's online-softmax step over the tile's scores s[0, n): keys [a, e) are visible (a < e).
// Overwrites s with the weights exp(s - m_new) (0 outside [a, e)), updates st, and returns the
// factor the row's accumulator is multiplied by first.
LMOE_V8_INLINE float softmax_row(float* s, int64_t n, int64_t a, int64_t e, math::SoftmaxState& st) {
  float m_tile = -INFINITY;
  for (int64_t j = a; j < e; ++j) m_tile = std::max(m_tile, s[j]);
  const float m_new = std::max(st.m, m_tile);
  const float alpha = math::softmax_rescale(st.m, m_new);
  for (int64_t j = 0; j < a; ++j) s[j] = 0.f;
  for (int64_t j = e; j < n; ++j) s[j] = 0.f;
  v8f lsum = v8::splat(0.f);
  const v8f mv = v8::splat(m_new);
  int64_t j = a;
  for (; j + 8 <= e; j += 8) {
    const v8f w = v8::exp_nonpos(v8::load(s + j) - mv);
    v8::store(s + j, w);
    lsum += w;
  }
  float l = v8::hsum(lsum);
  for (; j < e; ++j) {
    s[j] = v8::exp_nonpos(s[j] - m_new);
    l += s[j];
  }
  st = {m_new, st.l * alpha + l};
  return alpha;
}


// Runs op.template rows<MR>(i) over row blocks [i, i + MR) covering [0, m): blocks of 4, then one
// tail block of 1 to 3 rows.
template <typename Op>
LMOE_V8_INLINE void for_row_blocks(int64_t m, const Op& op) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) op.template rows<4>(i);
  switch (m - i) {
    case 3: op.template rows<3>(i); break;
    case 2: op.template rows<2>(i); break;
    case 1: op.template rows<1>(i); break;
    default: break;
  }
}

struct ScoresOp {  // scores[i.., :n] = q[i..] . k^T
  int64_t n, D;
  const float* q;
  const float* k;
  int64_t ldk;
  float* scores;
  int64_t lds;
  template <int MR>
  LMOE_V8_INLINE void rows(int64_t i) const {
    scores_rows<MR>(n, D, q + i * D, D, k, ldk, scores + i * lds, lds);
  }
};

struct WeightedSumOp {  // acc[i.., :C] += p[i.., :n] . k[:, :C]
  int64_t n, C;
  const float* p;
  int64_t ldp;
  const float* k;
  int64_t ldk;
  float* acc;
  template <int MR>
  LMOE_V8_INLINE void rows(int64_t i) const {
    pv_rows<MR>(n, C, p + i * ldp, ldp, k, ldk, acc + i * C, C);
  }
};

LMOE_V8_INLINE void decode_tile_body(int64_t m, int64_t n, int64_t D, int64_t C, const float* q, const float* k,
                                     int64_t ldk, float* scores, int64_t lds, float* acc, TileRows rows,
                                     math::SoftmaxState* st) {
  for_row_blocks(m, ScoresOp{n, D, q, k, ldk, scores, lds});
  for (int64_t r = 0; r < m; ++r) {
    float* s = scores + r * lds;
    const int64_t a = std::max<int64_t>(rows.t0, rows.ranges[r].lo) - rows.t0;
    const int64_t e = std::min<int64_t>(rows.t0 + n, rows.ranges[r].hi) - rows.t0;
    if (a >= e) {
      for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
      continue;
    }
    const float alpha = softmax_row(s, n, a, e, st[r]);
    if (alpha != 1.f) {
      float* o = acc + r * C;
      for (int64_t c = 0; c < C; ++c) o[c] *= alpha;
    }
  }
  for_row_blocks(m, WeightedSumOp{n, C, scores, lds, k, ldk, acc});
}

LMOE_CPU_AVX2 void decode_tile_avx2(int64_t m, int64_t n, int64_t D, int64_t C, const float* q, const float* k,
                                    int64_t ldk, float* scores, int64_t lds, float* acc, TileRows rows,
                                    math::SoftmaxState* st) {
  decode_tile_body(m, n, D, C, q, k, ldk, scores, lds, acc, rows, st);
}

void decode_tile_generic(int64_t m, int64_t n, int64_t D, int64_t C, const float* q, const float* k, int64_t ldk,
                         float* scores, int64_t lds, float* acc, TileRows rows, math::SoftmaxState* st) {
  decode_tile_body(m, n, D, C, q, k, ldk, scores, lds, acc, rows, st);
}

// dst[0, n) = fp32 of src[0, n): 16-bit types with AVX2 (+F16C) where the CPU has it (c10::Half's
// scalar conversion is the slow part of an fp16 decode otherwise), other types by plain casts.
template <typename T>
void widen(const T* src, float* dst, int64_t n, bool avx2) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    if (avx2) {
      v8::widen_avx2<T>(src, dst, n);
      return;
    }
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(src[c]);
}

// One work item: rows [r0, r1) of batch b (row r = s * H + h), keys of split `sp`. Writes the
// unnormalised accumulators and (m, l) of each row to the partial buffers. Keys go in tiles of
// up to kTile rows: fp32 rows of a contiguous or page-contiguous cache are used in place; other
// dtypes and small pages are first gathered/converted into `tile`. Every key of a tile lies below
// the row's seqlen (valid data), so zero weights of keys a query does not see never meet NaN.
template <typename T>
void decode_item(const DecodeParams& p, const T* q_latent, const T* q_pe, const T* cache, const T* pe_src, int64_t b,
                 int64_t r0, int64_t r1, int64_t sp, float* acc_out, float* m_out, float* l_out,
                 std::vector<float>& qbuf, std::vector<float>& tile, std::vector<float>& scores) {
  const int64_t D = p.D, C = p.C, R = p.R, H = p.H;
  const int64_t nrows = r1 - r0;
  const int64_t seqlen = p.seqlens[b];
  // Pack the group's queries as fp32 rows [q_latent | q_pe] * scale.
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t qoff = b * p.Sq * H + r;
    float* dst = qbuf.data() + (r - r0) * D;
    const T* ql = q_latent + qoff * C;
    const T* qp = q_pe + qoff * R;
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<float>(ql[c]) * p.scale;
    for (int64_t c = 0; c < R; ++c) dst[C + c] = static_cast<float>(qp[c]) * p.scale;
  }
  std::vector<mla::KeyRange> ranges(nrows);
  int64_t lo_all = seqlen, hi_all = 0;
  for (int64_t i = 0; i < nrows; ++i) {
    ranges[i] = mla::visible_keys(seqlen, p.Sq, (r0 + i) / H, p.causal, p.window);
    if (ranges[i].hi > ranges[i].lo) {
      lo_all = std::min(lo_all, ranges[i].lo);
      hi_all = std::max(hi_all, ranges[i].hi);
    }
  }
  const int64_t k_begin = std::max(lo_all, sp * p.split_len);
  const int64_t k_end = std::min(hi_all, (sp + 1) * p.split_len);
  std::vector<math::SoftmaxState> st(nrows, math::softmax_empty());
  for (int64_t i = 0; i < nrows * C; ++i) acc_out[i] = 0.f;
  constexpr bool kIsFloat = std::is_same_v<T, float>;
  const bool in_place = kIsFloat && !p.split && (p.block_table == nullptr || p.page_size >= kTile / 4);
  for (int64_t t0 = k_begin; t0 < k_end;) {
    int64_t t1 = std::min(k_end, t0 + kTile);
    const float* k;
    if (in_place) {
      if (p.block_table != nullptr) t1 = std::min(t1, (t0 / p.page_size + 1) * p.page_size);  // stay in one page
      k = reinterpret_cast<const float*>(cache) +
          mla::cache_row(p.block_table, p.max_pages, p.page_size, p.lmax, p.num_pages, b, t0) * D;
    } else {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = mla::cache_row(p.block_table, p.max_pages, p.page_size, p.lmax, p.num_pages, b, t);
        float* dst = tile.data() + (t - t0) * D;
        widen(cache + row * p.kv_stride, dst, C, p.avx2);
        widen(pe_src + row * p.pe_stride, dst + C, R, p.avx2);
      }
      k = tile.data();
    }
    p.tile_fn(nrows, t1 - t0, D, C, qbuf.data(), k, D, scores.data(), kTile, acc_out, TileRows{ranges.data(), t0},
                st.data());
    t0 = t1;
  }
  for (int64_t i = 0; i < nrows; ++i) {
    m_out[i] = st[i].m;
    l_out[i] = st[i].l;
  }
}

template <typename T>
void mla_decode_impl(const DecodeParams& p, const T* q_latent, const T* q_pe, const T* cache, const T* pe_src,
                     T* out, float* lse) {
  const int64_t rows = p.Sq * p.H;
  // Partials: [B, n_splits, rows, C] accumulators and [B, n_splits, rows] (m, l).
  std::vector<float> acc(static_cast<size_t>(p.B * p.n_splits * rows * p.C));
  std::vector<float> ms(static_cast<size_t>(p.B * p.n_splits * rows));
  std::vector<float> ls(ms.size());
  const int64_t n_items = p.B * p.n_groups * p.n_splits;
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(kRowGroup * p.D), tile(kTile * p.D), scores(kRowGroup * kTile);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t sp = it % p.n_splits;
      const int64_t g = (it / p.n_splits) % p.n_groups;
      const int64_t b = it / (p.n_splits * p.n_groups);
      const int64_t r0 = g * kRowGroup, r1 = std::min(rows, r0 + kRowGroup);
      const int64_t base = (b * p.n_splits + sp) * rows + r0;
      decode_item<T>(p, q_latent, q_pe, cache, pe_src, b, r0, r1, sp, acc.data() + base * p.C, ms.data() + base,
                     ls.data() + base, qbuf, tile, scores);
    }
  });
  // Merge the splits of each (b, row) by LSE, normalise, write out and lse.
  at::parallel_for(0, p.B * rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> o(p.C);
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / rows, r = br % rows;
      float m_max = -INFINITY;
      for (int64_t sp = 0; sp < p.n_splits; ++sp) {
        const int64_t i = (b * p.n_splits + sp) * rows + r;
        if (ls[i] > 0.f) m_max = std::max(m_max, ms[i]);
      }
      std::fill(o.begin(), o.end(), 0.f);
      float l_sum = 0.f;
      for (int64_t sp = 0; sp < p.n_splits; ++sp) {
        const int64_t i = (b * p.n_splits + sp) * rows + r;
        const float w = mla::merge_weight(ms[i], ls[i], m_max);
        if (w == 0.f) continue;
        l_sum += w * ls[i];
        const float* a = acc.data() + i * p.C;
#pragma omp simd
        for (int64_t c = 0; c < p.C; ++c) o[c] += w * a[c];
      }
      const float inv = math::softmax_inv_sum(l_sum);
      T* dst = out + br * p.C;
      for (int64_t c = 0; c < p.C; ++c) dst[c] = static_cast<T>(o[c] * inv);
      lse[br] = math::softmax_lse({m_max, l_sum});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cpu(const at::Tensor& q_latent, const at::Tensor& q_pe,
                                                  const at::Tensor& kv_cache, const at::Tensor& cache_seqlens_in,
                                                  const c10::optional<at::Tensor>& block_table_in,
                                                  double softmax_scale, bool causal, int64_t window,
                                                  const c10::optional<at::Tensor>& pe_cache, int64_t max_seqlen) {
  const char* op = "mla_decode";
  mla::check_decode_queries(op, q_latent, q_pe);
  const int64_t B = q_latent.size(0), Sq = q_latent.size(1), H = q_latent.size(2);
  const int64_t C = q_latent.size(3), R = q_pe.size(3);
  auto d = mla::check_cache(op, kv_cache, cache_seqlens_in, block_table_in, B, C, R, q_latent, "q_latent", pe_cache);
  const at::Tensor cache_seqlens = chk::private_copy(cache_seqlens_in);  // checked and read: the same values
  const c10::optional<at::Tensor> block_table = chk::private_copy(block_table_in);
  mla::check_decode_scalars(softmax_scale, window);
  // The CPU always checks the values (no device sync to save); a given max_seqlen must bound them.
  mla::check_max_seqlen(op, max_seqlen, d);
  const int64_t max_len = mla::check_cache_values(op, d, cache_seqlens, block_table, 0);
  TORCH_CHECK_VALUE(max_seqlen < 0 || max_len <= max_seqlen, "latentmoe.", op, ": argument 'max_seqlen' (",
                    max_seqlen, ") is below the longest cache_seqlens entry ", max_len);

  auto out = at::empty_like(q_latent);
  auto lse = at::empty({B, Sq, H}, q_latent.options().dtype(at::kFloat));
  const int32_t* lens = cache_seqlens.const_data_ptr<int32_t>();
  const int64_t rows = Sq * H;
  DecodeParams p{};
  p.B = B; p.Sq = Sq; p.H = H; p.C = C; p.R = R; p.D = C + R;
  p.lmax = d.lmax; p.page_size = d.page_size; p.max_pages = d.max_pages; p.num_pages = d.num_pages;
  p.kv_stride = d.kv_stride; p.pe_stride = d.pe_stride; p.split = d.split;
  p.block_table = d.paged ? block_table->const_data_ptr<int32_t>() : nullptr;
  p.seqlens = lens;
  p.scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.window = window;
  p.n_groups = (rows + kRowGroup - 1) / kRowGroup;
  p.avx2 = v8::use_avx2();
  p.tile_fn = p.avx2 ? &decode_tile_avx2 : &decode_tile_generic;
  // Enough items for every thread; each split keeps at least kMinSplit keys.
  const int64_t want = (2 * at::get_num_threads() + B * p.n_groups - 1) / (B * p.n_groups);
  p.n_splits = std::max<int64_t>(1, std::min<int64_t>(want, (max_len + kMinSplit - 1) / kMinSplit));
  p.split_len = std::max<int64_t>(1, (max_len + p.n_splits - 1) / p.n_splits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_latent.scalar_type(), "mla_decode_cpu", [&] {
    const scalar_t* kv = kv_cache.const_data_ptr<scalar_t>();
    const scalar_t* pe = d.split ? pe_cache->const_data_ptr<scalar_t>() : kv + C;
    mla_decode_impl<scalar_t>(p, q_latent.const_data_ptr<scalar_t>(), q_pe.const_data_ptr<scalar_t>(), kv, pe,
                              out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
  });
  return {out, lse};
}

// ---- mla_append_cache -------------------------------------------------------------------------

template <typename T>
void append_impl(T* cache, const T* latent, const T* pe, const T* w, const T* cos, const T* sin,
                 const int32_t* lens, const int32_t* table, const mla::CacheDims& d, int64_t S, float eps,
                 bool interleave) {
  const int64_t C = d.C, R = d.R, half = R / 2;
  at::parallel_for(0, d.B * S, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> x(R), cs(R), sn(R), o(R);
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / S, s = bs % S;
      T* dst = cache + mla::cache_row(table, d.max_pages, d.page_size, d.lmax, d.num_pages, b, lens[b] + s) * d.D;
      const T* lr = latent + bs * C;
      float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t c = 0; c < C; ++c) {
        const float v = static_cast<float>(lr[c]);
        sum_sq += v * v;
      }
      const float rstd = math::rms_rstd(sum_sq, static_cast<int>(C), eps);
      for (int64_t c = 0; c < C; ++c) {
        // HF numerics: round x * rstd to the dtype, then scale by the weight.
        const float y = static_cast<float>(static_cast<T>(static_cast<float>(lr[c]) * rstd));
        dst[c] = static_cast<T>(y * static_cast<float>(w[c]));
      }
      for (int64_t i = 0; i < R; ++i) {
        x[i] = static_cast<float>(pe[bs * R + i]);
        cs[i] = static_cast<float>(cos[bs * R + i]);
        sn[i] = static_cast<float>(sin[bs * R + i]);
      }
      for (int64_t i = 0; i < half; ++i) mla::rope_pair(x.data(), cs.data(), sn.data(), half, i, interleave, o.data());
      for (int64_t i = 0; i < R; ++i) dst[C + i] = static_cast<T>(o[i]);
    }
  });
}

void mla_append_cache_cpu(at::Tensor& kv_cache, const at::Tensor& kv_latent, const at::Tensor& k_pe,
                          const at::Tensor& norm_weight, double eps, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& cache_seqlens_in, const c10::optional<at::Tensor>& block_table_in,
                          bool rope_interleave, bool check_values) {
  const char* op = "mla_append_cache";
  mla::check_append_args(op, kv_latent, k_pe, norm_weight, cos, sin, eps);
  const int64_t B = kv_latent.size(0), S = kv_latent.size(1);
  auto d = mla::check_cache(op, kv_cache, cache_seqlens_in, block_table_in, B, kv_latent.size(2), k_pe.size(2),
                            kv_latent, "kv_latent");
  const at::Tensor cache_seqlens = chk::private_copy(cache_seqlens_in);  // checked and read: the same values
  const c10::optional<at::Tensor> block_table = chk::private_copy(block_table_in);
  (void)check_values;  // the CPU always checks the values: it costs no device sync here
  mla::check_cache_values(op, d, cache_seqlens, block_table, S);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_latent.scalar_type(), "mla_append_cache_cpu", [&] {
    append_impl<scalar_t>(kv_cache.mutable_data_ptr<scalar_t>(), kv_latent.const_data_ptr<scalar_t>(),
                          k_pe.const_data_ptr<scalar_t>(), norm_weight.const_data_ptr<scalar_t>(),
                          cos.const_data_ptr<scalar_t>(), sin.const_data_ptr<scalar_t>(),
                          cache_seqlens.const_data_ptr<int32_t>(),
                          d.paged ? block_table->const_data_ptr<int32_t>() : nullptr, d, S,
                          static_cast<float>(eps), rope_interleave);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CPU, m) {
  m.impl("mla_decode", &mla_decode_cpu);
  m.impl("mla_append_cache", &mla_append_cache_cpu);
}

}  // namespace latentmoe::cpu
