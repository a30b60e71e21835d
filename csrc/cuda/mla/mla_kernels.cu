// MLA CUDA kernels: split-KV absorbed decode on the latent cache + LSE merge, and the fused
// cache append. Math shared with the CPU kernels lives in common/mla_math.h and common/math.h.
//
// Decode: grid (n_splits, row groups, B). A block owns ROWS query rows (row = (s, h); 16 rows and
// 512 threads when C <= 512, else 8 rows and 256 threads) of one batch row and one contiguous
// split of the keys, so all of its heads share every cache row it reads (read once from memory
// per block). Per tile of kTile = 32 keys:
//   load    warp w copies keys w, w + warps, ... (the page lookup once per key). When rows are 16-byte
//           aligned (the V3 layout in every dtype) the raw rows come in by asynchronous 16-byte
//           copies into a staging buffer, issued one tile ahead (tile i+1 is in flight during tile
//           i's math), and are then transposed to fp32 kt[c][key]; otherwise lanes load them
//           directly into kt.
//   scores  split over D: warp w sums its share (1 / warps) of the D = C + R dims for all ROWS x 32
//           scores, each lane a 4-row x KPL-key register block fed by 16-byte reads of the
//           transposed queries qt[c][row] and keys kt[c][key] (8 FMAs per shared-memory load
//           instead of ~3); the warps' partial sums of each score are added in a fixed order.
//   softmax the running max / sum of each row live in one warp (lane = key; shuffles).
//   PV      thread owns columns tid + threads * j (j < CPT) for all ROWS rows (ROWS*CPT registers),
//           reading 4 keys of a column at once from kt.
// FLOPs per key and row: D (scores) + C (PV) multiply-adds; bytes per key: D cache values, read
// once per block. Partials (m, l, unnormalised accumulators) go to a workspace; the merge kernel
// (grid (B * rows, column chunks)) combines them by LSE in split order (deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>

#include "common/math.h"
#include "common/mla_math.h"
#include "cuda/common/cuda_utils.cuh"
#include "cuda/common/mma.cuh"
#include "cuda/mla/mla_launch.h"

#include <atomic>
#include <cstdint>
#include <type_traits>

namespace latentmoe::cuda {
namespace {

constexpr int kTile = 32;   // keys per tile == lanes per warp
constexpr int kMaxCpt = 8;  // accumulator columns per thread of the 8-row blocks: C <= 256 * kMaxCpt
constexpr int64_t kMinSplitKeys = 32;  // one tile: short caches still spread over many SMs
constexpr int64_t kMaxSplits = 1024;  // the merge keeps one weight per split in shared memory
constexpr int kMergeCols = 32;        // merge: output columns per block
constexpr int kMergeGroups = 8;       // merge: thread groups splitting the splits
constexpr int kMergeThreads = kMergeCols * kMergeGroups;
constexpr int kMergeBatch = 8;        // merge: loads in flight per thread

__host__ __device__ inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
__host__ __device__ inline int rows_per_block(int64_t C) { return C <= 512 ? 16 : 8; }
// Threads of a split block: 512 (16 warps) when it holds 16 query rows (C <= 512: one output
// column per thread, and twice the warps per SM to hide latency at one block per SM), else 256.
__host__ __device__ constexpr int threads_for_rows(int rows) { return rows == 16 ? 512 : 256; }
// Transposed tiles have SLT = round_up(D, 4 * NW) rows (NW warp slices of SLT / NW, a multiple of
// 4), zero past D. Key rows of kt hold the 32 keys plus 4 pad floats: 16-byte rows, and 8 lanes
// reading 16 bytes at 8 consecutive rows hit 32 distinct banks.
constexpr int kKt = kTile + 4;
__host__ __device__ inline int64_t slices_len(int64_t D, int NW) { return round_up(D, 4 * NW); }
// Staged raw rows: stride DS elements, 16-byte multiple, with DS*elt/4 = 4 (mod 32) words so 8
// lanes reading 16 bytes of 8 consecutive rows hit distinct banks.
__host__ __device__ inline int64_t stage_stride(int64_t D, int64_t elt) {
  int64_t ds = round_up(D, 16 / elt);
  while ((ds * elt / 4) % 32 != 4) ds += 16 / elt;
  return ds;
}

template <int ROWS>
__host__ __device__ inline size_t split_smem_floats(int64_t D) {
  constexpr int NW = threads_for_rows(ROWS) / 32;
  const int64_t SLT = slices_len(D, NW);
  // qt, kt, partial scores, probabilities, alpha (padded to 16 bytes), then 2 x ROWS int64 ranges.
  return static_cast<size_t>(SLT * ROWS + SLT * kKt + NW * ROWS * kTile + kTile * ROWS + round_up(ROWS, 4) +
                             4 * ROWS);
}
// Staging buffer of one tile of raw cache rows (bytes, a multiple of 16), placed before the floats.
__host__ __device__ inline size_t stage_bytes(int64_t D, size_t elt) {
  const int64_t e = static_cast<int64_t>(elt);
  return static_cast<size_t>(round_up(kTile * stage_stride(D, e) * e, 16));
}

// Cached tokens of batch row b: host-checked, or (unchecked calls) cut to what the splits cover,
// never past the cache.
__device__ inline int64_t row_seqlen(const MlaDecodeArgs& a, int64_t b) {
  const int64_t seqlen = a.seqlens[b];
  const int64_t cap = a.capacity < a.max_seqlen ? a.capacity : a.max_seqlen;
  return seqlen < 0 ? 0 : (seqlen > cap ? cap : seqlen);
}

// Visible keys of the block's query rows r0 .. r0 + nrows - 1: thread i < rows_cap writes row i's
// range into lo_s / hi_s (empty past nrows). The caller puts a barrier before reading them.
__device__ inline void store_row_ranges(const MlaDecodeArgs& a, int64_t seqlen, int64_t r0, int nrows, int rows_cap,
                                        int64_t* lo_s, int64_t* hi_s) {
  const int tid = threadIdx.x;
  if (tid < rows_cap) {
    mla::KeyRange kr{0, 0};
    if (tid < nrows) kr = mla::visible_keys(seqlen, a.Sq, (r0 + tid) / a.H, a.causal, a.window);
    lo_s[tid] = kr.lo;
    hi_s[tid] = kr.hi;
  }
}

// Keys [lo, hi) split `sp` reads: the union of the rows' visible ranges, cut to the split's slice.
// Splits tile [0, max_seqlen): sized by the longest row, not the capacity, so a large cache
// holding short rows launches no idle blocks. Keys past a row's seqlen are never read.
__device__ inline mla::KeyRange split_keys(const MlaDecodeArgs& a, int64_t seqlen, int nrows, const int64_t* lo_s,
                                           const int64_t* hi_s, int64_t sp) {
  int64_t lo_all = seqlen, hi_all = 0;
  for (int r = 0; r < nrows; ++r) {
    if (hi_s[r] > lo_s[r]) {
      lo_all = min(lo_all, lo_s[r]);
      hi_all = max(hi_all, hi_s[r]);
    }
  }
  const int64_t split_len = a.max_seqlen > 0 ? (a.max_seqlen + a.n_splits - 1) / a.n_splits : 1;
  return {max(lo_all, sp * split_len), min(hi_all, (sp + 1) * split_len)};
}

template <typename T, int ROWS, int CPT>
__global__ void __launch_bounds__(threads_for_rows(ROWS)) mla_decode_split_kernel(MlaDecodeArgs a) {
  constexpr int NT = threads_for_rows(ROWS), kWarps = NT / 32;
  constexpr int RPT = ROWS / kWarps;  // softmax rows per warp
  constexpr int RB = ROWS / 4;        // score row blocks of 4 rows
  constexpr int KPL = kTile / (32 / RB);  // keys per lane in the score block: 4 (16 rows) or 2 (8)
  static_assert(ROWS % kWarps == 0 && ROWS % 4 == 0 && (KPL == 2 || KPL == 4), "block shape");
  extern __shared__ float smem[];
  const int64_t C = a.C, R = a.R, D = C + R, SLT = slices_len(D, kWarps), SL = SLT / kWarps;
  const int64_t elt = static_cast<int64_t>(sizeof(T)), DS = stage_stride(D, elt);
  T* stage = reinterpret_cast<T*>(smem);  // [kTile, DS] raw rows (async path only)
  float* qt = smem + (a.stage_async ? stage_bytes(D, sizeof(T)) / sizeof(float) : 0);  // [SLT, ROWS]
  float* kt = qt + SLT * ROWS;              // [SLT, kKt] keys, transposed
  float* part = kt + SLT * kKt;             // [kWarps, ROWS, kTile] partial scores
  float* ps = part + kWarps * ROWS * kTile;  // [kTile, ROWS] probabilities
  float* alpha_s = ps + kTile * ROWS;       // [ROWS]
  // Visible key range of each row (no static shared memory: the launcher opts this kernel in to
  // the device's whole shared-memory budget).
  int64_t* lo_s = reinterpret_cast<int64_t*>(alpha_s + round_up(ROWS, 4));  // [ROWS]
  int64_t* hi_s = lo_s + ROWS;                                              // [ROWS]

  const T* q_latent = static_cast<const T*>(a.q_latent);
  const T* q_pe = static_cast<const T*>(a.q_pe);
  const T* cache = static_cast<const T*>(a.kv_cache);
  const T* pe_src = static_cast<const T*>(a.pe_src);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t b = blockIdx.z, sp = blockIdx.x;
  const int64_t rows = a.Sq * a.H;
  // Row blocks run last first: with many query tokens (mla_prefill's absorbed path) later tokens
  // see more keys, and starting the longest blocks first balances the SMs (longest first).
  const int64_t r0 = static_cast<int64_t>(gridDim.y - 1 - blockIdx.y) * ROWS;
  const int nrows = static_cast<int>(rows - r0 < ROWS ? rows - r0 : ROWS);
  const int64_t seqlen = row_seqlen(a, b);

  // Queries, transposed and scaled: thread i writes qt[c][i % ROWS] (consecutive threads,
  // consecutive words); rows past nrows and columns past D are 0.
  for (int64_t i = tid; i < SLT * ROWS; i += NT) {
    const int r = static_cast<int>(i % ROWS);
    const int64_t c = i / ROWS;
    float v = 0.f;
    if (r < nrows && c < D) {
      const int64_t off = b * rows + r0 + r;
      v = c < C ? to_float(q_latent[off * C + c]) : to_float(q_pe[off * R + (c - C)]);
    }
    qt[i] = v * a.scale;
  }
  store_row_ranges(a, seqlen, r0, nrows, ROWS, lo_s, hi_s);
  __syncthreads();
  const mla::KeyRange keys = split_keys(a, seqlen, nrows, lo_s, hi_s, sp);
  const int64_t k_begin = keys.lo, k_end = keys.hi;

  float m_run[RPT], l_run[RPT];  // state of rows warp*RPT + i, replicated in the warp's lanes
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    m_run[i] = -INFINITY;
    l_run[i] = 0.f;
  }
  float acc[ROWS][CPT];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int j = 0; j < CPT; ++j) acc[r][j] = 0.f;

