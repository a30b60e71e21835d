// MLA CPU kernels: absorbed decode on the latent cache and the fused cache append.
//
// mla_decode: work items are (batch row, group of query rows, split of the keys), run with
// at::parallel_for. An item walks its keys in tiles of kTile cache rows; each tile is read once
// for all query rows of the group (query row = (s, h) pair): scores and the weighted sum are
// small fp32 GEMMs (ATen matmul on views of the item's buffers), with an online softmax per row in between
// (common/math.h). fp32 accumulators; splits are merged by their LSE.
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

namespace latentmoe::cpu {
namespace {

namespace chk = latentmoe::checks;

constexpr int64_t kTile = 256;       // cache rows per tile
constexpr int64_t kRowGroup = 64;    // query rows per work item
constexpr int64_t kMinSplit = 256;   // fewest keys worth a split of its own

struct DecodeParams {
  int64_t B, Sq, H, C, R, D;
  int64_t lmax, page_size, max_pages;
  int64_t kv_stride, pe_stride;  // row strides of the c_kv and k_pe sources
  bool split;                    // k_pe rows come from a separate pe_cache
  const int32_t* block_table;    // null: contiguous
  const int32_t* seqlens;
  float scale;
  bool causal;
  int64_t window;
  int64_t n_splits, split_len, n_groups;
};

// Row-major products on fp32 tiles through ATen's matmul (MKL/OpenBLAS underneath), on
// non-owning views of the work item's buffers:
//   scores[m, n] = q[m, D] . k[n, D]^T          (row strides ldq, ldk, lds)
//   acc[m, C]   += p[m, n] . k[n, :C]
at::Tensor view2d(const float* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(data), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

void tile_scores(int64_t m, int64_t n, int64_t D, const float* q, int64_t ldq, const float* k, int64_t ldk,
                 float* scores, int64_t lds) {
  auto out = view2d(scores, m, n, lds);
  at::mm_out(out, view2d(q, m, D, ldq), view2d(k, n, D, ldk).t());
}

void tile_accumulate(int64_t m, int64_t n, int64_t C, const float* p, int64_t ldp, const float* k, int64_t ldk,
                     float* acc, int64_t ldacc) {
  view2d(acc, m, C, ldacc).addmm_(view2d(p, m, n, ldp), view2d(k, n, C, ldk));
}

// Online-softmax step of one query row over a tile of n scores `s` (overwritten with the
// weights exp(s - m_new); 0 outside the visible [a, e)). Updates `st`; returns the factor the
// row's accumulator must be multiplied by before the weights are added (1 when unchanged).
float softmax_tile_row(float* s, int64_t n, int64_t a, int64_t e, math::SoftmaxState& st) {
  if (a >= e) {
    for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
    return 1.f;
  }
  float m_tile = -INFINITY;
  for (int64_t j = a; j < e; ++j) m_tile = std::max(m_tile, s[j]);
  const float m_new = std::max(st.m, m_tile);
  const float alpha = math::softmax_rescale(st.m, m_new);
  float l = st.l * alpha;
  for (int64_t j = 0; j < a; ++j) s[j] = 0.f;
  for (int64_t j = a; j < e; ++j) {
    s[j] = math::fast_exp(s[j] - m_new);
    l += s[j];
  }
  for (int64_t j = e; j < n; ++j) s[j] = 0.f;
  st = {m_new, l};
  return alpha;
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
          mla::cache_row(p.block_table, p.max_pages, p.page_size, p.lmax, b, t0) * D;
    } else {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = mla::cache_row(p.block_table, p.max_pages, p.page_size, p.lmax, b, t);
        const T* src = cache + row * p.kv_stride;
        const T* pe = pe_src + row * p.pe_stride;
        float* dst = tile.data() + (t - t0) * D;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<float>(src[c]);
        for (int64_t c = 0; c < R; ++c) dst[C + c] = static_cast<float>(pe[c]);
      }
      k = tile.data();
    }
    const int64_t n = t1 - t0;
    tile_scores(nrows, n, D, qbuf.data(), D, k, D, scores.data(), kTile);
    for (int64_t i = 0; i < nrows; ++i) {
      const int64_t a = std::max(t0, ranges[i].lo) - t0, e = std::min(t1, ranges[i].hi) - t0;
      const float alpha = softmax_tile_row(scores.data() + i * kTile, n, a, e, st[i]);
      if (alpha != 1.f) {
        float* acc = acc_out + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) acc[c] *= alpha;
      }
    }
    tile_accumulate(nrows, n, C, scores.data(), kTile, k, D, acc_out, C);
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
      const float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;
      T* dst = out + br * p.C;
      for (int64_t c = 0; c < p.C; ++c) dst[c] = static_cast<T>(o[c] * inv);
      lse[br] = math::softmax_lse({m_max, l_sum});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cpu(const at::Tensor& q_latent, const at::Tensor& q_pe,
                                                  const at::Tensor& kv_cache, const at::Tensor& cache_seqlens,
                                                  const c10::optional<at::Tensor>& block_table,
                                                  double softmax_scale, bool causal, int64_t window,
                                                  const c10::optional<at::Tensor>& pe_cache) {
  const char* op = "mla_decode";
  mla::check_decode_queries(op, q_latent, q_pe);
  const int64_t B = q_latent.size(0), Sq = q_latent.size(1), H = q_latent.size(2);
  const int64_t C = q_latent.size(3), R = q_pe.size(3);
  auto d = mla::check_cache(op, kv_cache, cache_seqlens, block_table, B, C, R, q_latent, "q_latent", pe_cache);
  mla::check_decode_scalars(softmax_scale, window);
  const int64_t max_len = mla::check_cache_values(op, d, cache_seqlens, block_table, 0);

  auto out = at::empty_like(q_latent);
  auto lse = at::empty({B, Sq, H}, q_latent.options().dtype(at::kFloat));
  const int32_t* lens = cache_seqlens.const_data_ptr<int32_t>();
  const int64_t rows = Sq * H;
  DecodeParams p{};
  p.B = B; p.Sq = Sq; p.H = H; p.C = C; p.R = R; p.D = C + R;
  p.lmax = d.lmax; p.page_size = d.page_size; p.max_pages = d.max_pages;
  p.kv_stride = d.kv_stride; p.pe_stride = d.pe_stride; p.split = d.split;
  p.block_table = d.paged ? block_table->const_data_ptr<int32_t>() : nullptr;
  p.seqlens = lens;
  p.scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.window = window;
  p.n_groups = (rows + kRowGroup - 1) / kRowGroup;
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
      T* dst = cache + mla::cache_row(table, d.max_pages, d.page_size, d.lmax, b, lens[b] + s) * d.D;
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
                          const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
                          bool rope_interleave) {
  const char* op = "mla_append_cache";
  mla::check_append_args(op, kv_latent, k_pe, norm_weight, cos, sin);
  const int64_t B = kv_latent.size(0), S = kv_latent.size(1);
  auto d = mla::check_cache(op, kv_cache, cache_seqlens, block_table, B, kv_latent.size(2), k_pe.size(2),
                            kv_latent, "kv_latent");
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
