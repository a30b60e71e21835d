// MLA prefill CPU kernels: attention (causal / sliding window) of the S new tokens over the
// latent cache with the latent decompressed tile by tile (K_nope = c_kv W_UK^T, V = c_kv W_UV^T
// for kKeyTile tokens of one head at a time, in task-local fp32 buffers), consumed by an online
// softmax.
//
// Work split: tasks (b, h, query chunk) run in parallel. A task walks the key tiles once (key
// tile outer, all its queries inner, in blocks of kRowBlock rows whose scores stay in L2), so each
// tile is decompressed once per task; queries are
// split into chunks only when B*H is too small to keep the threads busy. Causally a later chunk
// sees more keys: the forward hands tasks out last chunks first from a shared counter, the
// backward (fixed partitions, for its fixed-order sums) pairs early and late chunks. Per-task memory is
// O(chunk + tile) rows: never O(tokens x heads x dim), never O(L^2). The GEMMs on the buffers,
// forward and backward, run this project's fp32 tiles (cpu/gemm_f32.h; single-threaded inside
// the parallel region; a row block's products read its rows in place): at these sizes faster
// than at::mm calls, and ATen's MKL sgemm runs AVX2 code on AMD CPUs. The softmax steps are
// fused per row (online_softmax, backward_softmax).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "common/math.h"
#include "common/mla_prefill_checks.h"
#include "common/mla_prefill_math.h"
#include "cpu/gemm_f32.h"
#include "mla_prefill_absorbed.h"

namespace latentmoe::cpu {
namespace {

using mla_prefill::Params;

// 128-token key tiles: big enough for the GEMMs to run near their large-GEMM rate (measured ~30%
// faster than 64 with at::mm on the 16-head, C=512 shape), small enough that causal diagonal tiles
// waste little.
constexpr int64_t kKeyTile = 128;
constexpr int64_t kMinQueryChunk = 64;
// Query rows per step within a key tile (forward and backward): a block's scores [kRowBlock,
// kKeyTile], queries and accumulators stay in L2 between its QK^T product, softmax and PV product.
// (With all of a chunk's rows at once, a 4K prefill's tile had 2 MiB of scores and 2 MiB of
// accumulators per task, which left L2 between the steps.)
constexpr int64_t kRowBlock = gemm_f32::kMc;

template <typename T>
void load_f32(const T* src, float* dst, int64_t n, float mul = 1.f) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(src[k]) * mul;
}

// The keys [lo[r], hi[r]) of a tile over keys [t0, t0 + nt) that its row r, the query at
// position pos_first + r, sees (causal / window), for r < nr.
void visible_keys(const Params& p, int64_t seqlen, int64_t nr, int64_t nt, int64_t pos_first, int64_t t0,
                  int64_t* lo, int64_t* hi) {
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t pos = pos_first + r;
    lo[r] = std::clamp<int64_t>(mla_prefill::key_begin(p, pos) - t0, 0, nt);
    hi[r] = std::max(lo[r], std::clamp<int64_t>(mla_prefill::key_end(p, seqlen, pos) - t0, 0, nt));
  }
}

// Entries of a score tile [nr, nt] outside each row's visible keys set to `fill`.
void mask_invisible_keys(float* tile, int64_t nr, int64_t nt, const int64_t* lo, const int64_t* hi, float fill) {
  for (int64_t r = 0; r < nr; ++r) {
    float* row = tile + r * nt;
    std::fill(row, row + lo[r], fill);
    std::fill(row + hi[r], row + nt, fill);
  }
}

// ---- the softmax steps on a score tile, row by row, in one or two passes over each row (they ran
// as five to seven ATen element-wise passes over the tile). With the row blocks and the in-place
// A of the products, a 4K prefill's op (16 heads, fp32, 2 Zen 1 cores) went 1.84 -> 1.66 s and
// its backward at 2K 1.46 -> 1.36 s, bitwise the same before and after the last two. Instantiated
// for AVX-512 (16 lanes), AVX2 and portably (8 lanes), picked by gemm_f32::isa() as the GEMMs are.
namespace v8 = latentmoe::cpu::vec8;

// max(a, b) where a NaN in either wins (as at::maximum / amax propagate it).
inline float max_nan(float a, float b) { return b > a || b != b ? b : a; }

// Lane-wise max with a NaN in either winning.
template <int W>
LMOE_V8_INLINE v8::vf<W> vmax_nan(v8::vf<W> a, v8::vf<W> b) {
  return (b > a) | (b != b) ? b : a;
}