  // Async path: issue the 16-byte copies of tile [t1, t1 + kTile) into the staging buffer.
  const int kv_chunks = static_cast<int>(C * elt / 16);
  const int pe_chunks = static_cast<int>(R * elt / 16);
  auto issue_tile = [&](int64_t t1) {
    for (int k = warp; k < kTile; k += kWarps) {
      const int64_t t = t1 + k;
      if (t < k_end) {
        const int64_t row = mla::cache_row(a.block_table, a.max_pages, a.page_size, a.lmax, a.num_pages, b, t);
        const char* kv = reinterpret_cast<const char*>(cache + row * a.kv_stride);
        const char* pe = reinterpret_cast<const char*>(pe_src + row * a.pe_stride);
        char* dst = reinterpret_cast<char*>(stage + k * DS);
        for (int ch = lane; ch < kv_chunks; ch += 32) __pipeline_memcpy_async(dst + ch * 16, kv + ch * 16, 16);
        for (int ch = lane; ch < pe_chunks; ch += 32)
          __pipeline_memcpy_async(dst + C * elt + ch * 16, pe + ch * 16, 16);
      }
    }
    __pipeline_commit();
  };
  if (a.stage_async && k_begin < k_end) issue_tile(k_begin);

  // Score block of this lane: rows rb*4 .. rb*4+3, keys kb*KPL .. kb*KPL+KPL-1, over the
  // dimensions [warp*SL, warp*SL + SL).
  const int rb = lane / (32 / RB), kb = lane % (32 / RB);
  for (int64_t t0 = k_begin; t0 < k_end; t0 += kTile) {
    const int kn = static_cast<int>(k_end - t0 < kTile ? k_end - t0 : kTile);
    if (a.stage_async) {
      constexpr int V = 16 / sizeof(T);  // elements per 16-byte read
      __pipeline_wait_prior(0);
      __syncthreads();  // every thread's copies of this tile landed; the previous tile is consumed
      // Transpose: lane = key, warp w takes columns w*V, w*V + 8V, ...; D is a multiple of V here.
      const int k = lane;
      for (int64_t c = static_cast<int64_t>(warp) * V; c < SLT; c += kWarps * V) {
        float v[V];
        if (k < kn && c < D) {
          // One 16-byte shared-memory read (8 lanes of a phase: distinct banks, see stage_stride).
          const uint4 raw = *reinterpret_cast<const uint4*>(stage + k * DS + c);
          T e[V];
          memcpy(e, &raw, sizeof raw);
#pragma unroll
          for (int i = 0; i < V; ++i) v[i] = to_float(e[i]);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) v[i] = 0.f;  // finite: p = 0 multiplies it
        }
#pragma unroll
        for (int i = 0; i < V; ++i) kt[(c + i) * kKt + k] = v[i];  // SLT is a multiple of V
      }
      __syncthreads();  // kt ready, the staging buffer free again
      if (t0 + kTile < k_end) issue_tile(t0 + kTile);  // in flight during this tile's math
    } else {
      __syncthreads();  // previous tile fully consumed
      for (int k = warp; k < kTile; k += kWarps) {
        const int64_t t = t0 + k;
        if (k < kn) {
          const int64_t row = mla::cache_row(a.block_table, a.max_pages, a.page_size, a.lmax, a.num_pages, b, t);
          const T* kv = cache + row * a.kv_stride;
          const T* pe = pe_src + row * a.pe_stride;
          for (int64_t c = lane; c < C; c += 32) kt[c * kKt + k] = to_float(kv[c]);
          for (int64_t c = lane; c < R; c += 32) kt[(C + c) * kKt + k] = to_float(pe[c]);
          for (int64_t c = D + lane; c < SLT; c += 32) kt[c * kKt + k] = 0.f;
        } else {
          for (int64_t c = lane; c < SLT; c += 32) kt[c * kKt + k] = 0.f;  // finite: p = 0 multiplies it
        }
      }
      __syncthreads();
    }
    // Scores, split over D: this warp's slice for the lane's 4 x KPL block.
    {
      float sc[4][KPL];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < KPL; ++j) sc[i][j] = 0.f;
      const float* q = qt + rb * 4;
      const float* kk = kt + kb * KPL;
#pragma unroll 2
      for (int64_t c = warp * SL; c < warp * SL + SL; ++c) {
        const float4 qv = *reinterpret_cast<const float4*>(q + c * ROWS);
        float kv[KPL];
        if constexpr (KPL == 4) {
          const float4 t = *reinterpret_cast<const float4*>(kk + c * kKt);
          kv[0] = t.x; kv[1] = t.y; kv[2] = t.z; kv[3] = t.w;
        } else {
          const float2 t = *reinterpret_cast<const float2*>(kk + c * kKt);
          kv[0] = t.x; kv[1] = t.y;
        }
        const float qr[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < KPL; ++j) sc[i][j] = fmaf(qr[i], kv[j], sc[i][j]);
      }
      float* pw = part + warp * ROWS * kTile;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float* dst = pw + (rb * 4 + i) * kTile + kb * KPL;
        if constexpr (KPL == 4) {
          *reinterpret_cast<float4*>(dst) = make_float4(sc[i][0], sc[i][1], sc[i][2], sc[i][3]);
        } else {
          *reinterpret_cast<float2*>(dst) = make_float2(sc[i][0], sc[i][1]);
        }
      }
    }
    __syncthreads();
    // Softmax: warp = RPT rows, lane = key; the slices' partial scores added in slice order.
    const int64_t t = t0 + lane;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int r = warp * RPT + i;
      float dot = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) dot += part[(w * ROWS + r) * kTile + lane];
      const bool ok = r < nrows && t < k_end && t >= lo_s[r] && t < hi_s[r];
      const float sv = ok ? dot : -INFINITY;
      const float m_new = fmaxf(m_run[i], warp_max(sv));
      const float p = sv == -INFINITY ? 0.f : math::fast_exp(sv - m_new);
      const float alpha = math::softmax_rescale(m_run[i], m_new);
      l_run[i] = l_run[i] * alpha + warp_sum(p);
      m_run[i] = m_new;
      ps[lane * ROWS + r] = p;
      if (lane == 0) alpha_s[r] = alpha;
    }
    __syncthreads();
    // Weighted sum over the tile's keys, 4 at a time (keys past kn have p = 0 and kt = 0).
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float al = alpha_s[r];
#pragma unroll
      for (int j = 0; j < CPT; ++j) acc[r][j] *= al;
    }
    for (int k0 = 0; k0 < kn; k0 += 4) {
      float v[CPT][4];
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int64_t c = tid + static_cast<int64_t>(j) * NT;
        float4 t4 = make_float4(0.f, 0.f, 0.f, 0.f);
        if (c < C) t4 = *reinterpret_cast<const float4*>(kt + c * kKt + k0);
        v[j][0] = t4.x; v[j][1] = t4.y; v[j][2] = t4.z; v[j][3] = t4.w;
      }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const float* pk = ps + (k0 + kk) * ROWS;
