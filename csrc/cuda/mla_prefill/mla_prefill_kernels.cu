// MLA prefill CUDA kernels. Forward: absorbed (MQA-style) attention over the latent cache, one
// block per (query tile, batch row, head group), register-blocked fp32 SIMT loops; the design and
// its FLOP arithmetic are in the forward section's header. Backward: two kernels recomputing
// per-head K/V from the latent per key tile (see the backward section), written to be obviously
// correct, every index guarded. tests/mla_prefill_emulation runs these kernels on the host
// (threads + barriers).
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

// Online-softmax update of query row r for one key tile, by one warp (lane = key, s = its score
// or -inf): returns the lane's unnormalised probability; lane 0 updates the row's running max and
// sum and records the factor that rescales the row's accumulators. Every lane has read row_m[r]
// before lane 0 rewrites it (__syncwarp: shuffles alone do not order shared memory).
__device__ __forceinline__ float softmax_row_update(float* row_m, float* row_l, float* row_r, int64_t r, float s,
                                                   int lane) {
  const float m_old = row_m[r];
  const float m_new = fmaxf(m_old, warp_max(s));
  // Only masked keys (-inf) give 0: a NaN score (NaN query or key) is skipped by fmaxf, so m_new
  // may still be -inf, and exp(NaN) must reach the sum (NaN output and LSE, as the CPU op).
  const float e = s == -INFINITY ? 0.f : math::fast_exp(s - m_new);
  const float sum = warp_sum(e);
  __syncwarp();
  if (lane == 0) {
    const float resc = math::softmax_rescale(m_old, m_new);
    row_l[r] = row_l[r] * resc + sum;
    row_m[r] = m_new;
    row_r[r] = resc;
  }
  return e;
}

// ---- forward ------------------------------------------------------------------------------------
// Absorbed (MQA-style) form. Each block owns kRows attention rows = (query, head) pairs of one batch
// row: qb consecutive queries x hb consecutive heads (r = hh * qb + qi). For long prompts qb = 32,
// hb = 1; for short chunks (S < 32) several heads fill the block (hb = 32 / S). The block:
//  1. absorbs its queries: qs[r] = scale * (q_nope[r] . W_UK[h] (C values) | q_pe[r] (R values));
//  2. walks the key tiles (kKeys latent rows c_kv | k_pe, D = C + R values each, read once per
//     block per tile, into ks) that its live queries can see, and per tile
//     - scores [kRows x kKeys] = qs . ks^T: the D dims split over kSG thread groups, each thread
//       a 4 x 4 register block, partial sums reduced through shared memory;
//     - online softmax (one warp per row, one lane per key; causal / window / prefix masks here);
//     - o_lat [kRows x C] = o_lat * rescale + P . c_kv: each thread owns 8 rows x 8 columns in
//       registers (2 float4 column chunks), so one pass covers kPassChunks * 4 = 512 columns;
//       larger C runs several passes over the keys (same scores, next columns);
//  3. out[r] = (o_lat[r] / l[r]) . W_UV[h]^T, one warp per (head, v, 8 queries), lanes along C.
// This is the "on-the-fly latent decompression" of the design notes in its absorbed form: W_UK is
// folded into the queries and W_UV into the output, so neither per-head K nor V is ever formed,
// in memory or in shared memory; the extra memory is O(tokens) (only out and lse).
//
// FLOPs (FMA = 2) per visible (query, head, key) triple: 2 * (C + R) for the score and 2 * C for
// P . c_kv, i.e. 2176 at C = 512, R = 64, against 2 * C * (Dn + Dv) = 262144 for decompressing K/V
// per key and head (the previous kernel amortised that only over its 16-64 queries). Per row
// (query, head) once: 2 * Dn * C (absorb) + 2 * Dv * C (output). Bench shape (B = 1, S = 4096,
// H = 16, causal, V3 dims): 8.39e6 (query, key) pairs * 16 heads * 2176 = 292 GFLOP + 65536 rows *
// 262144 = 17 GFLOP, ~310 GFLOP of fp32 FMA (diagonal-tile waste < 1%). Latent tiles read from
// L2: 2048 blocks * ~64 tiles * 32 keys * 576 * 4 B = ~9.7 GB.
// Why queries before heads: a block's key-tile reuse is its 32 rows whichever mix they are, but
// every head of a block costs 2 * Dn * C weights (0.5 MB fp32) read for the absorb / output steps;
// 2 queries x 16 heads would read 8 MB of weights per block (16 GB over the bench grid).
// Resources (V3 dims, fp32): 256 threads, 241 registers, 187 KB dynamic shared memory (qs and ks
// 74 KB each), so one block per SM; 2048 blocks at the bench shape, longest first. The key tile is
// single-buffered (no room for a second one): its load (one round of 20 float4 loads per lane) is
// not overlapped with compute, ~10-15% of a tile's time.
// Bound: FMA issue of the SIMT loops (67 TFLOP/s fp32 peak on an H200; per 64 FMAs a thread does
// 8 (score) or 4 (P . c_kv) 16-byte shared loads); expected ~40-50% of peak -> ~9-13 ms.
// Numerics: fp32 accumulation throughout (the sum order differs from the CPU kernel: results agree
// to rounding, not bit for bit).