// The W lanes of v folded into one, pairwise (halves, then quarters, ..), by vmax_nan (kMax) or
// +: a fixed order and no branches (a row of 128 keys is only 16 vectors; per-lane scalar loops
// with a compare and branch per lane cost as much as the row's exps).
template <bool kMax>
LMOE_V8_INLINE v8::vf<8> fold_step(v8::vf<8> a, v8::vf<8> b) {
  if constexpr (kMax) {
    return vmax_nan<8>(a, b);
  } else {
    return a + b;
  }
}
template <int W, bool kMax>
LMOE_V8_INLINE float fold_lanes(v8::vf<W> v) {
  v8::vf<8> h;
  if constexpr (W == 16) {
    h = fold_step<kMax>(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                        __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  } else {
    h = v;
  }
  h = fold_step<kMax>(h, __builtin_shufflevector(h, h, 4, 5, 6, 7, 0, 1, 2, 3));
  h = fold_step<kMax>(h, __builtin_shufflevector(h, h, 2, 3, 0, 1, 6, 7, 4, 5));
  h = fold_step<kMax>(h, __builtin_shufflevector(h, h, 1, 0, 3, 2, 5, 4, 7, 6));
  return h[0];
}

// Online-softmax step of a tile of scores s [nr, nt] (already scaled; keys a row does not see set
// to -inf): per row, m_new = max(m, the row's max), p = exp(s - m_new) written over s, l = l *
// alpha + sum(p), and the row's accumulator acc [nr, dv] times alpha = exp(m - m_new) (0 while
// the row has seen no key; skipped when alpha is 1, which changes no bit). A NaN score makes the
// row's max, weights and sum NaN. Each row's sum is taken in a fixed order.
template <int W>
LMOE_V8_INLINE void online_softmax_body(float* s, int64_t nr, int64_t nt, float* m, float* l, float* acc,
                                        int64_t dv) {
  using V = v8::vf<W>;
  constexpr int N = 4;  // vectors per step: independent chains (v8::exp_nonpos_n)
  const int64_t nt_main = nt / (N * W) * (N * W);
  for (int64_t r = 0; r < nr; ++r) {
    float* row = s + r * nt;
    V mv[N];
#pragma GCC unroll 4
    for (int i = 0; i < N; ++i) mv[i] = v8::splatw<W>(-INFINITY);
    for (int64_t k = 0; k < nt_main; k += N * W) {
#pragma GCC unroll 4
      for (int i = 0; i < N; ++i) mv[i] = vmax_nan<W>(mv[i], v8::loadw<W>(row + k + i * W));
    }
    float mt = fold_lanes<W, true>(vmax_nan<W>(vmax_nan<W>(mv[0], mv[1]), vmax_nan<W>(mv[2], mv[3])));
    for (int64_t k = nt_main; k < nt; ++k) mt = max_nan(mt, row[k]);
    const float m_old = m[r], m_new = max_nan(m_old, mt);
    const float alpha = m_old == -INFINITY ? 0.f : v8::exp_nonpos(m_old - m_new);
    const V mnv = v8::splatw<W>(m_new);
    V sv[N];
#pragma GCC unroll 4
    for (int i = 0; i < N; ++i) sv[i] = v8::splatw<W>(0.f);
    for (int64_t k = 0; k < nt_main; k += N * W) {
      V p[N];
#pragma GCC unroll 4
      for (int i = 0; i < N; ++i) p[i] = v8::loadw<W>(row + k + i * W) - mnv;
      v8::exp_nonpos_n<W, N>(p);
#pragma GCC unroll 4
      for (int i = 0; i < N; ++i) {
        v8::storew<W>(row + k + i * W, p[i]);
        sv[i] += p[i];
      }
    }
    float sum = fold_lanes<W, false>((sv[0] + sv[1]) + (sv[2] + sv[3]));
    for (int64_t k = nt_main; k < nt; ++k) sum += row[k] = v8::exp_nonpos(row[k] - m_new);
    m[r] = m_new;
    l[r] = l[r] * alpha + sum;
    if (alpha != 1.f) {
      float* o = acc + r * dv;
      const V av = v8::splatw<W>(alpha);
      int64_t d = 0;
      for (; d + W <= dv; d += W) v8::storew<W>(o + d, v8::loadw<W>(o + d) * av);
      for (; d < dv; ++d) o[d] *= alpha;
    }
  }
}

// The backward's softmax step on a tile: per row r, with key range [lo[r], hi[r]) of the tile,
// P = exp(scale * s - lse[r]) (0 outside the range) written over s, and dS = P (dP - delta[r]) *
// scale written over dp. lse is the forward's, so scale * s - lse <= 0 up to rounding on the
// visible keys; beyond 88.7 (a caller's own lse) P is inf, as exp's.
template <int W>
LMOE_V8_INLINE void backward_softmax_body(float* s, float* dp, int64_t nr, int64_t nt, const int64_t* lo,
                                          const int64_t* hi, const float* lse, const float* delta, float scale) {
  using V = v8::vf<W>;
  using I = v8::vi<W>;
  I iota;
  for (int i = 0; i < W; ++i) iota[i] = i;
  const V sc = v8::splatw<W>(scale), zero = v8::splatw<W>(0.f), inf = v8::splatw<W>(INFINITY);
  const V big = v8::splatw<W>(88.7f);  // exp overflows above: inf (exp_nonpos is for x <= 0)
  for (int64_t r = 0; r < nr; ++r) {
    float* sr = s + r * nt;
    float* dr = dp + r * nt;
    const V vlse = v8::splatw<W>(lse[r]), vdelta = v8::splatw<W>(delta[r]);
    const I vlo = v8::splatw<W>(static_cast<int32_t>(lo[r])), vhi = v8::splatw<W>(static_cast<int32_t>(hi[r]));
    for (int64_t k = 0; k < nt; k += W) {
      const int64_t n = std::min<int64_t>(W, nt - k);
      V x, d;
      if (n == W) {
        x = v8::loadw<W>(sr + k), d = v8::loadw<W>(dr + k);
      } else {  // the tail through zero-padded copies
        alignas(64) float xs[W] = {}, ds[W] = {};
        std::copy(sr + k, sr + k + n, xs);
        std::copy(dr + k, dr + k + n, ds);
        x = v8::loadw<W>(xs), d = v8::loadw<W>(ds);
      }
      const I idx = iota + v8::splatw<W>(static_cast<int32_t>(k));
      const V e = x * sc - vlse;
      const V p = (idx >= vlo) & (idx < vhi) ? (e > big ? inf : v8::exp_nonpos_w<W>(e)) : zero;
      const V g = (d - vdelta) * p * sc;
      if (n == W) {
        v8::storew<W>(sr + k, p), v8::storew<W>(dr + k, g);
      } else {
        for (int64_t i = 0; i < n; ++i) sr[k + i] = p[i], dr[k + i] = g[i];
      }
    }
  }
}

// online_softmax_ISA and backward_softmax_ISA: the bodies above in one ISA's instantiation.
#define LMOE_PREFILL_SOFTMAX(ISA, ATTR, W)                                                                    \
  ATTR void online_softmax_##ISA(float* s, int64_t nr, int64_t nt, float* m, float* l, float* acc, int64_t dv) { \
    online_softmax_body<W>(s, nr, nt, m, l, acc, dv);                                                         \
  }                                                                                                           \
  ATTR void backward_softmax_##ISA(float* s, float* dp, int64_t nr, int64_t nt, const int64_t* lo,            \
                                   const int64_t* hi, const float* lse, const float* delta, float scale) {    \
    backward_softmax_body<W>(s, dp, nr, nt, lo, hi, lse, delta, scale);                                       \
  }
LMOE_PREFILL_SOFTMAX(avx512, LMOE_CPU_AVX512, 16)
LMOE_PREFILL_SOFTMAX(avx2, LMOE_CPU_AVX2, 8)
LMOE_PREFILL_SOFTMAX(generic, , 8)
#undef LMOE_PREFILL_SOFTMAX