#pragma unroll
        for (int r4 = 0; r4 < ROWS; r4 += 4) {
          const float4 p4 = *reinterpret_cast<const float4*>(pk + r4);
          const float pr[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < CPT; ++j) acc[r4 + i][j] = fmaf(pr[i], v[j][kk], acc[r4 + i][j]);
        }
      }
    }
  }
  if (a.n_splits == 1) {
    // One split holds every key: normalise and write out / lse here (no merge launch, no
    // workspace), as the merge would: a row with no visible key gives 0 and -inf.
    float* inv_s = alpha_s;  // free after the last tile's weighted sum (barrier below)
    __syncthreads();
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int r = warp * RPT + i;
        inv_s[r] = math::softmax_inv_sum(l_run[i]);
        if (r < nrows) a.lse[b * rows + r0 + r] = math::softmax_lse({m_run[i], l_run[i]});
      }
    }
    __syncthreads();
    T* out = static_cast<T*>(a.out);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r >= nrows) break;
      const float inv = inv_s[r];
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int64_t c = tid + static_cast<int64_t>(j) * NT;
        if (c < C) out[(b * rows + r0 + r) * C + c] = from_float<T>(acc[r][j] * inv);
      }
    }
    return;
  }
  const int64_t pbase = (b * a.n_splits + sp) * rows + r0;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int r = warp * RPT + i;
      if (r < nrows) {
        a.part_m[pbase + r] = m_run[i];
        a.part_l[pbase + r] = l_run[i];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r >= nrows) break;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int64_t c = tid + static_cast<int64_t>(j) * NT;
      if (c < C) a.part_acc[(pbase + r) * C + c] = acc[r][j];
    }
  }
}