constexpr int kRows = 32;        // (query, head) rows per block
constexpr int kKeys = 32;        // keys per tile (one per lane in the softmax)
constexpr int kSG = 4;           // score: thread groups splitting the D dims
constexpr int kPS = kRows + 4;   // row stride of the P tile (stored [key][row])
constexpr int kPassChunks = 128; // float4 column chunks of o_lat per pass (64 threads x 2)
constexpr int kRedStride = kKeys + 1;
// Key-tile load: float4 chunks per lane and row in flight (5 * 32 * 4 = 640 >= C + R = 576: the
// V3 tile is loaded in one round of 20 vector loads per lane).
constexpr int kLoadU = 5;

static_assert(kThreads == 256 && kRows == 32 && kKeys == 32, "the thread maps below assume 256 threads, 32x32");
static_assert(kKeys % (kThreads / 32) == 0, "the key-tile load gives each warp kKeys / 8 rows");
static_assert(kRows == kKeys, "the output staging reuses the key tile ([kKeys][ds]) for [kRows][ds]");

struct FwdLayout {
  int64_t qb, hb, n_hg, n_qt;  // queries and heads per block, head groups, query tiles
  int64_t d4, ds;              // float4 chunks of a latent row (C + R), padded smem row stride
  int64_t scratch, oacc;       // floats of the scratch and output-accumulator regions
  int64_t floats, blocks;      // dynamic shared memory (floats), grid size
  bool vec;                    // cache rows 4-element aligned: vector loads (set by the launcher)
};

__host__ __device__ inline int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }

// hb_force > 0 asks for that many heads per block (the emulation tests use it to cover multi-head
// blocks at any S); 0 chooses: fill the block with queries first.
__host__ __device__ inline FwdLayout fwd_layout(const Params& p, int64_t hb_force) {
  FwdLayout L{};
  const int64_t H = p.H > 0 ? p.H : 1;
  const int64_t qb_want = p.S <= 0 ? 1 : (p.S < kRows ? p.S : kRows);
  int64_t hb = hb_force > 0 ? hb_force : kRows / qb_want;
  hb = hb < 1 ? 1 : (hb > kRows ? kRows : hb);
  if (hb > H) hb = H;
  L.n_hg = (H + hb - 1) / hb;
  L.hb = (H + L.n_hg - 1) / L.n_hg;  // same head count in every group but maybe the last
  L.qb = kRows / L.hb;
  L.n_qt = (p.S + L.qb - 1) / L.qb;
  L.d4 = (p.C + p.R + 3) / 4;
  L.ds = L.d4 * 4 + ((4 - L.d4 * 4) % 32 + 32) % 32;  // ds % 32 == 4: rows start in distinct banks
  const int64_t red = kSG * kRows * kRedStride, qn = kRows * p.Dn;
  L.scratch = round4(red > qn ? red : qn);
  L.oacc = round4(kRows * p.Dv);
  L.floats = 2 * kKeys + 2 * kRows * L.ds + L.scratch + kKeys * kPS + L.oacc + round4(3 * kRows);
  L.blocks = p.B * L.n_hg * L.n_qt;
  L.vec = false;
  return L;
}

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Elements [c, c + 4) of a latent row (zero past D); one vector load when aligned and whole.
template <typename T>
__device__ __forceinline__ float4 load_chunk(const T* __restrict__ row, int64_t c, int64_t D, bool vec) {
  float4 r;
  if (vec && c + 4 <= D) {
    const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(row + c);
    r.x = to_float(pk.v[0]);
    r.y = to_float(pk.v[1]);
    r.z = to_float(pk.v[2]);
    r.w = to_float(pk.v[3]);
  } else {
    r.x = c < D ? to_float(row[c]) : 0.f;
    r.y = c + 1 < D ? to_float(row[c + 1]) : 0.f;
    r.z = c + 2 < D ? to_float(row[c + 2]) : 0.f;
    r.w = c + 3 < D ? to_float(row[c + 3]) : 0.f;
  }
  return r;
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
mla_prefill_fwd_kernel(Params p, FwdLayout L, const T* __restrict__ q_nope, const T* __restrict__ q_pe,
                       const T* __restrict__ cache, const int32_t* __restrict__ block_table,
                       const int32_t* __restrict__ seqlens, const T* __restrict__ w_uk,
                       const T* __restrict__ w_uv, T* __restrict__ out, float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int64_t ds = L.ds, D = p.C + p.R;
  const int qb = static_cast<int>(L.qb);
  int64_t* rowoff = reinterpret_cast<int64_t*>(smem);  // [kKeys] cache offsets of the tile's keys
  float* qs = smem + 2 * kKeys;                        // [kRows][ds] scaled q_lat | q_pe | 0
  float* ks = qs + kRows * ds;                         // [kKeys][ds] c_kv | k_pe | 0; later o_lat
  float* scratch = ks + kKeys * ds;                    // q_nope staging, then score partials
  float* ps = scratch + L.scratch;                     // [kKeys][kPS] probabilities
  float* oacc = ps + kKeys * kPS;                      // [kRows][Dv] output accumulator
  float* row_m = oacc + L.oacc;                        // [kRows] running max, sum, rescale
  float* row_l = row_m + kRows;
  float* row_r = row_l + kRows;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Block -> (query tile, batch row, head group); the last query tiles (most keys when causal)
  // come first so the long blocks start early.
  const int64_t per_qt = p.B * L.n_hg;
  const int64_t blk = blockIdx.x;
  const int64_t qt = L.n_qt - 1 - blk / per_qt;
  const int64_t b = (blk % per_qt) / L.n_hg;
  const int64_t h0 = (blk % L.n_hg) * L.hb;
  const int nh = static_cast<int>(min(L.hb, p.H - h0));
  const int64_t i_begin = qt * L.qb;
  const int nq = static_cast<int>(min(L.qb, p.S - i_begin));
  int64_t seqlen = seqlens[b];
  seqlen = seqlen < 0 ? 0 : (seqlen > p.Lmax ? p.Lmax : seqlen);
  int64_t i_lo = mla_prefill::first_live_query(p, seqlen);
  i_lo = i_lo < i_begin ? i_begin : (i_lo > i_begin + nq ? i_begin + nq : i_lo);
  const bool any_live = i_lo < i_begin + nq;
  const int64_t kv_begin = any_live ? mla_prefill::key_begin(p, mla_prefill::query_pos(seqlen, p.S, i_lo)) : 0;
  const int64_t kv_end =
      any_live ? mla_prefill::key_end(p, seqlen, mla_prefill::query_pos(seqlen, p.S, i_begin + nq - 1)) : 0;
  // Row r: head h0 + r / qb, query i_begin + r % qb; live when it exists and sees some key.
  auto row_live = [&](int r) {
    const int hh = r / qb, qi = r - hh * qb;
    return hh < nh && qi < nq && i_begin + qi >= i_lo;
  };

  // ---- 1. absorb the queries ----
  float* qn = scratch;  // [kRows][Dn]
  for (int64_t idx = tid; idx < kRows * p.Dn; idx += kThreads) {
    const int r = static_cast<int>(idx / p.Dn);
    const int64_t d = idx - r * p.Dn;
    float v = 0.f;
    if (row_live(r)) {
      const int hh = r / qb;
      const int64_t i = i_begin + (r - hh * qb);
      v = to_float(q_nope[b * p.qn_sb + i * p.qn_ss + (h0 + hh) * p.qn_sh + d]);
    }
    qn[idx] = v;
  }
  const int64_t tail = ds - p.C;  // q_pe and zero padding
  for (int64_t idx = tid; idx < kRows * tail; idx += kThreads) {
    const int r = static_cast<int>(idx / tail);
    const int64_t k = idx - r * tail;
    float v = 0.f;
    if (k < p.R && row_live(r)) {
      const int hh = r / qb;
      const int64_t i = i_begin + (r - hh * qb);
      v = to_float(q_pe[b * p.qp_sb + i * p.qp_ss + (h0 + hh) * p.qp_sh + k]) * p.scale;
    }
    qs[r * ds + p.C + k] = v;
  }
  for (int64_t idx = tid; idx < (kRows - L.hb * qb) * p.C; idx += kThreads) {  // rows past hb * qb
    const int64_t r = L.hb * qb + idx / p.C;
    qs[r * ds + idx % p.C] = 0.f;
  }
  __syncthreads();
  for (int64_t c = tid; c < p.C; c += kThreads) {
    for (int hh = 0; hh < L.hb; ++hh) {
      for (int q0 = 0; q0 < qb; q0 += 8) {
        float acc[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] = 0.f;
        if (hh < nh) {
          const T* w = w_uk + (h0 + hh) * p.wuk_sh + c;
          const float* qrow[8];
#pragma unroll
          for (int k = 0; k < 8; ++k) qrow[k] = qn + (hh * qb + min(q0 + k, qb - 1)) * p.Dn;
          const int nk = min(8, qb - q0);  // rows of this chunk (uniform: no divergence)
#pragma unroll 4
          for (int64_t d = 0; d < p.Dn; ++d) {  // unrolled: several weight loads in flight
            const float wv = to_float(w[d * p.wuk_sd]);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
              if (k < nk) acc[k] = fmaf(qrow[k][d], wv, acc[k]);
            }
          }
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          if (q0 + k < qb) qs[(hh * qb + q0 + k) * ds + c] = acc[k] * p.scale;
        }
      }
    }
  }

  // Thread maps. Scores: group sg = tid / 64 takes float4 chunks sg, sg + kSG, ...; rows
  // sy + 8 i, keys sx + 8 j (i, j < 4). P . c_kv: rows 8 oy .. 8 oy + 7, chunks ox and ox + 64.
  const int sg = tid / 64, sy = (tid % 64) / 8, sx = tid % 8;
  const int oy = tid / 64, ox = tid % 64;
  const int64_t c4n = (p.C + 3) / 4;

  for (int64_t cb4 = 0; cb4 < c4n; cb4 += kPassChunks) {  // one pass per 512 columns of o_lat
    if (tid < kRows) {
      row_m[tid] = -INFINITY;
      row_l[tid] = 0.f;
      row_r[tid] = 0.f;
    }
    const bool ok0 = cb4 + ox < c4n, ok1 = cb4 + ox + 64 < c4n;
    const int64_t col0 = ok0 ? 4 * (cb4 + ox) : 0;  // out-of-range chunks read column 0, unused
    const int64_t col1 = ok1 ? 4 * (cb4 + ox + 64) : 0;
    float o[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) o[i][j] = 0.f;
    }

    for (int64_t t0 = kv_begin; t0 < kv_end; t0 += kKeys) {
      const int64_t nt = min(static_cast<int64_t>(kKeys), kv_end - t0);
      __syncthreads();  // the previous tile's readers of ks / ps / rowoff are done (and step 1)
      if (tid < kKeys) rowoff[tid] = tid < nt ? row_offset(p, block_table, b, t0 + tid) : 0;
      __syncthreads();
      const int ds4 = static_cast<int>(ds / 4), d4 = static_cast<int>(L.d4);
      // Warp w loads key rows w + 8 k (k < 4), lanes along the row; kLoadU chunks per lane and
      // row are loaded before any is stored, so 20 loads per lane are in flight at once.
      for (int base = 0; base < ds4; base += 32 * kLoadU) {
        float4 v[kKeys / 8][kLoadU];
#pragma unroll
        for (int k = 0; k < kKeys / 8; ++k) {
          const int t = warp + 8 * k;
          const T* src = cache + rowoff[t];
#pragma unroll
          for (int u = 0; u < kLoadU; ++u) {
            const int c4 = base + lane + 32 * u;
            v[k][u] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (t < nt && c4 < d4) v[k][u] = load_chunk(src, 4 * c4, D, L.vec);
          }
        }
#pragma unroll
        for (int k = 0; k < kKeys / 8; ++k) {
#pragma unroll
          for (int u = 0; u < kLoadU; ++u) {
            const int c4 = base + lane + 32 * u;
            if (c4 < ds4) *reinterpret_cast<float4*>(ks + (warp + 8 * k) * ds + 4 * c4) = v[k][u];
          }
        }
      }
      __syncthreads();

      {  // scores, partial over this group's chunks
        float s[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) s[i][j] = 0.f;
        }
        const float* qa = qs + sy * ds;
        const float* ka = ks + sx * ds;
        const int d4 = static_cast<int>(L.d4);
#pragma unroll 2
        for (int c4 = sg; c4 < d4; c4 += kSG) {
          float4 a[4], k[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const float4*>(qa + (8 * i) * ds + 4 * c4);
#pragma unroll
          for (int j = 0; j < 4; ++j) k[j] = *reinterpret_cast<const float4*>(ka + (8 * j) * ds + 4 * c4);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) s[i][j] = dot4(a[i], k[j], s[i][j]);
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) scratch[(sg * kRows + sy + 8 * i) * kRedStride + sx + 8 * j] = s[i][j];
        }
      }
      __syncthreads();

      for (int r = warp; r < kRows; r += kThreads / 32) {  // online softmax, lane = key
        float s = 0.f;
#pragma unroll
        for (int g = 0; g < kSG; ++g) s += scratch[(g * kRows + r) * kRedStride + lane];
        bool vis = false;
        if (lane < nt && row_live(r)) {
          const int64_t pos = mla_prefill::query_pos(seqlen, p.S, i_begin + r % qb);
          vis = key_visible(p, seqlen, pos, t0 + lane);
        }
        ps[lane * kPS + r] = softmax_row_update(row_m, row_l, row_r, r, vis ? s : -INFINITY, lane);
      }
      __syncthreads();

      {  // o_lat = o_lat * rescale + P . c_kv (keys past nt have P = 0 and zero rows)
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float rs = row_r[8 * oy + i];
#pragma unroll
          for (int j = 0; j < 8; ++j) o[i][j] *= rs;
        }
        const float* pp = ps + 8 * oy;