void online_softmax(gemm_f32::Isa isa, float* s, int64_t nr, int64_t nt, float* m, float* l, float* acc,
                    int64_t dv) {
  switch (isa) {
    case gemm_f32::Isa::kAvx512: return online_softmax_avx512(s, nr, nt, m, l, acc, dv);
    case gemm_f32::Isa::kAvx2: return online_softmax_avx2(s, nr, nt, m, l, acc, dv);
    default: return online_softmax_generic(s, nr, nt, m, l, acc, dv);
  }
}
void backward_softmax(gemm_f32::Isa isa, float* s, float* dp, int64_t nr, int64_t nt, const int64_t* lo,
                      const int64_t* hi, const float* lse, const float* delta, float scale) {
  switch (isa) {
    case gemm_f32::Isa::kAvx512: return backward_softmax_avx512(s, dp, nr, nt, lo, hi, lse, delta, scale);
    case gemm_f32::Isa::kAvx2: return backward_softmax_avx2(s, dp, nr, nt, lo, hi, lse, delta, scale);
    default: return backward_softmax_generic(s, dp, nr, nt, lo, hi, lse, delta, scale);
  }
}

struct Split {
  int64_t chunks;      // query chunks per (b, h)
  int64_t chunk_size;  // queries per chunk
};

// The query chunk of the j-th task of one (b, h) in the backward's order 0, n-1, 1, n-2, ..:
// consecutive tasks pair a short causal chunk with a long one, so contiguous ranges of tasks
// (the backward's partitions) carry similar work.
inline int64_t zigzag_chunk(int64_t j, int64_t chunks) { return j % 2 == 0 ? j / 2 : chunks - 1 - j / 2; }

// All threads' per-query buffers (a chunk's queries, its score rows, ...) stay within this: on a
// machine with many threads, long prompts are cut into more, shorter chunks (each decompresses
// its keys again: more work, bounded memory). 64 threads at 16K context: 2K-query chunks.
constexpr int64_t kQueryBufferBytes = int64_t{256} << 20;

// Query chunks: enough tasks for twice the threads, and chunks short enough that the threads'
// buffers of per_query_floats floats per query fit in kQueryBufferBytes.
Split split_queries(const Params& p, int64_t per_query_floats) {
  const int64_t bh = std::max<int64_t>(1, p.B * p.H);
  const int64_t threads = at::get_num_threads();
  const int64_t want = (2 * threads + bh - 1) / bh;
  const int64_t max_size = std::max<int64_t>(
      kMinQueryChunk, kQueryBufferBytes / (threads * per_query_floats * static_cast<int64_t>(sizeof(float))));
  const int64_t max_chunks = std::max<int64_t>(1, (p.S + kMinQueryChunk - 1) / kMinQueryChunk);
  const int64_t chunks = std::clamp<int64_t>(std::max(want, (p.S + max_size - 1) / max_size), 1, max_chunks);
  const int64_t size = std::max<int64_t>(1, (p.S + chunks - 1) / chunks);
  return {chunks, size};
}

// Per-head decompression weights as fp32 [Dn, C] and [Dv, C].
template <typename T>
void load_weights(const Params& p, const T* w_uk, const T* w_uv, int64_t h, float* wk, float* wv) {
  for (int64_t d = 0; d < p.Dn; ++d) load_f32(w_uk + h * p.wuk_sh + d * p.wuk_sd, wk + d * p.C, p.C);
  for (int64_t d = 0; d < p.Dv; ++d) load_f32(w_uv + h * p.wuv_sh + d * p.wuv_sd, wv + d * p.C, p.C);
}

// Key tile [t0, t0+nt) of row b decompressed for one head, in fp32: c_kv into ct [nt, C], keys
// [nt, D = Dn + R] (c_kv W_UK^T, then k_pe) and V [nt, Dv] = c_kv W_UV^T; wk_t and wv_t are the
// panels of W_UK^T and W_UV^T.
template <typename T>
void decompress_tile(const Params& p, gemm_f32::Isa isa, const T* cache, const int32_t* block_table, int64_t b,
                     int64_t t0, int64_t nt, const gemm_f32::Panels& wk_t, const gemm_f32::Panels& wv_t, float* ct,
                     float* keys, float* v) {
  const int64_t D = p.Dn + p.R;
  for (int64_t t = 0; t < nt; ++t) {
    const T* row = cache + mla_prefill::cache_offset(p, mla_prefill::cache_slot(p, block_table, b, t0 + t));
    load_f32(row, ct + t * p.C, p.C);
    load_f32(row + p.C, keys + t * D + p.Dn, p.R);
  }
  gemm_f32::gemm(isa, nt, ct, p.C, wk_t, keys, D, gemm_f32::Init::kZero);
  gemm_f32::gemm(isa, nt, ct, p.C, wv_t, v, p.Dv, gemm_f32::Init::kZero);
}

// ---- forward ------------------------------------------------------------------------------------