// ---- tensor-core split kernel (bf16 / fp16) ------------------------------------------------------
// Grid (n_splits, row blocks, B) as above; a block owns RB = 16 * MT query rows (MT m-tiles of 16
// rows, MT = 1..4) and runs 8 warps. Per tile of kMmaKeys = 32 keys:
//   load    raw cache rows by 16-byte cp.async into one of kMmaStages buffers, issued
//           kMmaStages - 1 tiles ahead (warp w copies keys w, w + 8, ..; the page lookup once per
//           key); keys past the split are zero-filled (finite: p = 0 multiplies them).
//   scores  S = Q K^T with mma.m16n8k16 (mma.cuh): the RB x 32 score tile is MT x 4 m16n8 tiles;
//           a warp takes one m-tile, two n-tiles (sharing each A fragment) and, for MT <= 2, one
//           of KP = 4 / MT parts of D (all 8 warps busy, shorter mma chains); Q (16-bit,
//           unscaled) stays in shared memory; the KP partial sums go to shared memory in fp32.
//   softmax 4 threads per row (8 keys each, two xor shuffles): the k-parts added in order and
//           scaled, running max / sum in fp32, p rounded
//           to the 16-bit type into P, the rescale factor of each row into alpha.
//   PV      O = diag(alpha) O + P V, V = the first C columns of the same buffer: warp w owns the
//           output columns of n-tiles w, w + 8, .. (64 columns of C = 512) for all MT m-tiles, in
//           mma accumulators (MT x 8 x 4 fp32 registers per thread).
// Shared-memory rows of Q and of the key buffers are DP = round_up(D, 16) values plus 8 pad
// values: SW = DP / 2 + 4 32-bit words, 4 (mod 8), so the 8 rows x 4 words of a fragment load hit
// 32 distinct banks. The partials and the single-split epilogue are those of the CUDA-core kernel.
constexpr int kMmaThreads = 256, kMmaWarps = 8;
constexpr int kMmaKeys = 32;            // keys per tile
constexpr int kMmaStages = 3;           // key buffers in flight
constexpr int kMmaNtPerWarp = 8;        // output n-tiles (8 columns) per warp: C <= 8 * 8 * 8
constexpr int64_t kMmaMaxC = 8 * kMmaWarps * kMmaNtPerWarp;
constexpr int kMmaSld = kMmaKeys + 4;   // fp32 score row stride (floats)
constexpr int kMmaPld = kMmaKeys + 8;   // 16-bit probability row stride (elements): 20 words
static_assert(kMmaKeys % 16 == 0 && kMmaThreads == 4 * 64, "4 softmax threads per row of up to 64");

// Score work units: (m-tile, pair of n-tiles, k-part), at most one per warp. With few m-tiles the
// D dimension is split into KP parts so all 8 warps work and each mma chain is shorter.
__host__ __device__ constexpr int mma_kparts(int mt) { return mt == 1 ? 4 : (mt == 2 ? 2 : 1); }
template <int MT>
constexpr int kMmaUnits = MT * 2 * mma_kparts(MT);
static_assert(kMmaUnits<1> == 8 && kMmaUnits<2> == 8 && kMmaUnits<3> == 6 && kMmaUnits<4> == 8, "units");

__host__ __device__ inline int64_t mma_row_words(int64_t D) { return round_up(D, 16) / 2 + 4; }
__host__ __device__ inline size_t mma_smem_bytes(int64_t D, int mt) {
  const int64_t sw = mma_row_words(D), rb = 16 * mt;
  return static_cast<size_t>(4 * (kMmaStages * kMmaKeys * sw + rb * sw + mma_kparts(mt) * rb * kMmaSld) +
                             2 * rb * kMmaPld + 4 * 3 * rb + 8 * 2 * rb);
}