#pragma unroll 4
        for (int t = 0; t < kKeys; ++t) {
          const float4 p0 = *reinterpret_cast<const float4*>(pp + t * kPS);
          const float4 p1 = *reinterpret_cast<const float4*>(pp + t * kPS + 4);
          const float4 v0 = *reinterpret_cast<const float4*>(ks + t * ds + col0);
          const float4 v1 = *reinterpret_cast<const float4*>(ks + t * ds + col1);
          const float pr[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            o[i][0] = fmaf(pr[i], v0.x, o[i][0]);
            o[i][1] = fmaf(pr[i], v0.y, o[i][1]);
            o[i][2] = fmaf(pr[i], v0.z, o[i][2]);
            o[i][3] = fmaf(pr[i], v0.w, o[i][3]);
            o[i][4] = fmaf(pr[i], v1.x, o[i][4]);
            o[i][5] = fmaf(pr[i], v1.y, o[i][5]);
            o[i][6] = fmaf(pr[i], v1.z, o[i][6]);
            o[i][7] = fmaf(pr[i], v1.w, o[i][7]);
          }
        }
      }
    }

    // ---- 3. this pass's columns of out = (o_lat / l) . W_UV^T ----
    __syncthreads();  // every reader of ks is done; row_l is final
    float* ob = ks;   // [kRows][ds], pass-local columns
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = 8 * oy + i;
      const float l = row_l[r];
      const float inv = math::softmax_inv_sum(l);
      if (ok0) {
        *reinterpret_cast<float4*>(ob + r * ds + 4 * ox) =
            make_float4(o[i][0] * inv, o[i][1] * inv, o[i][2] * inv, o[i][3] * inv);
      }
      if (ok1) {
        *reinterpret_cast<float4*>(ob + r * ds + 4 * (ox + 64)) =
            make_float4(o[i][4] * inv, o[i][5] * inv, o[i][6] * inv, o[i][7] * inv);
      }
    }
    __syncthreads();
    const int64_t cbase = 4 * cb4;
    const int cw = static_cast<int>(min(static_cast<int64_t>(4 * kPassChunks), p.C - cbase));
    const int n_qc = (qb + 7) / 8, dv = static_cast<int>(p.Dv);
    const int n_tasks = nh * dv * n_qc;
    for (int task = warp; task < n_tasks; task += kThreads / 32) {  // warp-uniform loop
      const int q0 = (task % n_qc) * 8;
      const int v = (task / n_qc) % dv;
      const int hh = task / (n_qc * dv);
      const T* w = w_uv + (h0 + hh) * p.wuv_sh + v * p.wuv_sd + cbase;
      const float* orow[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) orow[k] = ob + (hh * qb + min(q0 + k, qb - 1)) * ds;
      float acc[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] = 0.f;
      const int nk = min(8, qb - q0);  // rows of this task (warp-uniform)
#pragma unroll 4
      for (int c = lane; c < cw; c += 32) {
        const float wv = to_float(w[c]);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          if (k < nk) acc[k] = fmaf(orow[k][c], wv, acc[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (k < nk) acc[k] = warp_sum(acc[k]);
      }
      if (lane == 0) {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          if (q0 + k < qb) {
            float* dst = oacc + (hh * qb + q0 + k) * p.Dv + v;
            *dst = cb4 == 0 ? acc[k] : *dst + acc[k];
          }
        }
      }
    }
    // The next pass starts with a barrier before it touches ks, and the final write below too.
  }
  __syncthreads();
  for (int64_t idx = tid; idx < static_cast<int64_t>(nh) * qb * p.Dv; idx += kThreads) {
    const int r = static_cast<int>(idx / p.Dv);
    const int64_t v = idx - r * p.Dv;
    const int hh = r / qb, qi = r - hh * qb;
    if (qi >= nq) continue;
    const int64_t i = i_begin + qi;
    const float o = row_live(r) ? oacc[idx] : 0.f;
    out[((b * p.S + i) * p.H + h0 + hh) * p.Dv + v] = from_float<T>(o);
  }
  if (tid < kRows) {
    const int r = tid;
    const int hh = r / qb, qi = r - hh * qb;
    if (hh < nh && qi < nq) {
      const math::SoftmaxState st{row_m[r], row_l[r]};
      lse[(b * p.S + i_begin + qi) * p.H + h0 + hh] = row_live(r) ? math::softmax_lse(st) : -INFINITY;
    }
  }
}

