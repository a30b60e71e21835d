// MLA prefill CUDA kernels. Forward: one block per (batch row, head, tile of 16-64 queries); the
// block walks the key tiles its queries can see, decompresses each into per-head K_nope / V in
// shared memory (c_kv and weight chunks of kCChunk columns staged in shared memory) and runs an
// online softmax. Backward: two kernels recomputing K/V the same way (see the backward section).
// Straightforward fp32 CUDA-core code (no tensor cores): written to be obviously correct, every
// index guarded. tests/mla_prefill_emulation runs these kernels on the host (threads + barriers).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/math.h"
#include "common/mla_prefill_math.h"
#include "cuda/common/cuda_utils.cuh"
#include "cuda/mla_prefill/mla_prefill_launch.h"

namespace latentmoe::cuda {
namespace {

using mla_prefill::Params;

constexpr int kThreads = 256;
constexpr int kQTile = 16;
constexpr int kKTile = 32;  // one key per lane in the softmax row update
constexpr int kCChunk = 32;
constexpr int kCStride = kCChunk + 1;  // padded rows: no bank conflicts on the weight chunk

static_assert(kKTile == 32, "the softmax row update maps one key of a tile to one lane");

int64_t n_query_tiles(const Params& p, int64_t qt) { return (p.S + qt - 1) / qt; }

// Shared-memory staging area of the decompression (floats).
__host__ __device__ inline int64_t stage_floats(const Params& p) {
  return kKTile * kCStride + (p.Dn + p.Dv) * kCStride;
}

// Element offset of token t of row b in the cache input (contiguous or paged).
__device__ __forceinline__ int64_t row_offset(const Params& p, const int32_t* block_table, int64_t b, int64_t t) {
  return mla_prefill::cache_offset(p, mla_prefill::cache_slot(p, block_table, b, t));
}

// Decompress key tile [t0, t0 + nt) of row b for head h into ks [kKTile][Dn+R] (K_nope | k_pe)
// and vs [kKTile][Dv]; slots t >= nt are zero. Begins and ends with a barrier.
template <typename T>
__device__ void decompress_tile(const Params& p, const T* __restrict__ cache, const int32_t* __restrict__ block_table,
                                const T* __restrict__ w_uk, const T* __restrict__ w_uv, int64_t b, int64_t h,
                                int64_t t0, int64_t nt, float* ks, float* vs, float* cs, float* ws) {
  const int64_t DK = p.Dn + p.R;
  const int64_t DW = p.Dn + p.Dv;
  __syncthreads();  // the previous tile's readers of ks / vs / cs / ws are done
  for (int64_t idx = threadIdx.x; idx < kKTile * DW; idx += blockDim.x) {
    const int64_t t = idx / DW, d = idx % DW;
    if (d < p.Dn) ks[t * DK + d] = 0.f;
    else vs[t * p.Dv + (d - p.Dn)] = 0.f;
  }
  for (int64_t c0 = 0; c0 < p.C; c0 += kCChunk) {
    const int64_t cc = min(static_cast<int64_t>(kCChunk), p.C - c0);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < kKTile * kCChunk; idx += blockDim.x) {
      const int64_t t = idx / kCChunk, k = idx % kCChunk;
      cs[t * kCStride + k] = (t < nt && k < cc) ? to_float(cache[row_offset(p, block_table, b, t0 + t) + c0 + k]) : 0.f;
    }
    for (int64_t idx = threadIdx.x; idx < DW * kCChunk; idx += blockDim.x) {
      const int64_t d = idx / kCChunk, k = idx % kCChunk;
      float w = 0.f;
      if (k < cc) {
        w = d < p.Dn ? to_float(w_uk[h * p.wuk_sh + d * p.wuk_sd + c0 + k])
                     : to_float(w_uv[h * p.wuv_sh + (d - p.Dn) * p.wuv_sd + c0 + k]);
      }
      ws[d * kCStride + k] = w;
    }
    __syncthreads();
    // Same (t, d) ownership as the zeroing loop: each slot has one writer.
    for (int64_t idx = threadIdx.x; idx < kKTile * DW; idx += blockDim.x) {
      const int64_t t = idx / DW, d = idx % DW;
      float a = 0.f;
#pragma unroll 8
      for (int k = 0; k < kCChunk; ++k) a += cs[t * kCStride + k] * ws[d * kCStride + k];
      if (d < p.Dn) ks[t * DK + d] += a;
      else vs[t * p.Dv + (d - p.Dn)] += a;
    }
  }
  for (int64_t idx = threadIdx.x; idx < kKTile * p.R; idx += blockDim.x) {
    const int64_t t = idx / p.R, r = idx % p.R;
    ks[t * DK + p.Dn + r] = t < nt ? to_float(cache[row_offset(p, block_table, b, t0 + t) + p.C + r]) : 0.f;
  }
  __syncthreads();
}

struct Tile {
  int64_t b, h, seqlen, i_begin, i_end, i_lo, kv_begin, kv_end;
};

template <int QT>
__device__ Tile block_tile(const Params& p, const int32_t* seqlens) {
  const int64_t nqt = (p.S + QT - 1) / QT;
  Tile tl;
  const int64_t blk = blockIdx.x;
  const int64_t qt = blk % nqt;
  tl.h = (blk / nqt) % p.H;
  tl.b = blk / (nqt * p.H);
  int64_t len = seqlens[tl.b];
  tl.seqlen = len < 0 ? 0 : (len > p.Lmax ? p.Lmax : len);
  tl.i_begin = qt * QT;
  tl.i_end = min(p.S, tl.i_begin + QT);
  int64_t lo = mla_prefill::first_live_query(p, tl.seqlen);
  tl.i_lo = lo < tl.i_begin ? tl.i_begin : (lo > tl.i_end ? tl.i_end : lo);
  const bool any_live = tl.i_lo < tl.i_end;
  tl.kv_begin = any_live ? mla_prefill::key_begin(p, mla_prefill::query_pos(tl.seqlen, p.S, tl.i_lo)) : 0;
  tl.kv_end = any_live ? mla_prefill::key_end(p, tl.seqlen, mla_prefill::query_pos(tl.seqlen, p.S, tl.i_end - 1)) : 0;
  return tl;
}

// Does the query at position `pos` see key j (causal / window; j < seqlen is the caller's)?
__device__ __forceinline__ bool key_visible(const Params& p, int64_t seqlen, int64_t pos, int64_t j) {
  return j >= mla_prefill::key_begin(p, pos) && j < mla_prefill::key_end(p, seqlen, pos);
}

// Query row r of the tile sees key t0 + t (t < nt)?
__device__ __forceinline__ bool visible(const Params& p, const Tile& tl, int64_t r, int64_t t0, int64_t t,
                                        int64_t nt) {
  const int64_t i = tl.i_begin + r;
  return i >= tl.i_lo && i < tl.i_end && t < nt &&
         key_visible(p, tl.seqlen, mla_prefill::query_pos(tl.seqlen, p.S, i), t0 + t);
}

// ---- forward ------------------------------------------------------------------------------------

__host__ __device__ inline int64_t fwd_floats(const Params& p, int64_t QT) {
  const int64_t DK = p.Dn + p.R;
  return QT * DK + kKTile * DK + kKTile * p.Dv + stage_floats(p) + QT * kKTile + QT * p.Dv +
         3 * QT;
}

// QT queries per block (16, 32 or 64): larger tiles decompress each key tile for more queries.
template <typename T, int QT>
__global__ void __launch_bounds__(kThreads)
mla_prefill_fwd_kernel(Params p, const T* __restrict__ q_nope, const T* __restrict__ q_pe,
                       const T* __restrict__ cache, const int32_t* __restrict__ block_table,
                       const int32_t* __restrict__ seqlens, const T* __restrict__ w_uk,
                       const T* __restrict__ w_uv, T* __restrict__ out,
                       float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int64_t DK = p.Dn + p.R;
  float* qs = smem;                     // [QT][DK], scaled
  float* ks = qs + QT * DK;         // [kKTile][DK]
  float* vs = ks + kKTile * DK;         // [kKTile][Dv]
  float* cs = vs + kKTile * p.Dv;       // [kKTile][kCStride]
  float* ws = cs + kKTile * kCStride;   // [Dn+Dv][kCStride]
  float* ss = ws + (p.Dn + p.Dv) * kCStride;  // [QT][kKTile]
  float* acc = ss + QT * kKTile;    // [QT][Dv]
  float* row_m = acc + QT * p.Dv;   // [QT]
  float* row_l = row_m + QT;
  float* row_r = row_l + QT;
  const Tile tl = block_tile<QT>(p, seqlens);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;

  for (int64_t idx = threadIdx.x; idx < QT * DK; idx += blockDim.x) {
    const int64_t r = idx / DK, d = idx % DK, i = tl.i_begin + r;
    float v = 0.f;
    if (i >= tl.i_lo && i < tl.i_end) {
      v = d < p.Dn ? to_float(q_nope[tl.b * p.qn_sb + i * p.qn_ss + tl.h * p.qn_sh + d])
                   : to_float(q_pe[tl.b * p.qp_sb + i * p.qp_ss + tl.h * p.qp_sh + (d - p.Dn)]);
    }
    qs[idx] = v * p.scale;
  }
  for (int64_t idx = threadIdx.x; idx < QT * p.Dv; idx += blockDim.x) acc[idx] = 0.f;
  for (int r = threadIdx.x; r < QT; r += blockDim.x) {
    row_m[r] = -INFINITY;
    row_l[r] = 0.f;
    row_r[r] = 1.f;
  }

  for (int64_t t0 = tl.kv_begin; t0 < tl.kv_end; t0 += kKTile) {
    const int64_t nt = min(static_cast<int64_t>(kKTile), tl.kv_end - t0);
    decompress_tile(p, cache, block_table, w_uk, w_uv, tl.b, tl.h, t0, nt, ks, vs, cs, ws);
    for (int64_t idx = threadIdx.x; idx < QT * kKTile; idx += blockDim.x) {
      const int64_t r = idx / kKTile, t = idx % kKTile;
      float s = -INFINITY;
      if (visible(p, tl, r, t0, t, nt)) {
        s = 0.f;
        for (int64_t d = 0; d < DK; ++d) s += qs[r * DK + d] * ks[t * DK + d];
      }
      ss[idx] = s;
    }
    __syncthreads();
    for (int r = warp; r < QT; r += n_warps) {
      const float s = ss[r * kKTile + lane];
      const float m_old = row_m[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      const float e = (s == -INFINITY || m_new == -INFINITY) ? 0.f : math::fast_exp(s - m_new);
      const float sum = warp_sum(e);
      ss[r * kKTile + lane] = e;
      if (lane == 0) {
        const float resc = math::softmax_rescale(m_old, m_new);
        row_l[r] = row_l[r] * resc + sum;
        row_m[r] = m_new;
        row_r[r] = resc;
      }
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < QT * p.Dv; idx += blockDim.x) {
      const int64_t r = idx / p.Dv, d = idx % p.Dv;
      float a = acc[idx] * row_r[r];
      for (int64_t t = 0; t < nt; ++t) a += ss[r * kKTile + t] * vs[t * p.Dv + d];
      acc[idx] = a;
    }
  }
  __syncthreads();
  const int64_t rows = tl.i_end - tl.i_begin;
  for (int64_t idx = threadIdx.x; idx < rows * p.Dv; idx += blockDim.x) {
    const int64_t r = idx / p.Dv, d = idx % p.Dv, i = tl.i_begin + r;
    const float l = row_l[r];
    const float o = (i >= tl.i_lo && l > 0.f) ? acc[idx] / l : 0.f;
    out[((tl.b * p.S + i) * p.H + tl.h) * p.Dv + d] = from_float<T>(o);
  }
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const int64_t i = tl.i_begin + r;
    const math::SoftmaxState st{row_m[r], row_l[r]};
    lse[(tl.b * p.S + i) * p.H + tl.h] = i >= tl.i_lo ? math::softmax_lse(st) : -INFINITY;
  }
}

// ---- backward -----------------------------------------------------------------------------------
// Two kernels (flash-attention 2 style), both recomputing K/V from the latent per key tile:
//  * dq kernel, one block per (b, h, query tile): dQ for its queries (no atomics); also writes
//    delta_i = dO_i . O_i - dlse_i for the second kernel;
//  * dkv kernel, one block per (b, h, key tile): dK / dV of its keys summed over every query that
//    sees them, in shared memory, then through the decompression into the latent-cache gradient
//    (atomics across heads) and the weight gradients (atomics across key tiles and rows).

__host__ __device__ inline int64_t bwd_dq_floats(const Params& p) {
  const int64_t DK = p.Dn + p.R;
  return 2 * kQTile * DK + kQTile * p.Dv + 2 * kQTile + kKTile * DK + kKTile * p.Dv + kQTile * kKTile +
         stage_floats(p);
}

__host__ __device__ inline int64_t bwd_dkv_floats(const Params& p) {
  const int64_t DK = p.Dn + p.R;
  return 2 * kKTile * DK + 2 * kKTile * p.Dv + kQTile * DK + kQTile * p.Dv + 2 * kQTile + 2 * kQTile * kKTile +
         stage_floats(p);
}

// Load query rows [i_begin, i_begin + kQTile) of (b, h) that satisfy `live(i)`: q (unscaled) into
// qs [kQTile][DK] and dO into dos [kQTile][Dv]; other rows are zero.
template <typename T, typename Live>
__device__ void load_query_tile(const Params& p, const T* __restrict__ q_nope, const T* __restrict__ q_pe,
                                const T* __restrict__ grad_out, int64_t b, int64_t h, int64_t i_begin, Live live,
                                float* qs, float* dos) {
  const int64_t DK = p.Dn + p.R;
  for (int64_t idx = threadIdx.x; idx < kQTile * DK; idx += blockDim.x) {
    const int64_t r = idx / DK, d = idx % DK, i = i_begin + r;
    float v = 0.f;
    if (live(i)) {
      v = d < p.Dn ? to_float(q_nope[b * p.qn_sb + i * p.qn_ss + h * p.qn_sh + d])
                   : to_float(q_pe[b * p.qp_sb + i * p.qp_ss + h * p.qp_sh + (d - p.Dn)]);
    }
    qs[idx] = v;
  }
  for (int64_t idx = threadIdx.x; idx < kQTile * p.Dv; idx += blockDim.x) {
    const int64_t r = idx / p.Dv, d = idx % p.Dv, i = i_begin + r;
    dos[idx] = live(i) ? to_float(grad_out[((b * p.S + i) * p.H + h) * p.Dv + d]) : 0.f;
  }
}

// P and dS of a (query tile, key tile) pair: ps / dss [kQTile][kKTile], zero where not visible.
// Query row r is at position pos0 + r and is live when live_row(r).
template <typename LiveRow>
__device__ void probs_and_dscores(const Params& p, LiveRow live_row, int64_t seqlen, int64_t pos0, int64_t t0,
                                  int64_t nt,
                                  const float* qs, const float* dos, const float* ks, const float* vs,
                                  const float* lse_s, const float* delta_s, float* ps, float* dss) {
  const int64_t DK = p.Dn + p.R;
  for (int64_t idx = threadIdx.x; idx < kQTile * kKTile; idx += blockDim.x) {
    const int64_t r = idx / kKTile, t = idx % kKTile;
    float pr = 0.f, ds = 0.f;
    if (live_row(r) && t < nt && key_visible(p, seqlen, pos0 + r, t0 + t) && lse_s[r] != -INFINITY) {
      float s = 0.f;
      for (int64_t d = 0; d < DK; ++d) s += qs[r * DK + d] * ks[t * DK + d];
      pr = math::fast_exp(s * p.scale - lse_s[r]);
      float dp = 0.f;
      for (int64_t d = 0; d < p.Dv; ++d) dp += dos[r * p.Dv + d] * vs[t * p.Dv + d];
      ds = pr * (dp - delta_s[r]) * p.scale;
    }
    if (ps != nullptr) ps[idx] = pr;
    dss[idx] = ds;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
mla_prefill_bwd_dq_kernel(Params p, const T* __restrict__ grad_out, const float* __restrict__ grad_lse,
                          const T* __restrict__ q_nope, const T* __restrict__ q_pe, const T* __restrict__ cache,
                          const int32_t* __restrict__ block_table, const int32_t* __restrict__ seqlens,
                          const T* __restrict__ w_uk, const T* __restrict__ w_uv, const T* __restrict__ out,
                          const float* __restrict__ lse, T* __restrict__ grad_q_nope, T* __restrict__ grad_q_pe,
                          float* __restrict__ delta) {
  extern __shared__ float smem[];
  const int64_t DK = p.Dn + p.R;
  float* qs = smem;                     // [kQTile][DK] unscaled
  float* dqs = qs + kQTile * DK;        // [kQTile][DK]
  float* dos = dqs + kQTile * DK;       // [kQTile][Dv]
  float* lse_s = dos + kQTile * p.Dv;   // [kQTile]
  float* delta_s = lse_s + kQTile;      // [kQTile]
  float* ks = delta_s + kQTile;         // [kKTile][DK]
  float* vs = ks + kKTile * DK;         // [kKTile][Dv]
  float* dss = vs + kKTile * p.Dv;      // [kQTile][kKTile]
  float* cs = dss + kQTile * kKTile;    // staging
  float* ws = cs + kKTile * kCStride;
  const Tile tl = block_tile<kQTile>(p, seqlens);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  auto live = [&](int64_t i) { return i >= tl.i_lo && i < tl.i_end; };
  auto live_row = [&](int64_t r) { return live(tl.i_begin + r); };

  load_query_tile(p, q_nope, q_pe, grad_out, tl.b, tl.h, tl.i_begin, live, qs, dos);
  for (int64_t idx = threadIdx.x; idx < kQTile * DK; idx += blockDim.x) dqs[idx] = 0.f;
  // delta_i = dO_i . O_i - dlse_i, one warp per row.
  for (int r = warp; r < kQTile; r += n_warps) {
    const int64_t i = tl.i_begin + r;
    float dot = 0.f;
    if (live(i)) {
      const int64_t base = ((tl.b * p.S + i) * p.H + tl.h) * p.Dv;
      for (int64_t d = lane; d < p.Dv; d += 32) dot += to_float(grad_out[base + d]) * to_float(out[base + d]);
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      const int64_t qi = (tl.b * p.S + i) * p.H + tl.h;
      delta_s[r] = live(i) ? dot - grad_lse[qi] : 0.f;
      lse_s[r] = live(i) ? lse[qi] : -INFINITY;
      if (i < tl.i_end) delta[qi] = delta_s[r];
    }
  }

  const int64_t pos0 = mla_prefill::query_pos(tl.seqlen, p.S, tl.i_begin);
  for (int64_t t0 = tl.kv_begin; t0 < tl.kv_end; t0 += kKTile) {
    const int64_t nt = min(static_cast<int64_t>(kKTile), tl.kv_end - t0);
    decompress_tile(p, cache, block_table, w_uk, w_uv, tl.b, tl.h, t0, nt, ks, vs, cs, ws);
    probs_and_dscores(p, live_row, tl.seqlen, pos0, t0, nt, qs, dos, ks, vs, lse_s, delta_s, nullptr, dss);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < kQTile * DK; idx += blockDim.x) {
      const int64_t r = idx / DK, d = idx % DK;
      float a = 0.f;
      for (int t = 0; t < kKTile; ++t) a += dss[r * kKTile + t] * ks[t * DK + d];
      dqs[idx] += a;
    }
  }
  __syncthreads();
  const int64_t n_rows = tl.i_end - tl.i_begin;
  for (int64_t idx = threadIdx.x; idx < n_rows * DK; idx += blockDim.x) {
    const int64_t r = idx / DK, d = idx % DK, i = tl.i_begin + r;
    const int64_t qi = (tl.b * p.S + i) * p.H + tl.h;
    const float g = i >= tl.i_lo ? dqs[idx] : 0.f;
    if (d < p.Dn) grad_q_nope[qi * p.Dn + d] = from_float<T>(g);
    else grad_q_pe[qi * p.R + (d - p.Dn)] = from_float<T>(g);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
mla_prefill_bwd_dkv_kernel(Params p, const T* __restrict__ grad_out, const T* __restrict__ q_nope,
                           const T* __restrict__ q_pe, const T* __restrict__ cache,
                           const int32_t* __restrict__ block_table, const int32_t* __restrict__ seqlens,
                           const T* __restrict__ w_uk, const T* __restrict__ w_uv, const float* __restrict__ lse,
                           const float* __restrict__ delta, float* __restrict__ grad_cache,
                           float* __restrict__ grad_w_uk, float* __restrict__ grad_w_uv) {
  extern __shared__ float smem[];
  const int64_t DK = p.Dn + p.R;
  const int64_t CR = p.C + p.R;
  float* ks = smem;                     // [kKTile][DK]
  float* vs = ks + kKTile * DK;         // [kKTile][Dv]
  float* dks = vs + kKTile * p.Dv;      // [kKTile][DK]
  float* dvs = dks + kKTile * DK;       // [kKTile][Dv]
  float* qs = dvs + kKTile * p.Dv;      // [kQTile][DK]
  float* dos = qs + kQTile * DK;        // [kQTile][Dv]
  float* lse_s = dos + kQTile * p.Dv;   // [kQTile]
  float* delta_s = lse_s + kQTile;      // [kQTile]
  float* ps = delta_s + kQTile;         // [kQTile][kKTile]
  float* dss = ps + kQTile * kKTile;    // [kQTile][kKTile]
  float* cs = dss + kQTile * kKTile;    // staging
  float* ws = cs + kKTile * kCStride;

  const int64_t n_kt = (p.Lmax + kKTile - 1) / kKTile;
  const int64_t blk = blockIdx.x;
  const int64_t kt = blk % n_kt;
  const int64_t h = (blk / n_kt) % p.H;
  const int64_t b = blk / (n_kt * p.H);
  int64_t seqlen = seqlens[b];
  seqlen = seqlen < 0 ? 0 : (seqlen > p.Lmax ? p.Lmax : seqlen);
  const int64_t t0 = kt * kKTile;
  if (t0 >= seqlen || p.S == 0) return;  // whole block: no key of this tile is read
  const int64_t nt = min(static_cast<int64_t>(kKTile), seqlen - t0);
  // Queries [i_first, i_stop) see some key of the tile.
  const int64_t i_first = mla_prefill::first_query_seeing(p, seqlen, t0);
  const int64_t i_stop = mla_prefill::end_query_seeing(p, seqlen, t0 + nt);
  if (i_first >= i_stop) return;  // whole block: no query sees this tile

  decompress_tile(p, cache, block_table, w_uk, w_uv, b, h, t0, nt, ks, vs, cs, ws);
  for (int64_t idx = threadIdx.x; idx < kKTile * DK; idx += blockDim.x) dks[idx] = 0.f;
  for (int64_t idx = threadIdx.x; idx < kKTile * p.Dv; idx += blockDim.x) dvs[idx] = 0.f;
  for (int64_t i0 = i_first; i0 < i_stop; i0 += kQTile) {
    auto live = [&](int64_t i) { return i >= i0 && i < i_stop; };
    auto live_row = [&](int64_t r) { return i0 + r < i_stop; };
    load_query_tile(p, q_nope, q_pe, grad_out, b, h, i0, live, qs, dos);
    for (int r = threadIdx.x; r < kQTile; r += blockDim.x) {
      const int64_t qi = (b * p.S + i0 + r) * p.H + h;
      lse_s[r] = live(i0 + r) ? lse[qi] : -INFINITY;
      delta_s[r] = live(i0 + r) ? delta[qi] : 0.f;
    }
    __syncthreads();
    probs_and_dscores(p, live_row, seqlen, mla_prefill::query_pos(seqlen, p.S, i0), t0, nt, qs, dos, ks, vs,
                      lse_s, delta_s, ps, dss);
    __syncthreads();
    // Same (t, d) ownership in every iteration: each slot has one writer.
    for (int64_t idx = threadIdx.x; idx < kKTile * DK; idx += blockDim.x) {
      const int64_t t = idx / DK, d = idx % DK;
      float a = 0.f;
      for (int r = 0; r < kQTile; ++r) a += dss[r * kKTile + t] * qs[r * DK + d];
      dks[idx] += a;
    }
    for (int64_t idx = threadIdx.x; idx < kKTile * p.Dv; idx += blockDim.x) {
      const int64_t t = idx / p.Dv, d = idx % p.Dv;
      float a = 0.f;
      for (int r = 0; r < kQTile; ++r) a += ps[r * kKTile + t] * dos[r * p.Dv + d];
      dvs[idx] += a;
    }
    __syncthreads();
  }
  // Latent-cache gradient of the tile: dK_nope W_UK + dV W_UV (c_kv part), dK_pe (k_pe part).
  const T* wk = w_uk + h * p.wuk_sh;
  const T* wv = w_uv + h * p.wuv_sh;
  for (int64_t idx = threadIdx.x; idx < nt * p.C; idx += blockDim.x) {
    const int64_t t = idx / p.C, c = idx % p.C;
    float a = 0.f;
    for (int64_t d = 0; d < p.Dn; ++d) a += dks[t * DK + d] * to_float(wk[d * p.wuk_sd + c]);
    for (int64_t d = 0; d < p.Dv; ++d) a += dvs[t * p.Dv + d] * to_float(wv[d * p.wuv_sd + c]);
    const int64_t g_row = mla_prefill::grad_cache_row(p, mla_prefill::cache_slot(p, block_table, b, t0 + t));
    atomicAdd(grad_cache + g_row * CR + c, a);
  }
  for (int64_t idx = threadIdx.x; idx < nt * p.R; idx += blockDim.x) {
    const int64_t t = idx / p.R, r = idx % p.R;
    const int64_t g_row = mla_prefill::grad_cache_row(p, mla_prefill::cache_slot(p, block_table, b, t0 + t));
    atomicAdd(grad_cache + g_row * CR + p.C + r, dks[t * DK + p.Dn + r]);
  }
  // Weight gradients: dW_UK_h += dK_nope^T c_kv, dW_UV_h += dV^T c_kv.
  for (int64_t idx = threadIdx.x; idx < (p.Dn + p.Dv) * p.C; idx += blockDim.x) {
    const int64_t d = idx / p.C, c = idx % p.C;
    float a = 0.f;
    for (int64_t t = 0; t < nt; ++t) {
      const float ckv = to_float(cache[row_offset(p, block_table, b, t0 + t) + c]);
      a += (d < p.Dn ? dks[t * DK + d] : dvs[t * p.Dv + (d - p.Dn)]) * ckv;
    }
    if (d < p.Dn) atomicAdd(grad_w_uk + (h * p.Dn + d) * p.C + c, a);
    else atomicAdd(grad_w_uv + (h * p.Dv + (d - p.Dn)) * p.C + c, a);
  }
}

template <typename T, int QT>
cudaError_t forward_tiled(const Params& p, const void* q_nope, const void* q_pe, const void* cache,
                          const int32_t* block_table, const int32_t* seqlens, const void* w_uk, const void* w_uv,
                          void* out, float* lse, cudaStream_t stream) {
  const int64_t blocks = p.B * p.H * n_query_tiles(p, QT);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>(fwd_floats(p, QT)) * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(mla_prefill_fwd_kernel<T, QT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  mla_prefill_fwd_kernel<T, QT><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      p, static_cast<const T*>(q_nope), static_cast<const T*>(q_pe), static_cast<const T*>(cache), block_table,
      seqlens, static_cast<const T*>(w_uk), static_cast<const T*>(w_uv), static_cast<T*>(out), lse);
  return cudaGetLastError();
}

// The largest query tile whose shared memory fits the device (the binding checked that 16 fits).
template <typename T>
cudaError_t forward_typed(const Params& p, const void* q_nope, const void* q_pe, const void* cache,
                          const int32_t* block_table, const int32_t* seqlens, const void* w_uk, const void* w_uv,
                          void* out, float* lse, cudaStream_t stream) {
  int dev = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  auto fits = [&](int64_t qt) { return fwd_floats(p, qt) * static_cast<int64_t>(sizeof(float)) <= limit; };
  if (fits(64) && p.S > 32) {
    return forward_tiled<T, 64>(p, q_nope, q_pe, cache, block_table, seqlens, w_uk, w_uv, out, lse, stream);
  }
  if (fits(32) && p.S > 16) {
    return forward_tiled<T, 32>(p, q_nope, q_pe, cache, block_table, seqlens, w_uk, w_uv, out, lse, stream);
  }
  return forward_tiled<T, kQTile>(p, q_nope, q_pe, cache, block_table, seqlens, w_uk, w_uv, out, lse, stream);
}

template <typename T>
cudaError_t backward_typed(const Params& p, const void* grad_out, const float* grad_lse, const void* q_nope,
                           const void* q_pe, const void* cache, const int32_t* block_table, const int32_t* seqlens,
                           const void* w_uk, const void* w_uv, const void* out, const float* lse, void* grad_q_nope,
                           void* grad_q_pe, float* grad_cache, float* grad_w_uk, float* grad_w_uv, float* delta,
                           cudaStream_t stream) {
  const int64_t dq_blocks = p.B * p.H * n_query_tiles(p, kQTile);
  const int64_t dkv_blocks = p.B * p.H * ((p.Lmax + kKTile - 1) / kKTile);
  if (dq_blocks == 0) return cudaSuccess;
  if (dq_blocks > 0x7fffffff || dkv_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const size_t dq_smem = static_cast<size_t>(bwd_dq_floats(p)) * sizeof(float);
  const size_t dkv_smem = static_cast<size_t>(bwd_dkv_floats(p)) * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(mla_prefill_bwd_dq_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(dq_smem));
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(mla_prefill_bwd_dkv_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(dkv_smem));
  if (err != cudaSuccess) return err;
  mla_prefill_bwd_dq_kernel<T><<<static_cast<unsigned>(dq_blocks), kThreads, dq_smem, stream>>>(
      p, static_cast<const T*>(grad_out), grad_lse, static_cast<const T*>(q_nope), static_cast<const T*>(q_pe),
      static_cast<const T*>(cache), block_table, seqlens, static_cast<const T*>(w_uk), static_cast<const T*>(w_uv),
      static_cast<const T*>(out), lse, static_cast<T*>(grad_q_nope), static_cast<T*>(grad_q_pe), delta);
  err = cudaGetLastError();
  if (err != cudaSuccess || dkv_blocks == 0) return err;
  mla_prefill_bwd_dkv_kernel<T><<<static_cast<unsigned>(dkv_blocks), kThreads, dkv_smem, stream>>>(
      p, static_cast<const T*>(grad_out), static_cast<const T*>(q_nope), static_cast<const T*>(q_pe),
      static_cast<const T*>(cache), block_table, seqlens, static_cast<const T*>(w_uk), static_cast<const T*>(w_uv),
      lse, delta, grad_cache, grad_w_uk, grad_w_uv);
  return cudaGetLastError();
}

}  // namespace

size_t mla_prefill_forward_smem_bytes(const Params& p) {
  return static_cast<size_t>(fwd_floats(p, kQTile)) * sizeof(float);
}
size_t mla_prefill_backward_smem_bytes(const Params& p) {
  const int64_t dq = bwd_dq_floats(p), dkv = bwd_dkv_floats(p);
  return static_cast<size_t>(dq > dkv ? dq : dkv) * sizeof(float);
}

cudaError_t launch_mla_prefill_forward(DType dtype, const Params& p, const void* q_nope, const void* q_pe,
                                       const void* latent_cache, const int32_t* block_table, const int32_t* seqlens,
                                       const void* w_uk, const void* w_uv, void* out, float* lse, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(p, q_nope, q_pe, latent_cache, block_table, seqlens, w_uk, w_uv, out, lse, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(p, q_nope, q_pe, latent_cache, block_table, seqlens, w_uk, w_uv, out, lse, stream);
    case DType::kFloat16:
      return forward_typed<__half>(p, q_nope, q_pe, latent_cache, block_table, seqlens, w_uk, w_uv, out, lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_mla_prefill_backward(DType dtype, const Params& p, const void* grad_out, const float* grad_lse,
                                        const void* q_nope, const void* q_pe, const void* latent_cache,
                                        const int32_t* block_table, const int32_t* seqlens, const void* w_uk, const void* w_uv, const void* out,
                                        const float* lse, void* grad_q_nope, void* grad_q_pe, float* grad_cache,
                                        float* grad_w_uk, float* grad_w_uv, float* delta, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(p, grad_out, grad_lse, q_nope, q_pe, latent_cache, block_table, seqlens, w_uk, w_uv, out,
                                   lse, grad_q_nope, grad_q_pe, grad_cache, grad_w_uk, grad_w_uv, delta, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(p, grad_out, grad_lse, q_nope, q_pe, latent_cache, block_table, seqlens, w_uk,
                                           w_uv, out, lse, grad_q_nope, grad_q_pe, grad_cache, grad_w_uk,
                                           grad_w_uv, delta, stream);
    case DType::kFloat16:
      return backward_typed<__half>(p, grad_out, grad_lse, q_nope, q_pe, latent_cache, block_table, seqlens, w_uk, w_uv, out,
                                    lse, grad_q_nope, grad_q_pe, grad_cache, grad_w_uk, grad_w_uv, delta, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace latentmoe::cuda