template <typename T, int MT>
__global__ void __launch_bounds__(kMmaThreads) mla_decode_mma_kernel(MlaDecodeArgs a) {
  constexpr int RB = 16 * MT;
  static_assert(MT >= 1 && MT <= 4, "1..4 m-tiles");
  extern __shared__ float smem[];
  const int64_t C = a.C, R = a.R, D = C + R, DP = round_up(D, 16), SW = mma_row_words(D);
  uint32_t* stage_w = reinterpret_cast<uint32_t*>(smem);  // [kMmaStages][kMmaKeys][SW]
  uint32_t* q_w = stage_w + kMmaStages * kMmaKeys * SW;    // [RB][SW]
  float* s_s = reinterpret_cast<float*>(q_w + RB * SW);    // [KP][RB][kMmaSld] partial scores
  T* p_s = reinterpret_cast<T*>(s_s + mma_kparts(MT) * RB * kMmaSld);  // [RB][kMmaPld]
  float* alpha_s = reinterpret_cast<float*>(p_s + RB * kMmaPld);  // [RB]
  float* m_s = alpha_s + RB;                                       // [RB] final state
  float* l_s = m_s + RB;                                           // [RB]
  int64_t* lo_s = reinterpret_cast<int64_t*>(l_s + RB);            // [RB] visible keys
  int64_t* hi_s = lo_s + RB;                                       // [RB]

  const T* q_latent = static_cast<const T*>(a.q_latent);
  const T* q_pe = static_cast<const T*>(a.q_pe);
  const T* cache = static_cast<const T*>(a.kv_cache);
  const T* pe_src = static_cast<const T*>(a.pe_src);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t b = blockIdx.z, sp = blockIdx.x;
  const int64_t rows = a.Sq * a.H;
  // Row blocks run last first: with many query tokens (mla_prefill's absorbed path) later tokens
  // see more keys, and starting the longest blocks first balances the SMs (longest first).
  const int64_t r0 = static_cast<int64_t>(gridDim.y - 1 - blockIdx.y) * RB;
  const int nrows = static_cast<int>(rows - r0 < RB ? rows - r0 : RB);
  const int64_t seqlen = row_seqlen(a, b);

  // Queries in 16-byte async copies (C and R are multiples of 8, so a chunk lies in q_latent or
  // q_pe); rows past nrows and columns past D are 0. The pad columns [D, DP) of the key buffers are
  // zeroed once: the copies never write them.
  // The copies join the first tile's commit group (waited for before the first scores).
  const int cpr = static_cast<int>(DP / 8);  // chunks per row
  for (int i = tid; i < RB * cpr; i += kMmaThreads) {
    const int r = i / cpr;
    const int64_t col = static_cast<int64_t>(i % cpr) * 8;
    void* dst = q_w + r * SW + col / 2;
    const int64_t off = b * rows + r0 + r;
    if (r < nrows && col < C) {
      __pipeline_memcpy_async(dst, q_latent + off * C + col, 16);
    } else if (r < nrows && col < D) {
      __pipeline_memcpy_async(dst, q_pe + off * R + (col - C), 16);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  if (DP > D) {
    for (int i = tid; i < kMmaStages * kMmaKeys; i += kMmaThreads) {
      *reinterpret_cast<uint4*>(stage_w + i * SW + D / 2) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  store_row_ranges(a, seqlen, r0, nrows, RB, lo_s, hi_s);
  __syncthreads();
  const mla::KeyRange keys = split_keys(a, seqlen, nrows, lo_s, hi_s, sp);
  const int64_t k_begin = keys.lo, k_end = keys.hi;
  const int64_t n_tiles = k_begin < k_end ? (k_end - k_begin + kMmaKeys - 1) / kMmaKeys : 0;

  // Tile `it` into buffer it % kMmaStages, one commit group per tile (empty past the end).
  const int kv_chunks = static_cast<int>(C * 2 / 16), pe_chunks = static_cast<int>(R * 2 / 16);
  auto issue = [&](int64_t it) {
    if (it < n_tiles) {
      const int64_t t0 = k_begin + it * kMmaKeys;
      uint32_t* buf = stage_w + (it % kMmaStages) * kMmaKeys * SW;
      for (int k = warp; k < kMmaKeys; k += kMmaWarps) {
        const int64_t t = t0 + k;
        char* dst = reinterpret_cast<char*>(buf + k * SW);
        if (t < k_end) {
          const int64_t row = mla::cache_row(a.block_table, a.max_pages, a.page_size, a.lmax, a.num_pages, b, t);
          const char* kv = reinterpret_cast<const char*>(cache + row * a.kv_stride);
          const char* pe = reinterpret_cast<const char*>(pe_src + row * a.pe_stride);
          for (int ch = lane; ch < kv_chunks; ch += 32) __pipeline_memcpy_async(dst + ch * 16, kv + ch * 16, 16);
          for (int ch = lane; ch < pe_chunks; ch += 32)
            __pipeline_memcpy_async(dst + C * 2 + ch * 16, pe + ch * 16, 16);
        } else {
          for (int ch = lane; ch < kv_chunks + pe_chunks; ch += 32)
            *reinterpret_cast<uint4*>(dst + ch * 16) = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    __pipeline_commit();
  };
  for (int s = 0; s < kMmaStages - 1; ++s) issue(s);

  const int sr = tid >> 2, sq = tid & 3;  // softmax: row sr, keys sq * 8 .. sq * 8 + 7
  float m_run = -INFINITY, l_run = 0.f;
  float o[MT][kMmaNtPerWarp][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < kMmaNtPerWarp; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[mt][j][i] = 0.f;

  for (int64_t it = 0; it < n_tiles; ++it) {
    __pipeline_wait_prior(kMmaStages - 2);
    __syncthreads();  // tile `it` landed for every thread; the buffer issued next is consumed
    issue(it + kMmaStages - 1);
    const uint32_t* kw = stage_w + (it % kMmaStages) * kMmaKeys * SW;
    const int64_t t0 = k_begin + it * kMmaKeys;
    // Scores: work units (m-tile, pair of n-tiles, k-part), one per warp; a unit's A fragment
    // serves both n-tiles. The KP k-parts of a score are partial sums in KP buffers, added in
    // k-part order by the softmax (deterministic).
    if (warp < kMmaUnits<MT>) {
      constexpr int KP = mma_kparts(MT);
      const int kp = warp % KP, np = (warp / KP) % 2, mt = warp / (2 * KP);
      const int64_t nks = DP / 16, ks_lo = kp * nks / KP, ks_hi = (kp + 1) * nks / KP;
      // acc[e][h]: n-tile 2 np + h over the even (e = 0) or odd (e = 1) k-steps: four
      // independent mma chains, the two halves added at the end.
      float acc[2][2][4] = {};
      const uint32_t* qa = q_w + (mt * 16 + g) * SW + t4;
      const uint32_t* kb0 = kw + (np * 16 + g) * SW + t4;  // n-tile 2 np
      const uint32_t* kb1 = kb0 + 8 * SW;                  // n-tile 2 np + 1
      for (int64_t ks = ks_lo; ks < ks_hi; ks += 2) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (ks + e < ks_hi) {  // warp-uniform
            const int64_t k8 = (ks + e) * 8;
            const uint32_t af[4] = {qa[k8], qa[k8 + 8 * SW], qa[k8 + 4], qa[k8 + 8 * SW + 4]};
            const uint32_t b0[2] = {kb0[k8], kb0[k8 + 4]};
            const uint32_t b1[2] = {kb1[k8], kb1[k8 + 4]};
            mma_16816<T>(acc[e][0], af, b0);
            mma_16816<T>(acc[e][1], af, b1);
          }
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* srow = s_s + (kp * RB + mt * 16 + g) * kMmaSld + (2 * np + h) * 8 + 2 * t4;
        srow[0] = acc[0][h][0] + acc[1][h][0];
        srow[1] = acc[0][h][1] + acc[1][h][1];
        srow[8 * kMmaSld] = acc[0][h][2] + acc[1][h][2];
        srow[8 * kMmaSld + 1] = acc[0][h][3] + acc[1][h][3];
      }
    }
    __syncthreads();
    // Softmax (whole warps take part or skip: RB is a multiple of 8 rows).
    if (sr < RB) {
      float sv[8];
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t t = t0 + sq * 8 + j;
        const bool ok = sr < nrows && t < k_end && t >= lo_s[sr] && t < hi_s[sr];
        float dot = 0.f;
#pragma unroll
        for (int kp = 0; kp < mma_kparts(MT); ++kp) dot += s_s[(kp * RB + sr) * kMmaSld + sq * 8 + j];
        sv[j] = ok ? dot * a.scale : -INFINITY;
        mx = fmaxf(mx, sv[j]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run, mx);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float p = sv[j] == -INFINITY ? 0.f : math::fast_exp(sv[j] - m_new);
        sum += p;
        p_s[sr * kMmaPld + sq * 8 + j] = from_float<T>(p);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float alpha = math::softmax_rescale(m_run, m_new);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      if (sq == 0) alpha_s[sr] = alpha;
    }
    __syncthreads();
    // O = diag(alpha) O + P V.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const float a0 = alpha_s[mt * 16 + g], a1 = alpha_s[mt * 16 + g + 8];
#pragma unroll
      for (int j = 0; j < kMmaNtPerWarp; ++j) {
        o[mt][j][0] *= a0;
        o[mt][j][1] *= a0;
        o[mt][j][2] *= a1;
        o[mt][j][3] *= a1;
      }
    }
    const uint32_t* pw = reinterpret_cast<const uint32_t*>(p_s);
    const uint16_t* vh = reinterpret_cast<const uint16_t*>(kw);  // row stride 2 * SW values
#pragma unroll
    for (int ks = 0; ks < kMmaKeys / 16; ++ks) {
      uint32_t af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint32_t* pr = pw + (mt * 16 + g) * (kMmaPld / 2) + ks * 8 + t4;
        af[mt][0] = pr[0];
        af[mt][1] = pr[8 * (kMmaPld / 2)];
        af[mt][2] = pr[4];
        af[mt][3] = pr[8 * (kMmaPld / 2) + 4];
      }
      const uint16_t* v0 = vh + (ks * 16 + 2 * t4) * 2 * SW + g;
#pragma unroll
      for (int j = 0; j < kMmaNtPerWarp; ++j) {
        const int64_t c0 = static_cast<int64_t>(warp + kMmaWarps * j) * 8;
        if (c0 >= C) break;  // warp-uniform
        const uint16_t* v = v0 + c0;
        const uint32_t bf[2] = {static_cast<uint32_t>(v[0]) | (static_cast<uint32_t>(v[2 * SW]) << 16),
                                static_cast<uint32_t>(v[16 * SW]) | (static_cast<uint32_t>(v[18 * SW]) << 16)};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma_16816<T>(o[mt][j], af[mt], bf);
      }
    }
  }
  __pipeline_wait_prior(0);  // the empty groups issued past the last tile
  if (sr < RB && sq == 0) {
    m_s[sr] = m_run;
    l_s[sr] = l_run;
  }
  __syncthreads();
  const bool single = a.n_splits == 1;
  const int64_t pbase = (b * a.n_splits + sp) * rows + r0;
  if (tid < nrows) {
    if (single) {
      a.lse[b * rows + r0 + tid] = math::softmax_lse({m_s[tid], l_s[tid]});
    } else {
      a.part_m[pbase + tid] = m_s[tid];
      a.part_l[pbase + tid] = l_s[tid];
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = mt * 16 + g + 8 * h;
      if (r >= nrows) continue;
      const float inv = single ? math::softmax_inv_sum(l_s[r]) : 1.f;
#pragma unroll
      for (int j = 0; j < kMmaNtPerWarp; ++j) {
        const int64_t c = static_cast<int64_t>(warp + kMmaWarps * j) * 8 + 2 * t4;
        if (c >= C) break;
        const float v0 = o[mt][j][2 * h] * inv, v1 = o[mt][j][2 * h + 1] * inv;
        if (single) {
          T* out = static_cast<T*>(a.out) + (b * rows + r0 + r) * C + c;
          out[0] = from_float<T>(v0);
          out[1] = from_float<T>(v1);
        } else {
          float* dst = a.part_acc + (pbase + r) * C + c;
          dst[0] = v0;
          dst[1] = v1;
        }
      }
    }
  }
}

// Grid (B * rows, column chunks of kMergeCols): combine the splits of one row by LSE, normalise,
// write out (and lse, from the first chunk). The block's 8 groups of kMergeCols threads (one
// column each) take splits in turns of kMergeBatch consecutive ones, with the kMergeBatch loads of
// a turn issued together (the partials sit in L2: one turn costs about one L2 latency, where a
// single dependent chain over the splits cost one per split); the groups' sums are added in group
// order. Which splits a thread sums and in which order is fixed: deterministic.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) mla_decode_merge_kernel(MlaDecodeArgs a) {
  extern __shared__ float w_s[];  // [n_splits] merge weights / l_sum
  __shared__ float red_s[32];
  __shared__ float grp_s[(kMergeGroups - 1) * kMergeCols];
  const int64_t rows = a.Sq * a.H;
  const int64_t br = blockIdx.x, b = br / rows, r = br % rows;
  const int64_t n = a.n_splits;
  auto part = [&](int64_t sp) { return (b * n + sp) * rows + r; };
  float m_max = -INFINITY;
  for (int64_t sp = threadIdx.x; sp < n; sp += blockDim.x) {
    if (a.part_l[part(sp)] > 0.f) m_max = fmaxf(m_max, a.part_m[part(sp)]);
  }
  // Block max (fixed tree: deterministic), then the block sum of the weighted l.
  m_max = warp_max(m_max);
  if ((threadIdx.x & 31) == 0) red_s[threadIdx.x >> 5] = m_max;
  __syncthreads();
  m_max = -INFINITY;
  for (int w = 0; w < kMergeThreads / 32; ++w) m_max = fmaxf(m_max, red_s[w]);
  float l_part = 0.f;
  for (int64_t sp = threadIdx.x; sp < n; sp += blockDim.x) {
    const float wt = mla::merge_weight(a.part_m[part(sp)], a.part_l[part(sp)], m_max);
    w_s[sp] = wt;
    l_part += wt * a.part_l[part(sp)];
  }
  const float l_sum = block_sum(l_part, red_s);  // begins with a barrier: red_s reads above are done
  const float inv = math::softmax_inv_sum(l_sum);
  __syncthreads();  // w_s complete
  const int col = static_cast<int>(threadIdx.x) % kMergeCols, grp = static_cast<int>(threadIdx.x) / kMergeCols;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kMergeCols + col;
  float o = 0.f;
  if (c < a.C) {
    // Every split wrote finite partials (0 where it saw no key), so weight-0 splits add zeros.
    for (int64_t s0 = static_cast<int64_t>(grp) * kMergeBatch; s0 < n; s0 += kMergeGroups * kMergeBatch) {
      float v[kMergeBatch];
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i) v[i] = s0 + i < n ? a.part_acc[part(s0 + i) * a.C + c] : 0.f;
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i) {
        if (s0 + i < n) o = fmaf(w_s[s0 + i], v[i], o);
      }
    }
  }
  if (grp > 0) grp_s[(grp - 1) * kMergeCols + col] = o;
  __syncthreads();
  if (grp == 0 && c < a.C) {
#pragma unroll
    for (int k = 0; k < kMergeGroups - 1; ++k) o += grp_s[k * kMergeCols + col];
    static_cast<T*>(a.out)[br * a.C + c] = from_float<T>(o * inv);
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) a.lse[br] = math::softmax_lse({m_max, l_sum});
}

constexpr int kMaxDevices = 64;

// Compute capability major and opt-in shared memory of the current device, cached per device.
cudaError_t device_facts(int* major, int* optin) {
  static std::atomic<int> major_of[kMaxDevices], optin_of[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool known = device >= 0 && device < kMaxDevices;
  if (known && (*major = major_of[device].load(std::memory_order_acquire)) > 0) {
    *optin = optin_of[device].load(std::memory_order_acquire);
    return cudaSuccess;
  }
  if ((err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess) return err;
  if (known) {
    optin_of[device].store(*optin, std::memory_order_release);
    major_of[device].store(*major, std::memory_order_release);
  }
  return cudaSuccess;
}

// The dynamic shared memory `kernel` may use on the current device: the opt-in limit minus the
// kernel's static shared memory (the runtime refuses a larger limit). The first call per device
// raises the kernel's limit to it (that does not change the occupancy of launches that use less)
// and caches it in `cached` (one slot per device, owned by the caller's kernel instantiation: all
// instantiations share one function type), so later calls make no attribute queries.
template <typename K>
cudaError_t smem_budget(K* kernel, std::atomic<int>* cached, int* budget) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool known = device >= 0 && device < kMaxDevices;
  if (known && (*budget = cached[device].load(std::memory_order_acquire)) > 0) return cudaSuccess;
  int major = 0, optin = 0;
  if ((err = device_facts(&major, &optin)) != cudaSuccess) return err;
  cudaFuncAttributes attr{};
  if ((err = cudaFuncGetAttributes(&attr, kernel)) != cudaSuccess) return err;
  *budget = optin - static_cast<int>(attr.sharedSizeBytes);
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, *budget);
  if (err == cudaSuccess && known) cached[device].store(*budget, std::memory_order_release);
  return err;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t launch_merge(const MlaDecodeArgs& a, cudaStream_t stream) {
  const int64_t rows = a.Sq * a.H;
  dim3 mgrid(static_cast<unsigned>(a.B * rows), static_cast<unsigned>((a.C + kMergeCols - 1) / kMergeCols));
  mla_decode_merge_kernel<T><<<mgrid, kMergeThreads, sizeof(float) * a.n_splits, stream>>>(a);
  return cudaGetLastError();
}

// One split kernel's launch, then the merge (a single split writes out and lse itself).
template <typename T, typename K>
cudaError_t launch_split(K* kernel, int64_t block_rows, int threads, size_t smem, const MlaDecodeArgs& a,
                         cudaStream_t stream) {
  const int64_t rows = a.Sq * a.H;
  dim3 grid(static_cast<unsigned>(a.n_splits), static_cast<unsigned>((rows + block_rows - 1) / block_rows),
            static_cast<unsigned>(a.B));
  kernel<<<grid, threads, smem, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.n_splits == 1) return err;
  return launch_merge<T>(a, stream);
}

template <typename T, int ROWS, int CPT>
cudaError_t decode_typed_cpt(const MlaDecodeArgs& args, cudaStream_t stream) {
  MlaDecodeArgs a = args;
  int budget = 0;
  auto kernel = mla_decode_split_kernel<T, ROWS, CPT>;
  static std::atomic<int> budget_of[kMaxDevices];
  const cudaError_t err = smem_budget(kernel, budget_of, &budget);
  if (err != cudaSuccess) return err;
  const int64_t D = a.C + a.R;
  const size_t base = sizeof(float) * split_smem_floats<ROWS>(D);
  // Async 16-byte copies need every row segment (c_kv, k_pe) and row start 16-byte aligned, and
  // room for the staging buffer.
  const int64_t elt = static_cast<int64_t>(sizeof(T));
  a.stage_async = (a.C * elt) % 16 == 0 && (a.R * elt) % 16 == 0 && (a.kv_stride * elt) % 16 == 0 &&
                  (a.pe_stride * elt) % 16 == 0 && aligned16(a.kv_cache) && aligned16(a.pe_src) &&
                  base + stage_bytes(D, sizeof(T)) <= static_cast<size_t>(budget);
  const size_t smem = base + (a.stage_async ? stage_bytes(D, sizeof(T)) : 0);
  return launch_split<T>(kernel, ROWS, threads_for_rows(ROWS), smem, a, stream);
}

// Whether the tensor-core kernels run on the current device as mma.sync code: their PTX targets
// sm_80+ (a build for older archs, e.g. TORCH_CUDA_ARCH_LIST=7.5+PTX, compiles them to a trap,
// and a newer GPU would JIT that). Cached per device.
cudaError_t mma_compiled(bool* ok) {
  static std::atomic<int> state_of[kMaxDevices];  // 0 unknown, 1 no, 2 yes
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool known = device >= 0 && device < kMaxDevices;
  const int cached = known ? state_of[device].load(std::memory_order_acquire) : 0;
  if (cached != 0) {
    *ok = cached == 2;
    return cudaSuccess;
  }
  cudaFuncAttributes attr{};
  if ((err = cudaFuncGetAttributes(&attr, mla_decode_mma_kernel<__nv_bfloat16, 1>)) != cudaSuccess) return err;
  *ok = attr.ptxVersion >= 80;
  if (known) state_of[device].store(*ok ? 2 : 1, std::memory_order_release);
  return cudaSuccess;
}

// m-tiles of 16 query rows per tensor-core block: up to 4 (64 rows).
inline int mma_mtiles(int64_t rows) { return rows >= 64 ? 4 : static_cast<int>((rows + 15) / 16); }

cudaError_t tensor_cores_apply(DType dtype, const MlaDecodeArgs& a, bool* apply) {
  *apply = false;
  if (dtype == DType::kFloat32 || a.C < 8 || a.C > kMmaMaxC || a.C % 8 != 0 || a.R % 8 != 0 ||
      a.kv_stride % 8 != 0 || a.pe_stride % 8 != 0 || !aligned16(a.q_latent) || !aligned16(a.q_pe) ||
      !aligned16(a.kv_cache) || !aligned16(a.pe_src)) {
    return cudaSuccess;
  }
  int major = 0, optin = 0;
  cudaError_t err = device_facts(&major, &optin);
  if (err != cudaSuccess) return err;
  bool compiled = false;  // the tensor-core kernels were built for sm_80+ (else they only trap)
  if ((err = mma_compiled(&compiled)) != cudaSuccess) return err;
  *apply = major >= 8 && compiled && mma_smem_bytes(a.C + a.R, mma_mtiles(a.Sq * a.H)) <= static_cast<size_t>(optin);
  return cudaSuccess;
}

template <typename T, int MT>
cudaError_t decode_mma(const MlaDecodeArgs& a, cudaStream_t stream) {
  int budget = 0;
  auto kernel = mla_decode_mma_kernel<T, MT>;
  static std::atomic<int> budget_of[kMaxDevices];
  const cudaError_t err = smem_budget(kernel, budget_of, &budget);
  if (err != cudaSuccess) return err;
  const size_t smem = mma_smem_bytes(a.C + a.R, MT);
  if (smem > static_cast<size_t>(budget)) return cudaErrorInvalidValue;
  return launch_split<T>(kernel, 16 * MT, kMmaThreads, smem, a, stream);
}

template <typename T>
cudaError_t decode_typed(DType dtype, const MlaDecodeArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.Sq * a.H == 0) return cudaSuccess;
  if (a.n_splits < 1 || a.n_splits > kMaxSplits || a.C < 1) return cudaErrorInvalidValue;
  if (a.kernel != kDecodeCudaCores) {
    bool apply = false;
    const cudaError_t err = tensor_cores_apply(dtype, a, &apply);
    if (err != cudaSuccess) return err;
    if constexpr (!std::is_same_v<T, float>) {
      if (apply) {
        switch (mma_mtiles(a.Sq * a.H)) {
          case 1: return decode_mma<T, 1>(a, stream);
          case 2: return decode_mma<T, 2>(a, stream);
          case 3: return decode_mma<T, 3>(a, stream);
          default: return decode_mma<T, 4>(a, stream);
        }
      }
    }
    if (a.kernel == kDecodeTensorCores) return cudaErrorInvalidValue;
  }
  if (rows_per_block(a.C) == 16) return decode_typed_cpt<T, 16, 1>(a, stream);  // 512 threads, C <= 512
  const int64_t cpt = (a.C + threads_for_rows(8) - 1) / threads_for_rows(8);
  if (cpt <= 4) return decode_typed_cpt<T, 8, 4>(a, stream);
  if (cpt <= kMaxCpt) return decode_typed_cpt<T, 8, kMaxCpt>(a, stream);
  return cudaErrorInvalidValue;
}

// ---- append ------------------------------------------------------------------------------------

// RoPE of one row x [R] with its cos / sin rows [R] (HF's layouts, mla::rope_pair_at in fp32,
// rounded once) into dst [R], read straight from global memory, one rotary pair per thread
// iteration (no staging buffer, no shared memory: any R fits). Pair i writes positions i and
// half + i. The append kernel's k_pe and mla_decode_absorbed's queries.
template <typename T>
__device__ void rope_row(const T* x, const T* cs, const T* sn, int64_t R, bool interleave, T* dst) {
  const auto xf = [x](int64_t k) { return to_float(x[k]); };
  const auto cf = [cs](int64_t k) { return to_float(cs[k]); };
  const auto sf = [sn](int64_t k) { return to_float(sn[k]); };
  const int64_t half = R / 2;
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    float lo, hi;
    mla::rope_pair_at(xf, cf, sf, half, i, interleave, &lo, &hi);
    dst[i] = from_float<T>(lo);
    dst[half + i] = from_float<T>(hi);
  }
}