// Query row r of the tile sees key t0 + t (t < nt)?
__device__ __forceinline__ bool visible(const Params& p, const Tile& tl, int64_t r, int64_t t0, int64_t t,
                                        int64_t nt) {
  const int64_t i = tl.i_begin + r;
  return i >= tl.i_lo && i < tl.i_end && t < nt &&
         key_visible(p, tl.seqlen, mla_prefill::query_pos(tl.seqlen, p.S, i), t0 + t);
}

// ---- forward, fallback: per-head decompression ---------------------------------------------------
// Used only when the absorbed kernel's tiles (2 x 32 latent rows of C + R floats) do not fit in
// shared memory (C + R beyond ~750 on sm_90); its shared memory does not grow with C. One block per
// (batch row, head, tile of 16-64 queries); each key tile is decompressed into per-head K_nope / V
// in shared memory (c_kv and weight chunks of kCChunk columns staged) and an online softmax runs.

__host__ __device__ inline int64_t fwd_floats(const Params& p, int64_t QT) {
  const int64_t DK = p.Dn + p.R;
  return QT * DK + kKTile * DK + kKTile * p.Dv + stage_floats(p) + QT * kKTile + QT * p.Dv +
         3 * QT;
}

// QT queries per block (16, 32 or 64): larger tiles decompress each key tile for more queries.
template <typename T, int QT>
__global__ void __launch_bounds__(kThreads)
mla_prefill_fwd_decompress_kernel(Params p, const T* __restrict__ q_nope, const T* __restrict__ q_pe,
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
      ss[r * kKTile + lane] = softmax_row_update(row_m, row_l, row_r, r, ss[r * kKTile + lane], lane);
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
    const float o = (i >= tl.i_lo && !(l <= 0.f)) ? acc[idx] / l : 0.f;  // NaN sums stay NaN
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

// ---- host launchers ----
// Lets `kernel` take the device's whole opt-in shared memory. The same value on every call: a
// per-call size would let a call on another host thread shrink the limit between this call's
// setting and its launch (the binding checked that this call's size fits).
template <typename K>
cudaError_t allow_optin_smem(K* kernel) {
  int dev = 0, optin = 0;
  cudaFuncAttributes attr{};
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              optin - static_cast<int>(attr.sharedSizeBytes));
}