template <typename T>
void prefill_forward(const Params& p, const T* q_nope, const T* q_pe, const T* cache,
                     const int32_t* block_table, const int32_t* seqlens, const T* w_uk, const T* w_uv, T* out, float* lse) {
  namespace g = gemm_f32;
  // Per query: q_nope | q_pe, the output accumulator, the running max and sum (a key tile's
  // scores are kept for one row block at a time).
  const int64_t D = p.Dn + p.R;  // a query's (and a key's) width: [nope | rope]
  const Split sp = split_queries(p, D + p.Dv + 2);
  const int64_t bh = p.B * p.H, n_tasks = bh * sp.chunks;
  const g::Isa isa = g::isa();
  // Each worker takes tasks from a shared counter, the last query chunks of every (b, h) first
  // (causally the longest), then the ones before: no thread is left with the long tail. Which
  // thread runs a task does not change its result.
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    std::vector<float> wk_buf(p.Dn * p.C), wv_buf(p.Dv * p.C), wk_pk, wv_pk, k_pk, v_pk;
    std::vector<float> q(sp.chunk_size * D), acc(sp.chunk_size * p.Dv);
    std::vector<float> scores(kRowBlock * kKeyTile);  // a row block's scores of a key tile
    std::vector<float> row_m(sp.chunk_size), row_l(sp.chunk_size);
    int64_t key_lo[kRowBlock], key_hi[kRowBlock];  // each row's keys of a tile
    // A key tile: c_kv [nt, C]; keys [nt, D] (K_nope from the latent, then k_pe); V [nt, Dv].
    std::vector<float> ct(kKeyTile * p.C), keys(kKeyTile * D), v(kKeyTile * p.Dv);
    g::Panels wk_pn, wv_pn;
    int64_t loaded_head = -1;
    for (int64_t j = next.fetch_add(1); j < n_tasks; j = next.fetch_add(1)) {
      const int64_t c = sp.chunks - 1 - j / bh;
      const int64_t h = j % bh % p.H;
      const int64_t b = j % bh / p.H;
      const int64_t seqlen = seqlens[b];
      const int64_t i_begin = c * sp.chunk_size;
      const int64_t i_end = std::min(p.S, i_begin + sp.chunk_size);
      if (i_begin >= i_end) continue;
      const int64_t i_lo = std::clamp(mla_prefill::first_live_query(p, seqlen), i_begin, i_end);
      // Queries that see nothing: output 0, LSE -inf.
      for (int64_t i = i_begin; i < i_lo; ++i) {
        T* o = out + ((b * p.S + i) * p.H + h) * p.Dv;
        std::fill(o, o + p.Dv, static_cast<T>(0.f));
        lse[(b * p.S + i) * p.H + h] = -INFINITY;
      }
      const int64_t nq = i_end - i_lo;
      if (nq == 0) continue;
      if (loaded_head != h) {  // W_UK and W_UV of head h as panels (B = W^T of the decompression)
        load_weights(p, w_uk, w_uv, h, wk_buf.data(), wv_buf.data());
        wk_pn = g::panels_nk(wk_buf.data(), p.C, p.Dn, p.C, wk_pk, false);
        wv_pn = g::panels_nk(wv_buf.data(), p.C, p.Dv, p.C, wv_pk, false);
        loaded_head = h;
      }
      // Queries [nope | rope], pre-multiplied by the softmax scale.
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i_lo + r;
        load_f32(q_nope + b * p.qn_sb + i * p.qn_ss + h * p.qn_sh, q.data() + r * D, p.Dn, p.scale);
        load_f32(q_pe + b * p.qp_sb + i * p.qp_ss + h * p.qp_sh, q.data() + r * D + p.Dn, p.R, p.scale);
        row_m[r] = -INFINITY;
        row_l[r] = 0.f;
      }
      std::fill(acc.begin(), acc.begin() + nq * p.Dv, 0.f);
      const int64_t pos0 = mla_prefill::query_pos(seqlen, p.S, i_lo);  // position of row 0
      const int64_t kv_begin = mla_prefill::key_begin(p, pos0);         // keys seen by some row
      const int64_t kv_end = mla_prefill::key_end(p, seqlen, pos0 + nq - 1);
      for (int64_t t0 = kv_begin; t0 < kv_end; t0 += kKeyTile) {
        const int64_t nt = std::min(kKeyTile, kv_end - t0);
        // Rows [r0, r1) see some key of the tile (each of them at least one).
        const int64_t r0 = std::clamp<int64_t>(mla_prefill::first_query_seeing(p, seqlen, t0) - i_lo, 0, nq);
        const int64_t r1 = std::clamp<int64_t>(mla_prefill::end_query_seeing(p, seqlen, t0 + nt) - i_lo, 0, nq);
        if (r0 >= r1) continue;
        decompress_tile(p, isa, cache, block_table, b, t0, nt, wk_pn, wv_pn, ct.data(), keys.data(), v.data());
        const g::Panels k_pn = g::panels_nk(keys.data(), D, nt, D, k_pk, false);
        const g::Panels v_pn = g::panels_kn(v.data(), p.Dv, p.Dv, nt, v_pk);
        // The tile's rows in blocks of kRowBlock: a block's scores, queries and accumulators stay
        // in L2 from its QK^T product through the softmax to its PV product.
        for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
          const int64_t nb = std::min(kRowBlock, r1 - rb);
          g::gemm_in_place(isa, nb, q.data() + rb * D, D, k_pn, scores.data(), nt, g::Init::kZero);
          visible_keys(p, seqlen, nb, nt, pos0 + rb, t0, key_lo, key_hi);
          mask_invisible_keys(scores.data(), nb, nt, key_lo, key_hi, -INFINITY);
          // Every row here sees a key of the tile, so its m_new is finite (for finite scores).
          online_softmax(isa, scores.data(), nb, nt, row_m.data() + rb, row_l.data() + rb, acc.data() + rb * p.Dv,
                         p.Dv);
          g::gemm_in_place(isa, nb, scores.data(), nt, v_pn, acc.data() + rb * p.Dv, p.Dv, g::Init::kLoad);
        }
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i_lo + r;
        const math::SoftmaxState st{row_m[r], row_l[r]};
        const float inv = math::softmax_inv_sum(st.l);
        T* o = out + ((b * p.S + i) * p.H + h) * p.Dv;
        for (int64_t d = 0; d < p.Dv; ++d) o[d] = static_cast<T>(acc[r * p.Dv + d] * inv);
        lse[(b * p.S + i) * p.H + h] = math::softmax_lse(st);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> mla_prefill_cpu(const at::Tensor& q_nope, const at::Tensor& q_pe,
                                                   const at::Tensor& latent_cache,
                                                   const at::Tensor& cache_seqlens_in, const at::Tensor& w_uk,
                                                   const at::Tensor& w_uv, double softmax_scale,
                                                   const std::optional<at::Tensor>& block_table_in, bool causal,
                                                   int64_t window) {
  // Checked and read: the same values (private copies, whatever another thread does meanwhile).
  const at::Tensor cache_seqlens = latentmoe::checks::private_copy(cache_seqlens_in);
  const std::optional<at::Tensor> block_table = latentmoe::checks::private_copy(block_table_in);
  const Params p = mla_prefill::check_args("mla_prefill", q_nope, q_pe, latent_cache, cache_seqlens, w_uk,
                                           w_uv, softmax_scale, block_table, causal, window);
  // The CPU runs the absorbed path (through mla_decode) only when asked: its prefill kernel is
  // faster here (fewer FLOPs per key than attending on the latent); the tests use it to check
  // the path GPUs take.
  const auto path = mla_prefill::forward_path_choice();
  if (path == mla_prefill::ForwardPath::kAbsorbed)
    return mla_prefill::forward_absorbed(p, q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, softmax_scale,
                                         block_table);
  if (path == mla_prefill::ForwardPath::kGemm)  // (CUDA's default; tests)
    return mla_prefill::forward_gemm(p, q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, block_table);
  auto bt = block_table.has_value() ? block_table->contiguous() : at::Tensor();
  auto out = at::empty({p.B, p.S, p.H, p.Dv}, q_nope.options());
  auto lse = at::empty({p.B, p.S, p.H}, q_nope.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  auto lens = cache_seqlens.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_nope.scalar_type(), "mla_prefill_cpu", [&] {
    prefill_forward<scalar_t>(p, q_nope.const_data_ptr<scalar_t>(), q_pe.const_data_ptr<scalar_t>(),
                              latent_cache.const_data_ptr<scalar_t>(),
                              bt.defined() ? bt.const_data_ptr<int32_t>() : nullptr, lens.const_data_ptr<int32_t>(),
                              w_uk.const_data_ptr<scalar_t>(), w_uv.const_data_ptr<scalar_t>(),
                              out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
  });
  return {out, lse};
}

// ---- backward -----------------------------------------------------------------------------------
// Flash-attention style: per key tile, recompute K/V from the latent and P = exp(s - lse), then
//   dV = P^T dO, dP = dO V^T, dS = P (dP - delta) * scale,  delta_i = dO_i . O_i - dlse_i,
//   dQ += dS K, dK = dS^T Q; and through the decompression
//   d c_kv += dK_nope W_UK + dV W_UV, dW_UK_h += dK_nope^T c_kv, dW_UV_h += dV^T c_kv.
// Tasks own their queries' dQ. The latent-cache and weight gradients are sums over tasks: tasks
// (batch row, head, query chunk) are cut into one contiguous range per thread (a partition, cut
// by work); each partition runs its tasks in order into its own fp32 buffers, and the buffers
// are added up in partition order afterwards. No locks, and the result is bitwise the same from
// run to run at a given thread count.
// Extra memory: each partition's latent-gradient buffer holds its batch rows' keys of one key
// window: all keys (one window) while the partitions' buffers fit in kGradWindowBytes, else
// windows of keys taken one after another (each task then revisits its queries per window and
// adds its dQ into fp32 accumulators: grad_q itself in fp32, else an fp32 copy). Weight-gradient
// buffers cover the heads a partition's tasks touch (with B = 1 about H + threads heads in all).
constexpr int64_t kGradWindowBytes = int64_t{64} << 20;

// Keys per window: LATENTMOE_MLA_PREFILL_BWD_WINDOW (tests), else all keys while the partitions'
// buffers fit in kGradWindowBytes, else the largest number of key tiles that does.
int64_t backward_window(int64_t keys, int64_t rows_in_buffers, int64_t CR) {
  if (const auto n = mla_prefill::positive_int_setting("mla_prefill_backward", "LATENTMOE_MLA_PREFILL_BWD_WINDOW"))
    return std::min<int64_t>(*n, std::max<int64_t>(1, keys));
  const int64_t per_key = std::max<int64_t>(1, rows_in_buffers * CR * static_cast<int64_t>(sizeof(float)));
  if (keys * per_key <= kGradWindowBytes) return std::max<int64_t>(1, keys);
  return std::max<int64_t>(kKeyTile, kGradWindowBytes / per_key / kKeyTile * kKeyTile);
}

template <typename T>
void prefill_backward(const Params& p, const T* grad_out, const float* grad_lse, const T* q_nope,
                      const T* q_pe, const T* cache, const int32_t* block_table, const int32_t* seqlens, const T* w_uk, const T* w_uv,
                      const T* out, const float* lse, T* grad_q_nope, T* grad_q_pe, float* grad_cache,
                      float* grad_w_uk, float* grad_w_uv) {
  // Per query: q and dq [nope | rope], dOut, LSE and delta (score rows and the panels of q and
  // dOut are per row block: O(1) in the queries).
  const Split sp = split_queries(p, 2 * (p.Dn + p.R) + p.Dv + 2);
  const int64_t n_tasks = p.B * p.H * sp.chunks;
  const int64_t CR = p.C + p.R;
  const int64_t tasks_per_b = p.H * sp.chunks;
  const int64_t n_parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
  struct Part {
    int64_t task_begin, task_end;  // tasks [begin, end)
    int64_t b_lo, b_hi;            // batch rows its tasks touch: [lo, hi)
    int64_t h_lo, h_hi;            // heads its tasks touch: [lo, hi)
    std::vector<float> gcache;     // [b_hi - b_lo, window, C+R]: keys of the current window
    std::vector<float> gwk, gwv;   // heads [h_lo, h_hi) only
  };
  // Partition boundaries by work: each task's (query, key) pairs plus a fixed cost per query
  // (its loads and stores); each cut at the task boundary nearest to its share of the work.
  std::vector<double> work_before(n_tasks + 1, 0.0);
  for (int64_t task = 0; task < n_tasks; ++task) {
    const int64_t c = zigzag_chunk(task % sp.chunks, sp.chunks), b = task / tasks_per_b;
    const int64_t i_end = std::min(p.S, (c + 1) * sp.chunk_size);
    double w = 0.0;
    for (int64_t i = std::max(c * sp.chunk_size, mla_prefill::first_live_query(p, seqlens[b])); i < i_end; ++i) {
      const int64_t pos = mla_prefill::query_pos(seqlens[b], p.S, i);
      w += 16.0 + static_cast<double>(mla_prefill::key_end(p, seqlens[b], pos) - mla_prefill::key_begin(p, pos));
    }
    work_before[task + 1] = work_before[task] + w;
  }
  std::vector<int64_t> cut(n_parts + 1, n_tasks);
  cut[0] = 0;
  for (int64_t i = 1, task = 0; i < n_parts; ++i) {
    const double share = work_before[n_tasks] * static_cast<double>(i) / static_cast<double>(n_parts);
    while (task < n_tasks && work_before[task + 1] <= share) ++task;  // work_before[task] <= share
    const bool next_nearer = task < n_tasks && work_before[task + 1] - share < share - work_before[task];
    cut[i] = std::max(task + (next_nearer ? 1 : 0), cut[i - 1]);
  }
  std::vector<Part> parts(n_parts);
  int64_t rows_in_buffers = 0;  // batch rows over all partitions' latent-gradient buffers
  for (int64_t i = 0; i < n_parts; ++i) {
    Part& pt = parts[i];
    pt.task_begin = cut[i];
    pt.task_end = cut[i + 1];
    const bool any = pt.task_end > pt.task_begin;
    pt.b_lo = any ? pt.task_begin / tasks_per_b : 0;
    pt.b_hi = any ? (pt.task_end - 1) / tasks_per_b + 1 : 0;
    // Within one batch row its heads are one range; across rows, all heads.
    const bool one_row = any && pt.b_hi - pt.b_lo == 1;
    pt.h_lo = one_row ? (pt.task_begin / sp.chunks) % p.H : 0;
    pt.h_hi = one_row ? ((pt.task_end - 1) / sp.chunks) % p.H + 1 : (any ? p.H : 0);
    pt.gwk.assign((pt.h_hi - pt.h_lo) * p.Dn * p.C, 0.f);
    pt.gwv.assign((pt.h_hi - pt.h_lo) * p.Dv * p.C, 0.f);
    rows_in_buffers += pt.b_hi - pt.b_lo;
  }
  int64_t keys = 0;  // key positions of the longest row
  for (int64_t b = 0; b < p.B; ++b) keys = std::max<int64_t>(keys, seqlens[b]);
  const int64_t win = backward_window(keys, rows_in_buffers, CR);
  const bool windowed = win < keys;
  // Windowed, dQ sums over the windows: in grad_q itself for fp32, else in an fp32 copy.
  const int64_t n_q = p.B * p.S * p.H;
  std::vector<float> dq_copy;
  float* dq_nope = nullptr;
  float* dq_pe = nullptr;
  if (windowed) {
    if constexpr (std::is_same_v<T, float>) {
      dq_nope = grad_q_nope;
      dq_pe = grad_q_pe;
    } else {
      dq_copy.resize(n_q * (p.Dn + p.R));
      dq_nope = dq_copy.data();
      dq_pe = dq_nope + n_q * p.Dn;
    }
    std::fill(dq_nope, dq_nope + n_q * p.Dn, 0.f);
    std::fill(dq_pe, dq_pe + n_q * p.R, 0.f);
  }

  // The ISA read once for the whole call: every partition and key window takes the same path even
  // if reload_settings() runs meanwhile in another thread.
  const gemm_f32::Isa isa_once = gemm_f32::isa();
  // One partition's tasks over keys [w0, w1), in order, into its own buffers.
  auto run_part = [&](Part& pt, int64_t w0, int64_t w1) {
    pt.gcache.assign((pt.b_hi - pt.b_lo) * (w1 - w0) * CR, 0.f);
    const int64_t task_begin = pt.task_begin, task_end = pt.task_end;
    const int64_t cs = sp.chunk_size;
    namespace g = gemm_f32;
    const g::Isa isa = isa_once;
    const int64_t D = p.Dn + p.R;  // a query's (and a key's) width: [nope | rope]
    // Head h's W_UK [Dn, C] and W_UV [Dv, C] (fp32), as panels of their transposes (decompression)
    // and of themselves (the latent gradient); their gradients' sums over the task.
    std::vector<float> wk_buf(p.Dn * p.C), wv_buf(p.Dv * p.C), wk_nk, wv_nk, wk_kn, wv_kn;
    std::vector<float> dwk_buf(p.Dn * p.C), dwv_buf(p.Dv * p.C);
    g::Panels wk_t, wv_t, wk_p, wv_p;
    // Per query: q [nope | rope], dOut, LSE, delta, dq [nope | rope].
    std::vector<float> q(cs * D), dout(cs * p.Dv), row_lse(cs), delta(cs), dq(cs * D);
    std::vector<float> prob(kRowBlock * kKeyTile), dscore(kRowBlock * kKeyTile);  // a row block's, of a key tile
    int64_t key_lo[kRowBlock], key_hi[kRowBlock];  // each row's keys of a tile
    // A key tile: c_kv [nt, C]; keys [nt, D] (K_nope from the latent, then k_pe); V [nt, Dv]; and
    // their gradients.
    std::vector<float> ct(kKeyTile * p.C), keys(kKeyTile * D), v(kKeyTile * p.Dv);
    std::vector<float> dkeys(kKeyTile * D), dv(kKeyTile * p.Dv), dct(kKeyTile * p.C);
    std::vector<float> k_pk, kt_pk, v_pk, q_pk, do_pk, ct_pk;  // per-tile (and per-block) panels
    int64_t loaded_head = -1;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t c = zigzag_chunk(task % sp.chunks, sp.chunks);
      const int64_t h = (task / sp.chunks) % p.H;
      const int64_t b = task / (sp.chunks * p.H);
      const int64_t seqlen = seqlens[b];
      const int64_t i_begin = c * sp.chunk_size;
      const int64_t i_end = std::min(p.S, i_begin + sp.chunk_size);
      if (i_begin >= i_end) continue;
      const int64_t i_lo = std::clamp(mla_prefill::first_live_query(p, seqlen), i_begin, i_end);
      if (!windowed) {
        for (int64_t i = i_begin; i < i_lo; ++i) {  // queries that saw nothing: zero gradient
          const int64_t qi = (b * p.S + i) * p.H + h;
          std::fill(grad_q_nope + qi * p.Dn, grad_q_nope + (qi + 1) * p.Dn, static_cast<T>(0.f));
          std::fill(grad_q_pe + qi * p.R, grad_q_pe + (qi + 1) * p.R, static_cast<T>(0.f));
        }
      }
      const int64_t nq = i_end - i_lo;
      if (nq == 0) continue;
      const int64_t pos0 = mla_prefill::query_pos(seqlen, p.S, i_lo);
      const int64_t kv_begin = std::max(w0, mla_prefill::key_begin(p, pos0));
      const int64_t kv_end = std::min(w1, mla_prefill::key_end(p, seqlen, pos0 + nq - 1));
      if (kv_begin >= kv_end) continue;  // (windowed only: every live query sees some key)
      if (loaded_head != h) {
        load_weights(p, w_uk, w_uv, h, wk_buf.data(), wv_buf.data());
        wk_t = g::panels_nk(wk_buf.data(), p.C, p.Dn, p.C, wk_nk, false);
        wv_t = g::panels_nk(wv_buf.data(), p.C, p.Dv, p.C, wv_nk, false);
        wk_p = g::panels_kn(wk_buf.data(), p.C, p.C, p.Dn, wk_kn);
        wv_p = g::panels_kn(wv_buf.data(), p.C, p.C, p.Dv, wv_kn);
        loaded_head = h;
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i_lo + r;
        const int64_t qi = (b * p.S + i) * p.H + h;
        load_f32(q_nope + b * p.qn_sb + i * p.qn_ss + h * p.qn_sh, q.data() + r * D, p.Dn);
        load_f32(q_pe + b * p.qp_sb + i * p.qp_ss + h * p.qp_sh, q.data() + r * D + p.Dn, p.R);
        load_f32(grad_out + qi * p.Dv, dout.data() + r * p.Dv, p.Dv);
        float dot = 0.f;
        for (int64_t d = 0; d < p.Dv; ++d) dot += dout[r * p.Dv + d] * static_cast<float>(out[qi * p.Dv + d]);
        delta[r] = dot - grad_lse[qi];
        row_lse[r] = lse[qi];
      }
      std::fill(dq.begin(), dq.begin() + nq * D, 0.f);
      std::fill(dwk_buf.begin(), dwk_buf.end(), 0.f);
      std::fill(dwv_buf.begin(), dwv_buf.end(), 0.f);
      for (int64_t t0 = kv_begin; t0 < kv_end; t0 += kKeyTile) {
        const int64_t nt = std::min(kKeyTile, kv_end - t0);
        const int64_t r0 = std::clamp<int64_t>(mla_prefill::first_query_seeing(p, seqlen, t0) - i_lo, 0, nq);
        const int64_t r1 = std::clamp<int64_t>(mla_prefill::end_query_seeing(p, seqlen, t0 + nt) - i_lo, 0, nq);
        if (r0 >= r1) continue;
        decompress_tile(p, isa, cache, block_table, b, t0, nt, wk_t, wv_t, ct.data(), keys.data(), v.data());
        const g::Panels k_nk = g::panels_nk(keys.data(), D, nt, D, k_pk, false);
        const g::Panels v_nk = g::panels_nk(v.data(), p.Dv, nt, p.Dv, v_pk, false);
        const g::Panels k_kn = g::panels_kn(keys.data(), D, D, nt, kt_pk);
        // The tile's rows in blocks of kRowBlock (as in the forward: a block's score rows stay in
        // L2 between the products). dkeys and dV sum over the rows: each later block adds to the
        // sums in row order, so the result is the one of a single pass over all rows.
        for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
          const int64_t nb = std::min(kRowBlock, r1 - rb);
          const g::Init sums = rb == r0 ? g::Init::kZero : g::Init::kLoad;
          const float* qr = q.data() + rb * D;
          const float* dor = dout.data() + rb * p.Dv;
          // S = q K^T (unscaled) and dP = dOut V^T, [nb, nt] each.
          g::gemm_in_place(isa, nb, qr, D, k_nk, prob.data(), nt, g::Init::kZero);
          g::gemm_in_place(isa, nb, dor, p.Dv, v_nk, dscore.data(), nt, g::Init::kZero);
          // P = exp(scale * s - lse) (every row here is live: finite lse), zero for unseen keys;
          // dS = P (dP - delta) * scale.
          visible_keys(p, seqlen, nb, nt, pos0 + rb, t0, key_lo, key_hi);
          backward_softmax(isa, prob.data(), dscore.data(), nb, nt, key_lo, key_hi, row_lse.data() + rb,
                           delta.data() + rb, p.scale);
          // dq += dS keys; dkeys (+)= dS^T q; dV (+)= P^T dOut.
          g::gemm_in_place(isa, nb, dscore.data(), nt, k_kn, dq.data() + rb * D, D, g::Init::kLoad);
          g::gemm_at(isa, nt, dscore.data(), nt, g::panels_kn(qr, D, D, nb, q_pk), dkeys.data(), D, sums);
          g::gemm_at(isa, nt, prob.data(), nt, g::panels_kn(dor, p.Dv, p.Dv, nb, do_pk), dv.data(), p.Dv, sums);
        }
        // dc_kv = dK_nope W_UK + dV W_UV; dW_UK += dK_nope^T c_kv, dW_UV += dV^T c_kv.
        g::gemm(isa, nt, dkeys.data(), D, wk_p, dct.data(), p.C, g::Init::kZero);
        g::gemm(isa, nt, dv.data(), p.Dv, wv_p, dct.data(), p.C, g::Init::kLoad);
        const g::Panels ct_p = g::panels_kn(ct.data(), p.C, p.C, nt, ct_pk);
        g::gemm_at(isa, p.Dn, dkeys.data(), D, ct_p, dwk_buf.data(), p.C, g::Init::kLoad);
        g::gemm_at(isa, p.Dv, dv.data(), p.Dv, ct_p, dwv_buf.data(), p.C, g::Init::kLoad);
        float* gbase = pt.gcache.data() + ((b - pt.b_lo) * (w1 - w0) + (t0 - w0)) * CR;
        for (int64_t t = 0; t < nt; ++t) {
          float* gr = gbase + t * CR;
          for (int64_t k = 0; k < p.C; ++k) gr[k] += dct[t * p.C + k];
          for (int64_t k = 0; k < p.R; ++k) gr[p.C + k] += dkeys[t * D + p.Dn + k];
        }
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t qi = (b * p.S + i_lo + r) * p.H + h;
        const float* dqr = dq.data() + r * D;
        if (windowed) {
          for (int64_t d = 0; d < p.Dn; ++d) dq_nope[qi * p.Dn + d] += dqr[d];
          for (int64_t d = 0; d < p.R; ++d) dq_pe[qi * p.R + d] += dqr[p.Dn + d];
        } else {
          for (int64_t d = 0; d < p.Dn; ++d) grad_q_nope[qi * p.Dn + d] = static_cast<T>(dqr[d]);
          for (int64_t d = 0; d < p.R; ++d) grad_q_pe[qi * p.R + d] = static_cast<T>(dqr[p.Dn + d]);
        }
      }
      float* gk = pt.gwk.data() + (h - pt.h_lo) * p.Dn * p.C;
      float* gv = pt.gwv.data() + (h - pt.h_lo) * p.Dv * p.C;
      for (int64_t k = 0; k < p.Dn * p.C; ++k) gk[k] += dwk_buf[k];
      for (int64_t k = 0; k < p.Dv * p.C; ++k) gv[k] += dwv_buf[k];
    }
  };
  for (int64_t w0 = 0; w0 < std::max<int64_t>(keys, 1); w0 += win) {
    const int64_t w1 = std::min(keys, w0 + win);
    at::parallel_for(0, n_parts, 1, [&](int64_t part_begin, int64_t part_end) {
      for (int64_t part = part_begin; part < part_end; ++part) run_part(parts[part], w0, w1);
    });
    // The window's latent gradients, partition by partition, then key by key (a paged cache's
    // rows may share pages): threads split the C+R columns, so no two write one element.
    at::parallel_for(0, CR, 32, [&](int64_t k0, int64_t k1) {
      for (const Part& pt : parts)
        for (int64_t b = pt.b_lo; b < pt.b_hi; ++b)
          for (int64_t t = w0; t < std::min<int64_t>(w1, seqlens[b]); ++t) {
            const int64_t row = mla_prefill::grad_cache_row(p, mla_prefill::cache_slot(p, block_table, b, t));
            const float* src = pt.gcache.data() + ((b - pt.b_lo) * (w1 - w0) + (t - w0)) * CR;
            float* dst = grad_cache + row * CR;
            for (int64_t k = k0; k < k1; ++k) dst[k] += src[k];
          }
    });
  }
  for (Part& pt : parts) std::vector<float>().swap(pt.gcache);
  if (windowed && !std::is_same_v<T, float>) {
    at::parallel_for(0, n_q, 64, [&](int64_t qb, int64_t qe) {
      for (int64_t k = qb * p.Dn; k < qe * p.Dn; ++k) grad_q_nope[k] = static_cast<T>(dq_nope[k]);
      for (int64_t k = qb * p.R; k < qe * p.R; ++k) grad_q_pe[k] = static_cast<T>(dq_pe[k]);
    });
  }
  const int64_t per_k = p.Dn * p.C, per_v = p.Dv * p.C, nwk = p.H * per_k, nwv = p.H * per_v;
  at::parallel_for(0, nwk + nwv, 4096, [&](int64_t b, int64_t e) {
    for (const Part& pt : parts) {  // its heads' elements only (elsewhere it holds nothing)
      const int64_t lo = std::max(b, pt.h_lo * per_k), hi = std::min(e, pt.h_hi * per_k);
      for (int64_t i = lo; i < hi; ++i) grad_w_uk[i] += pt.gwk[i - pt.h_lo * per_k];
      const int64_t lo_v = std::max(b, nwk + pt.h_lo * per_v), hi_v = std::min(e, nwk + pt.h_hi * per_v);
      for (int64_t i = lo_v; i < hi_v; ++i) grad_w_uv[i - nwk] += pt.gwv[i - nwk - pt.h_lo * per_v];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_prefill_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q_nope, const at::Tensor& q_pe,
    const at::Tensor& latent_cache, const at::Tensor& cache_seqlens_in, const at::Tensor& w_uk,
    const at::Tensor& w_uv, const at::Tensor& out, const at::Tensor& lse, double softmax_scale,
    const std::optional<at::Tensor>& block_table_in, bool causal, int64_t window) {
  const at::Tensor cache_seqlens = latentmoe::checks::private_copy(cache_seqlens_in);  // as in the forward
  const std::optional<at::Tensor> block_table = latentmoe::checks::private_copy(block_table_in);
  auto io = mla_prefill::prepare_backward("mla_prefill_backward", grad_out, grad_lse, q_nope, q_pe, latent_cache,
                                         cache_seqlens, w_uk, w_uv, out, lse, softmax_scale, block_table, causal,
                                         window);
  const Params& p = io.p;
  // The CPU runs the absorbed backward (batched GEMMs, CUDA's default) only when asked (tests).
  if (mla_prefill::backward_path_choice() == mla_prefill::BackwardPath::kAbsorbed) {
    mla_prefill::backward_absorbed(io, q_nope, q_pe, latent_cache, w_uk, w_uv);
    return io.results();
  }
  if (p.B * p.S > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_nope.scalar_type(), "mla_prefill_backward_cpu", [&] {
      prefill_backward<scalar_t>(
          p, io.grad_out.const_data_ptr<scalar_t>(), io.grad_lse.const_data_ptr<float>(),
          q_nope.const_data_ptr<scalar_t>(), q_pe.const_data_ptr<scalar_t>(), latent_cache.const_data_ptr<scalar_t>(),
          io.block_table.defined() ? io.block_table.const_data_ptr<int32_t>() : nullptr,
          io.seqlens.const_data_ptr<int32_t>(), w_uk.const_data_ptr<scalar_t>(), w_uv.const_data_ptr<scalar_t>(),
          io.out.const_data_ptr<scalar_t>(), io.lse.const_data_ptr<float>(),
          io.grad_q_nope.mutable_data_ptr<scalar_t>(), io.grad_q_pe.mutable_data_ptr<scalar_t>(),
          io.grad_cache.mutable_data_ptr<float>(), io.grad_w_uk.mutable_data_ptr<float>(),
          io.grad_w_uv.mutable_data_ptr<float>());
    });
  }
  return io.results();
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CPU, m) {
  m.impl("mla_prefill", &mla_prefill_cpu);
  m.impl("mla_prefill_backward", &mla_prefill_backward_cpu);
}

}  // namespace latentmoe::cpu