template <typename T>
__global__ void mla_append_kernel(MlaAppendArgs a) {
  __shared__ float scratch[32];
  const int64_t bs = blockIdx.x, b = bs / a.S, s = bs % a.S;
  const int64_t C = a.C, R = a.R, D = C + R;
  const T* latent = static_cast<const T*>(a.kv_latent) + b * a.latent_sb + s * a.latent_ss;
  const T* w = static_cast<const T*>(a.norm_weight);
  const int64_t t = static_cast<int64_t>(a.seqlens[b]) + s;
  if (t < 0 || t >= a.capacity) return;  // only reachable without the host check: write nothing
  T* dst = static_cast<T*>(a.kv_cache) +
           mla::cache_row(a.block_table, a.max_pages, a.page_size, a.lmax, a.num_pages, b, t) * D;
  float sum_sq = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = to_float(latent[c]);
    sum_sq += v * v;
  }
  sum_sq = block_sum(sum_sq, scratch);
  const float rstd = math::rms_rstd(sum_sq, static_cast<int>(C), a.eps);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float y = to_float(from_float<T>(to_float(latent[c]) * rstd));
    dst[c] = from_float<T>(y * to_float(w[c]));
  }
  rope_row<T>(static_cast<const T*>(a.k_pe) + b * a.pe_sb + s * a.pe_ss, static_cast<const T*>(a.cos) + bs * R,
              static_cast<const T*>(a.sin) + bs * R, R, a.interleave, dst + C);
}