template <typename T>
cudaError_t forward_absorbed(const Params& p, const void* q_nope, const void* q_pe, const void* cache,
                          const int32_t* block_table, const int32_t* seqlens, const void* w_uk, const void* w_uv,
                          void* out, float* lse, cudaStream_t stream) {
  FwdLayout L = fwd_layout(p, 0);
  if (L.blocks == 0) return cudaSuccess;
  if (L.blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  L.vec = reinterpret_cast<uintptr_t>(cache) % (4 * sizeof(T)) == 0 && p.kv_sb % 4 == 0 && p.kv_sl % 4 == 0;
  const size_t smem = static_cast<size_t>(L.floats) * sizeof(float);
  cudaError_t err = allow_optin_smem(mla_prefill_fwd_kernel<T>);
  if (err != cudaSuccess) return err;
  mla_prefill_fwd_kernel<T><<<static_cast<unsigned>(L.blocks), kThreads, smem, stream>>>(
      p, L, static_cast<const T*>(q_nope), static_cast<const T*>(q_pe), static_cast<const T*>(cache), block_table,
      seqlens, static_cast<const T*>(w_uk), static_cast<const T*>(w_uv), static_cast<T*>(out), lse);
  return cudaGetLastError();
}

template <typename T, int QT>
cudaError_t forward_tiled(const Params& p, const void* q_nope, const void* q_pe, const void* cache,
                          const int32_t* block_table, const int32_t* seqlens, const void* w_uk, const void* w_uv,
                          void* out, float* lse, cudaStream_t stream) {
  const int64_t blocks = p.B * p.H * n_query_tiles(p, QT);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>(fwd_floats(p, QT)) * sizeof(float);
  cudaError_t err = allow_optin_smem(mla_prefill_fwd_decompress_kernel<T, QT>);
  if (err != cudaSuccess) return err;
  mla_prefill_fwd_decompress_kernel<T, QT><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      p, static_cast<const T*>(q_nope), static_cast<const T*>(q_pe), static_cast<const T*>(cache), block_table,
      seqlens, static_cast<const T*>(w_uk), static_cast<const T*>(w_uv), static_cast<T*>(out), lse);
  return cudaGetLastError();
}

// The largest query tile whose shared memory fits the device (the binding checked that 16 fits).
// The absorbed kernel when its shared memory fits the device, else the decompressing fallback with
// the largest query tile that fits (the binding checked that the smaller of the two fits).
template <typename T>
cudaError_t forward_typed(const Params& p, const void* q_nope, const void* q_pe, const void* cache,
                          const int32_t* block_table, const int32_t* seqlens, const void* w_uk, const void* w_uv,
                          void* out, float* lse, cudaStream_t stream) {
  int dev = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (fwd_layout(p, 0).floats * static_cast<int64_t>(sizeof(float)) <= limit) {
    return forward_absorbed<T>(p, q_nope, q_pe, cache, block_table, seqlens, w_uk, w_uv, out, lse, stream);
  }
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
  cudaError_t err = allow_optin_smem(mla_prefill_bwd_dq_kernel<T>);
  if (err != cudaSuccess) return err;
  err = allow_optin_smem(mla_prefill_bwd_dkv_kernel<T>);
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

size_t mla_prefill_forward_smem_bytes(const Params& p) {  // the smaller of the two kernels' needs
  const int64_t absorbed = fwd_layout(p, 0).floats, fallback = fwd_floats(p, kQTile);
  return static_cast<size_t>(absorbed < fallback ? absorbed : fallback) * sizeof(float);
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