template <typename T>
cudaError_t append_typed(const MlaAppendArgs& a, cudaStream_t stream) {
  if (a.B * a.S == 0) return cudaSuccess;
  if (a.B * a.S > 0x7fffffff) return cudaErrorInvalidConfiguration;  // one block per token
  mla_append_kernel<T><<<static_cast<unsigned>(a.B * a.S), 128, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int64_t mla_decode_num_splits(DType dtype, const MlaDecodeArgs& a, int sm_count) {
  // Query rows per block of the split kernel launch_mla_decode will run for this call.
  bool tc = false;
  if (a.kernel != kDecodeCudaCores && tensor_cores_apply(dtype, a, &tc) != cudaSuccess) tc = false;
  const int64_t rows = a.Sq * a.H, rpb = tc ? 16 * mma_mtiles(rows) : rows_per_block(a.C);
  const int64_t blocks = a.B * ((rows + rpb - 1) / rpb);
  if (blocks == 0) return 1;
  // At most one wave of split blocks (both split kernels run one block per SM: a second, partial
  // wave would cost as much as the first), each split at least kMinSplitKeys keys (one tile).
  const int64_t want = static_cast<int64_t>(sm_count) / blocks;
  const int64_t most = (a.max_seqlen + kMinSplitKeys - 1) / kMinSplitKeys;
  int64_t n = want < most ? want : most;
  if (n > kMaxSplits) n = kMaxSplits;
  return n < 1 ? 1 : n;
}

size_t mla_decode_smem_bytes(int64_t C, int64_t R) {
  const int64_t D = C + R;
  return sizeof(float) * (rows_per_block(C) == 16 ? split_smem_floats<16>(D) : split_smem_floats<8>(D));
}

int mla_decode_rows_per_block(int64_t C) { return rows_per_block(C); }

int64_t mla_decode_max_c() { return static_cast<int64_t>(threads_for_rows(8)) * kMaxCpt; }

bool mla_decode_tensor_cores_apply(DType dtype, const MlaDecodeArgs& a) {
  bool apply = false;
  return tensor_cores_apply(dtype, a, &apply) == cudaSuccess && apply;
}

cudaError_t launch_mla_decode(DType dtype, const MlaDecodeArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return decode_typed<float>(dtype, a, stream);
    case DType::kBFloat16: return decode_typed<__nv_bfloat16>(dtype, a, stream);
    case DType::kFloat16: return decode_typed<__half>(dtype, a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_mla_append_cache(DType dtype, const MlaAppendArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return append_typed<float>(a, stream);
    case DType::kBFloat16: return append_typed<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return append_typed<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

// ---- the queries' RoPE of mla_decode_absorbed ---------------------------------------------------
// One block per query row (b, s, h): out[row, :] = RoPE(q[row, N:N+R]) with cos / sin row (b or 0,
// s), through mla::rope_pair_at (fp32, rounded once), as the CPU op's rotate_queries.
template <typename T>
__global__ void rope_queries_kernel(const T* __restrict__ q, const T* __restrict__ cos,
                                    const T* __restrict__ sin, bool cs_batch, int64_t S, int64_t H,
                                    int64_t N, int64_t R, bool interleave, T* __restrict__ out) {
  const int64_t row = blockIdx.x, bs = row / H, b = bs / S, s = bs % S;
  const int64_t crow = ((cs_batch ? b : 0) * S + s) * R;
  rope_row<T>(q + row * (N + R) + N, cos + crow, sin + crow, R, interleave, out + row * R);
}

cudaError_t launch_mla_rope_queries(DType dtype, const void* q, const void* cos, const void* sin, bool cs_batch,
                                    int64_t B, int64_t S, int64_t H, int64_t N, int64_t R, bool interleave,
                                    void* out, cudaStream_t stream) {
  const int64_t rows = B * S * H;
  if (rows == 0 || R == 0) return cudaSuccess;  // nothing to rotate (a zero grid is a launch error)
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;  // one block per row
  const unsigned grid = static_cast<unsigned>(rows);
#define LMOE_ROPE_Q(CT)                                                                                   \
  rope_queries_kernel<CT><<<grid, 64, 0, stream>>>(static_cast<const CT*>(q), static_cast<const CT*>(cos), \
                                                   static_cast<const CT*>(sin), cs_batch, S, H, N, R,     \
                                                   interleave, static_cast<CT*>(out));                    \
  return cudaGetLastError()
  switch (dtype) {
    case DType::kFloat32: { LMOE_ROPE_Q(float); }
    case DType::kBFloat16: { LMOE_ROPE_Q(__nv_bfloat16); }
    case DType::kFloat16: { LMOE_ROPE_Q(__half); }
  }
#undef LMOE_ROPE_Q
  return cudaErrorInvalidValue;
}

}  // namespace latentmoe::cuda
