// MoE expert CUDA kernels: a grouped GEMM whose blocks are scheduled over
// (expert, M-tile, N-tile), used twice (gate_up with the SwiGLU fused into its epilogue, then
// down), a decode GEMV for few rows, and a deterministic weighted combine.
//
// GEMM shape per expert e with m_e rows (rows offsets[e] .. offsets[e+1] of the sorted pairs):
//   C[r, n] = sum_k A[row(r), k] * B_e[n, k],   B_e = weight + e * b_rows * Kd  (HF layout,
//   [out_features, in_features], so both operands are K-contiguous).
// A rows are gathered on the fly: for gate_up, row(r) = token of the sorted pair; for down, the
// activation row itself. M-tiles of all experts are numbered consecutively (tile_start[e] is the
// first M-tile of expert e); the 1-D grid covers an upper bound of the tile count times the
// N-tile count, N-tile fastest (blocks of one M-tile run together and share its A rows through
// L2; an expert's weights are streamed once per M-tile, and its M-tiles are neighbours in time,
// so with several M-tiles per expert they share the weights through L2). Surplus blocks exit.
//
// Loads are 16-byte vectors (8 bf16/fp16 or 4 fp32) when the reduction length is a multiple of
// the vector and the operand base pointers are 16-byte aligned (checked on the host; the
// template flag kVec); otherwise the same kernels load element by element with bounds checks.
// Outputs are stored 16 bytes at a time when N and the output pointers allow (runtime flag
// vec_out, uniform), element by element otherwise. No atomics anywhere: every output element is
// written once by one thread, every sum is in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "common/moe_math.h"
#include "cuda/common/cuda_utils.cuh"
#include "cuda/moe/moe_launch.h"

namespace latentmoe::cuda {
namespace {

constexpr int kGemmThreads = 256;  // tiled GEMMs: 8 warps
constexpr int kBM = 64;        // rows (sorted pairs) per M-tile
constexpr int kBR = 128;       // weight rows per tile: 64 gate + 64 up (SwiGLU), 128 otherwise
static_assert(kGemmThreads / 4 == kBM && kBR == 2 * kBM, "the copy slots assume these");

struct GroupedProblem {
  const int64_t* offsets;      // [E+1] rows of each expert in sorted order
  const int* tile_start;       // [E+1] first M-tile of each expert (tiled path only)
  int64_t E;
  const int64_t* sorted_pairs; // gather map (gate_up) or null (down: identity rows)
  int64_t K;                   // top-k (pair id / K = token)
  int64_t N;                   // output columns per GEMM (I for gate_up, H for down)
  int64_t Kd;                  // reduction length (H for gate_up, I for down)
  int64_t b_rows;              // rows of one expert's weight (2I or H)
  bool vec_out;                // N a multiple of the 16-byte vector, outputs 16-byte aligned
};

template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Expert owning M-tile `tile`: the largest e with tile_start[e] <= tile (experts with no rows
// own no tiles, and the last of equal starts is the one that has tiles).
__device__ __forceinline__ int64_t expert_of_tile(const int* tile_start, int64_t E, int tile) {
  int64_t lo = 0, hi = E;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Source row of sorted row r in A (token for gate_up, r itself for down).
__device__ __forceinline__ int64_t a_row(const GroupedProblem& p, int64_t r) {
  return p.sorted_pairs != nullptr ? p.sorted_pairs[r] / p.K : r;
}

// Epilogue of one output element (r: row in sorted order, n: column).
template <typename T, bool kSwiGLU>
__device__ __forceinline__ void epilogue(int64_t r, int64_t n, float c_gate, float c_up,
                                         int64_t N, T* __restrict__ out,
                                         T* __restrict__ act) {
  if constexpr (kSwiGLU) {
    const T g = from_float<T>(c_gate), u = from_float<T>(c_up);
    out[r * 2 * N + n] = g;  // gate_up_out (pre-activation, kept for the backward)
    out[r * 2 * N + N + n] = u;
    act[r * N + n] = from_float<T>(moe::swiglu(to_float(g), to_float(u)));
  } else {
    out[r * N + n] = from_float<T>(c_gate);
  }
}

// The same for kV = 16 / sizeof(T) consecutive columns n .. n+kV-1 (gate values g, up values u,
// read with stride 1): one 16-byte store per output when vec_out and all columns exist,
// element by element (bounds-checked) otherwise. Same rounding points as epilogue().
template <typename T, bool kSwiGLU>
__device__ __forceinline__ void epilogue_vec(const GroupedProblem& p, int64_t r, int64_t n,
                                             const float* g, const float* u,
                                             T* __restrict__ out, T* __restrict__ act) {
  constexpr int kV = kVecElems<T>;
  const int64_t N = p.N;
  if (p.vec_out && n + kV <= N) {
    alignas(16) T gv[kV];
    alignas(16) T uv[kV];
    alignas(16) T av[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      gv[i] = from_float<T>(g[i]);
      if constexpr (kSwiGLU) {
        uv[i] = from_float<T>(u[i]);
        av[i] = from_float<T>(moe::swiglu(to_float(gv[i]), to_float(uv[i])));
      }
    }
    if constexpr (kSwiGLU) {
      *reinterpret_cast<uint4*>(out + r * 2 * N + n) = *reinterpret_cast<const uint4*>(gv);
      *reinterpret_cast<uint4*>(out + r * 2 * N + N + n) = *reinterpret_cast<const uint4*>(uv);
      *reinterpret_cast<uint4*>(act + r * N + n) = *reinterpret_cast<const uint4*>(av);
    } else {
      *reinterpret_cast<uint4*>(out + r * N + n) = *reinterpret_cast<const uint4*>(gv);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kV; ++i)
      if (n + i < N) epilogue<T, kSwiGLU>(r, n + i, g[i], kSwiGLU ? u[i] : 0.f, N, out, act);
  }
}

// Source of row R of a tile's operands (null where the row does not exist): R < 64 is A row R
// of the M-tile, R = 64 + j weight row j of the 128-row weight tile (SwiGLU: j < 64 are gate
// rows n0 + j, j >= 64 the matching up rows N + n0 + j - 64).
template <typename T, bool kSwiGLU>
__device__ __forceinline__ const T* tile_row_source(const GroupedProblem& p, const T* A,
                                                    const T* Be, int64_t row0, int64_t m,
                                                    int64_t m0, int64_t n0, int R) {
  constexpr int kBN = kSwiGLU ? kBR / 2 : kBR;
  if (R < kBM) {
    const int64_t lr = m0 + R;
    return lr < m ? A + a_row(p, row0 + lr) * p.Kd : nullptr;
  }
  const int j = R - kBM;
  const int64_t n = n0 + j % kBN;
  const int64_t wrow = (kSwiGLU && j >= kBN ? p.N : 0) + n;
  return n < p.N ? Be + wrow * p.Kd : nullptr;
}

// ---- tensor-core path (bf16 / fp16 in, fp32 accumulate) -------------------------------------
// Tile 64 rows x 128 weight rows x 64 k, 8 warps (2 x 4, each 32 x 32 = 2 x 2 WMMA 16x16x16
// fragments), a 4-stage cp.async pipeline (16-byte copies, 6 per thread per stage: each weight
// row is read in whole 128-byte lines; up to 3 stages = 48 KB of weights in flight per block,
// 2 blocks per SM), padded shared rows (72 elements = 144 bytes) so WMMA loads and the copies
// spread over the banks. 108 KB of dynamic shared memory per block (2 stages, 54 KB, on devices
// that allow less per block); the fp32 C tile for the epilogue reuses it.
constexpr int kBK = 64;
constexpr int kStagesDeep = 4;     // sm_80 / sm_90 (up to 163 / 227 KB per block)
constexpr int kStagesShallow = 2;  // devices with less opt-in shared memory (sm_86 / sm_89: 99 KB)
constexpr int kLd = kBK + 8;    // smem row stride of A/B tiles (elements)
constexpr int kLdc = kBR + 4;   // smem row stride of the fp32 C tile
constexpr int kChunksPerRow = kBK / 8;                       // 16-byte chunks per stage row
constexpr int kRowsPerPass = kGemmThreads / kChunksPerRow;   // stage rows copied per pass
constexpr int kSlots = (kBM + kBR) / kRowsPerPass;           // copies per thread per stage
static_assert(kGemmThreads % kChunksPerRow == 0 && (kBM + kBR) % kRowsPerPass == 0,
              "copy slots tile the stage exactly");

// Copies 8 elements k..k+7 of `row` into dst (16 bytes, shared), zeros where out of range.
template <typename T, bool kVec>
__device__ __forceinline__ void copy_chunk8(T* dst, const T* row, int k, int Kd) {
  if constexpr (kVec) {  // Kd % 8 == 0: the chunk is entirely in or out of range
    if (row != nullptr && k < Kd) {
      __pipeline_memcpy_async(dst, row + k, 16);
    } else {
      *reinterpret_cast<uint4*>(dst) = uint4{0u, 0u, 0u, 0u};
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      dst[i] = (row != nullptr && k + i < Kd) ? row[k + i] : from_float<T>(0.f);
  }
}

constexpr int kStageElems = (kBM + kBR) * kLd;  // 16-bit elements of one stage
constexpr int kWmmaCBytes = kBM * kLdc * static_cast<int>(sizeof(float));
constexpr int wmma_smem_bytes(int stages) {
  return stages * kStageElems * 2 > kWmmaCBytes ? stages * kStageElems * 2 : kWmmaCBytes;
}

template <typename T, bool kSwiGLU, bool kVec, int kStages>
__global__ void __launch_bounds__(kGemmThreads, 2)
grouped_gemm_wmma(GroupedProblem p, int n_tiles, const T* __restrict__ A,
                  const T* __restrict__ B, T* __restrict__ out, T* __restrict__ act) {
  using namespace nvcuda;
  static_assert(sizeof(T) == 2 && kStages >= 2, "16-bit operands, at least double buffering");
  constexpr int kBN = kSwiGLU ? kBR / 2 : kBR;  // output columns per tile
  extern __shared__ __align__(128) unsigned char smem[];  // wmma_smem_bytes(kStages)
  T* const stages = reinterpret_cast<T*>(smem);

  const int tile = static_cast<int>(blockIdx.x) / n_tiles;
  const int nt = static_cast<int>(blockIdx.x) % n_tiles;
  if (tile >= p.tile_start[p.E]) return;  // uniform per block
  const int64_t e = expert_of_tile(p.tile_start, p.E, tile);
  const int64_t row0 = p.offsets[e];
  const int64_t m = p.offsets[e + 1] - row0;
  const int64_t m0 = static_cast<int64_t>(tile - p.tile_start[e]) * kBM;
  const int64_t n0 = static_cast<int64_t>(nt) * kBN;
  const T* Be = B + e * p.b_rows * p.Kd;
  const int tid = threadIdx.x;
  // Copy slots: stage rows ld_row + q * kRowsPerPass (A rows, then weight rows), 8 elements
  // from column ld_col.
  const int ld_row = tid / kChunksPerRow, ld_col = (tid % kChunksPerRow) * 8;
  const T* src[kSlots];
#pragma unroll
  for (int q = 0; q < kSlots; ++q)
    src[q] = tile_row_source<T, kSwiGLU>(p, A, Be, row0, m, m0, n0, ld_row + q * kRowsPerPass);

  const int Kd = static_cast<int>(p.Kd);  // a row length: < 2^31
  T* const slot = stages + ld_row * kLd + ld_col;  // this thread's first slot in stage 0
  auto load_stage = [&](int buf, int kt) {
    T* st = slot + buf * kStageElems;
    const int k = kt * kBK + ld_col;
#pragma unroll
    for (int q = 0; q < kSlots; ++q)
      copy_chunk8<T, kVec>(st + q * kRowsPerPass * kLd, src[q], k, Kd);
  };

  const int warp = tid / 32, wm = warp / 4, wn = warp % 4;
  // 16-row fragments wholly past the expert's rows only multiply zero padding: skipped
  // (warp-uniform; their accumulators stay zero and are never stored to global memory).
  bool live[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) live[i] = m0 + wm * 32 + i * 16 < m;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  // Pipeline: group g holds stage g's copies (an empty group past the end keeps the count
  // uniform). Before computing stage kt, wait until at most kStages - 2 groups are pending
  // (so groups 0..kt have landed for this thread), then a barrier makes every thread's copies
  // visible and guarantees that stage kt - 1's buffer, refilled next, is no longer read.
  const int nk = (Kd + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage(s, s);
    __pipeline_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    __pipeline_wait_prior(kStages - 2);
    __syncthreads();
    const int pf = kt + kStages - 1;
    if (pf < nk) load_stage(pf % kStages, pf);
    __pipeline_commit();
    const T* As = stages + (kt % kStages) * kStageElems;
    const T* Bs = As + kBM * kLd;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      if (!live[0]) break;  // this warp's rows are all padding
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        if (live[i]) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * kLd + kk, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(b[j], Bs + (wn * 32 + j * 16) * kLd + kk, kLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          if (live[i]) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // all warps are done with the stages: reuse them for the C tile
  float* C = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(C + (wm * 32 + i * 16) * kLdc + wn * 32 + j * 16, acc[i][j], kLdc,
                              wmma::mem_row_major);
  __syncthreads();
  // 8 output columns per thread and step; SwiGLU: gate in C columns 0..63, up in 64..127.
  constexpr int kChunks = kBN / 8;
  for (int idx = tid; idx < kBM * kChunks; idx += kGemmThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    if (m0 + r >= m) continue;
    const float* cg = C + r * kLdc + c;
    epilogue_vec<T, kSwiGLU>(p, row0 + m0 + r, n0 + c, cg, cg + (kSwiGLU ? kBN : 0), out, act);
  }
}

// ---- fp32 path: FMA tiles 64 x 128 x 16, 256 threads, each a 4 x 8 register micro-tile ------
// Operands go k-major into double-buffered shared memory (float4 global loads for the next
// k-step are issued before the current one is computed); every thread reads one float4 of A
// and two of B per k (rows ty*4.., weight rows tx*4.. and 64 + tx*4..). With SwiGLU, the two
// weight-row groups are the gate and up rows of the same 4 output columns, so the epilogue
// runs from registers.
constexpr int kBKf = 16;

template <bool kVec>
__device__ __forceinline__ float4 load4(const float* row, int64_t k, int64_t Kd) {
  float4 v{0.f, 0.f, 0.f, 0.f};
  if (row == nullptr) return v;
  if constexpr (kVec) {  // Kd % 4 == 0: the 4 elements are entirely in or out of range
    if (k < Kd) v = *reinterpret_cast<const float4*>(row + k);
  } else {
    v.x = k < Kd ? row[k] : 0.f;
    v.y = k + 1 < Kd ? row[k + 1] : 0.f;
    v.z = k + 2 < Kd ? row[k + 2] : 0.f;
    v.w = k + 3 < Kd ? row[k + 3] : 0.f;
  }
  return v;
}

template <bool kSwiGLU, bool kVec>
__global__ void __launch_bounds__(kGemmThreads, 2)
grouped_gemm_fp32(GroupedProblem p, int n_tiles, const float* __restrict__ A,
                  const float* __restrict__ B, float* __restrict__ out,
                  float* __restrict__ act) {
  constexpr int kBN = kSwiGLU ? kBR / 2 : kBR;
  __shared__ __align__(16) float As[2][kBKf][kBM + 4];
  __shared__ __align__(16) float Bs[2][kBKf][kBR + 4];
  const int tile = static_cast<int>(blockIdx.x) / n_tiles;
  const int nt = static_cast<int>(blockIdx.x) % n_tiles;
  if (tile >= p.tile_start[p.E]) return;  // uniform per block
  const int64_t e = expert_of_tile(p.tile_start, p.E, tile);
  const int64_t row0 = p.offsets[e];
  const int64_t m = p.offsets[e + 1] - row0;
  const int64_t m0 = static_cast<int64_t>(tile - p.tile_start[e]) * kBM;
  const int64_t n0 = static_cast<int64_t>(nt) * kBN;
  const float* Be = B + e * p.b_rows * p.Kd;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int ld_row = tid >> 2, ld_col = (tid & 3) * 4;
  const float* a_src = tile_row_source<float, kSwiGLU>(p, A, Be, row0, m, m0, n0, ld_row);
  const float* b_src[2];
#pragma unroll
  for (int q = 0; q < 2; ++q)
    b_src[q] = tile_row_source<float, kSwiGLU>(p, A, Be, row0, m, m0, n0, kBM + ld_row + q * kBM);

  float4 ra, rb0, rb1;
  auto fetch = [&](int kt) {
    const int64_t k = static_cast<int64_t>(kt) * kBKf + ld_col;
    ra = load4<kVec>(a_src, k, p.Kd);
    rb0 = load4<kVec>(b_src[0], k, p.Kd);
    rb1 = load4<kVec>(b_src[1], k, p.Kd);
  };
  auto stash = [&](int buf) {
    As[buf][ld_col + 0][ld_row] = ra.x;
    As[buf][ld_col + 1][ld_row] = ra.y;
    As[buf][ld_col + 2][ld_row] = ra.z;
    As[buf][ld_col + 3][ld_row] = ra.w;
    Bs[buf][ld_col + 0][ld_row] = rb0.x;
    Bs[buf][ld_col + 1][ld_row] = rb0.y;
    Bs[buf][ld_col + 2][ld_row] = rb0.z;
    Bs[buf][ld_col + 3][ld_row] = rb0.w;
    Bs[buf][ld_col + 0][ld_row + kBM] = rb1.x;
    Bs[buf][ld_col + 1][ld_row + kBM] = rb1.y;
    Bs[buf][ld_col + 2][ld_row + kBM] = rb1.z;
    Bs[buf][ld_col + 3][ld_row + kBM] = rb1.w;
  };

  float acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  const int nk = static_cast<int>((p.Kd + kBKf - 1) / kBKf);
  if (nk > 0) {
    fetch(0);
    stash(0);
  }
  __syncthreads();
  // Threads whose 4 rows are all past the expert's rows would only multiply zero padding (a
  // warp spans 8 rows, so mostly whole warps skip).
  const bool live = m0 + ty * 4 < m;
  for (int kt = 0; kt < nk; ++kt) {
    const int cur = kt & 1;
    if (kt + 1 < nk) fetch(kt + 1);  // in flight while this stage is computed
#pragma unroll
    for (int kk = 0; kk < kBKf; ++kk) {
      if (!live) break;
      const float4 a4 = *reinterpret_cast<const float4*>(&As[cur][kk][ty * 4]);
      const float4 b4 = *reinterpret_cast<const float4*>(&Bs[cur][kk][tx * 4]);
      const float4 c4 = *reinterpret_cast<const float4*>(&Bs[cur][kk][kBM + tx * 4]);
      const float a[4] = {a4.x, a4.y, a4.z, a4.w};
      const float b[8] = {b4.x, b4.y, b4.z, b4.w, c4.x, c4.y, c4.z, c4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    // The other buffer was last read in step kt - 1, which every thread finished before the
    // barrier that ended it.
    if (kt + 1 < nk) stash(cur ^ 1);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t lr = m0 + ty * 4 + i;
    if (lr >= m) continue;
    if constexpr (kSwiGLU) {
      epilogue_vec<float, true>(p, row0 + lr, n0 + tx * 4, &acc[i][0], &acc[i][4], out, act);
    } else {
      epilogue_vec<float, false>(p, row0 + lr, n0 + tx * 4, &acc[i][0], nullptr, out, act);
      epilogue_vec<float, false>(p, row0 + lr, n0 + kBM + tx * 4, &acc[i][4], nullptr, out, act);
    }
  }
}

// ---- decode path (few rows): one warp per (expert, output column) ----------------------------
// Bandwidth-bound: each warp streams the weight row(s) of its column once per group of up to
// kGemvRows rows of the expert, 16 bytes per lane per load with kGemvUnroll loads (x2 with the
// up row) in flight per lane; the expert's activation rows are small and come from L1/L2.
// grid.y runs over sorted rows; only the block row of an expert's first row does work (it
// computes all of the expert's rows), the others exit at once.
constexpr int64_t kDecodeMaxRows = 64;
constexpr int kGemvWarps = 8;
constexpr int kGemvRows = 4;
constexpr int kGemvUnroll = 4;

// Expert owning sorted row r: the largest e < E with offsets[e] <= r (an expert with no rows
// shares its offset with the next one, so the last of equal offsets is the owner).
__device__ __forceinline__ int64_t expert_of_row(const int64_t* offsets, int64_t E, int64_t r) {
  int64_t lo = 0, hi = E - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// 16 bytes (kVecElems<T> elements) at p as floats.
template <typename T>
__device__ __forceinline__ void load_vec_f32(const T* p, float* f) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const T* x = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) f[i] = to_float(x[i]);
}

template <typename T, bool kSwiGLU, bool kVec>
__global__ void __launch_bounds__(kGemvWarps * 32)
grouped_gemv(GroupedProblem p, int64_t rows, const T* __restrict__ A, const T* __restrict__ B,
             T* __restrict__ out, T* __restrict__ act) {
  constexpr int kV = kVecElems<T>;
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  const int64_t r_first = blockIdx.y;
  if (n >= p.N || r_first >= rows) return;  // uniform per warp
  const int64_t e = expert_of_row(p.offsets, p.E, r_first);
  if (p.offsets[e] != r_first) return;      // uniform per block: not the expert's first row
  const int64_t r_end = p.offsets[e + 1];
  const T* wg = B + (e * p.b_rows + n) * p.Kd;
  const T* wu = kSwiGLU ? wg + p.N * p.Kd : wg;
  for (int64_t r0 = r_first; r0 < r_end; r0 += kGemvRows) {
    const int nr = static_cast<int>(r_end - r0 < kGemvRows ? r_end - r0 : kGemvRows);
    const T* a[kGemvRows];
#pragma unroll
    for (int j = 0; j < kGemvRows; ++j) a[j] = A + a_row(p, r0 + (j < nr ? j : 0)) * p.Kd;
    float g[kGemvRows], u[kGemvRows];
#pragma unroll
    for (int j = 0; j < kGemvRows; ++j) g[j] = u[j] = 0.f;
    if constexpr (kVec) {  // Kd % kV == 0, rows 16-byte aligned
      const int64_t n_chunks = p.Kd / kV;
      for (int64_t c0 = lane; c0 < n_chunks; c0 += 32 * kGemvUnroll) {
        uint4 vg[kGemvUnroll], vu[kGemvUnroll];
#pragma unroll
        for (int q = 0; q < kGemvUnroll; ++q) {
          const int64_t c = c0 + q * 32;
          if (c < n_chunks) {
            vg[q] = *reinterpret_cast<const uint4*>(wg + c * kV);
            if constexpr (kSwiGLU) vu[q] = *reinterpret_cast<const uint4*>(wu + c * kV);
          }
        }
#pragma unroll
        for (int q = 0; q < kGemvUnroll; ++q) {
          const int64_t c = c0 + q * 32;
          if (c >= n_chunks) break;
          float fg[kV], fu[kV];
          const T* xg = reinterpret_cast<const T*>(&vg[q]);
          const T* xu = reinterpret_cast<const T*>(&vu[q]);
#pragma unroll
          for (int i = 0; i < kV; ++i) {
            fg[i] = to_float(xg[i]);
            fu[i] = kSwiGLU ? to_float(xu[i]) : 0.f;
          }
#pragma unroll
          for (int j = 0; j < kGemvRows; ++j) {
            if (j >= nr) break;
            float fa[kV];
            load_vec_f32<T>(a[j] + c * kV, fa);
#pragma unroll
            for (int i = 0; i < kV; ++i) {
              g[j] = fmaf(fa[i], fg[i], g[j]);
              if constexpr (kSwiGLU) u[j] = fmaf(fa[i], fu[i], u[j]);
            }
          }
        }
      }
    } else {
      for (int64_t k = lane; k < p.Kd; k += 32) {
        const float wgk = to_float(wg[k]);
        const float wuk = kSwiGLU ? to_float(wu[k]) : 0.f;
#pragma unroll
        for (int j = 0; j < kGemvRows; ++j) {
          if (j >= nr) break;
          const float av = to_float(a[j][k]);
          g[j] = fmaf(av, wgk, g[j]);
          if constexpr (kSwiGLU) u[j] = fmaf(av, wuk, u[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kGemvRows; ++j) {
      if (j >= nr) break;  // nr is uniform per warp
      const float gs = warp_sum(g[j]);
      const float us = kSwiGLU ? warp_sum(u[j]) : 0.f;
      if (lane == 0) epilogue<T, kSwiGLU>(r0 + j, n, gs, us, p.N, out, act);
    }
  }
}

// tile_start[e] = sum over e' < e of ceil(m_e' / kBM); tile_start[E] = total. One thread: E is
// small and this keeps the order obvious.
__global__ void tile_start_kernel(const int64_t* __restrict__ offsets, int64_t E,
                                  int* __restrict__ tile_start) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int acc = 0;
  for (int64_t e = 0; e < E; ++e) {
    tile_start[e] = acc;
    acc += static_cast<int>((offsets[e + 1] - offsets[e] + kBM - 1) / kBM);
  }
  tile_start[E] = acc;
}

// out[t, :] = sum_k w[t*K+k] * y[pos[t*K+k], :], fp32, in k order (deterministic). With kVec
// (H a multiple of the 16-byte vector, y / out aligned) each thread does 16 bytes of columns.
template <typename T, bool kVec>
__global__ void combine_kernel(const T* __restrict__ y, const float* __restrict__ w,
                               const int64_t* __restrict__ pos, const int64_t* __restrict__ offsets,
                               int64_t E, int64_t K, int64_t H, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  // Sorted rows [offsets[0], offsets[E]) belong to experts; a pair placed outside (an index out of
  // [0, E) in an unchecked call) has no computed row and is dropped.
  const int64_t lo = offsets[0], hi = offsets[E];
  if constexpr (kVec) {
    constexpr int kV = kVecElems<T>;
    for (int64_t h = static_cast<int64_t>(threadIdx.x) * kV; h < H;
         h += static_cast<int64_t>(blockDim.x) * kV) {
      float acc[kV];
#pragma unroll
      for (int i = 0; i < kV; ++i) acc[i] = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = pos[t * K + k];
        if (row < lo || row >= hi) continue;
        const float wk = w[t * K + k];
        float v[kV];
        load_vec_f32<T>(y + row * H + h, v);
#pragma unroll
        for (int i = 0; i < kV; ++i) acc[i] += wk * v[i];
      }
      alignas(16) T o[kV];
#pragma unroll
      for (int i = 0; i < kV; ++i) o[i] = from_float<T>(acc[i]);
      *reinterpret_cast<uint4*>(out + t * H + h) = *reinterpret_cast<const uint4*>(o);
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = pos[t * K + k];
        if (row >= lo && row < hi) acc += w[t * K + k] * to_float(y[row * H + h]);
      }
      out[t * H + h] = from_float<T>(acc);
    }
  }
}

template <typename T>
cudaError_t launch_combine(const T* y, const float* w, const int64_t* pos, const int64_t* offsets,
                           int64_t E, int64_t T_, int64_t K, int64_t H, T* out, cudaStream_t stream) {
  const bool vec = H % kVecElems<T> == 0 && aligned16(y) && aligned16(out);
  if (T_ > 0x7fffffff) return cudaErrorInvalidValue;  // one block per token: beyond the 1-D grid
  const unsigned grid = static_cast<unsigned>(T_);
  if (vec) {
    combine_kernel<T, true><<<grid, 256, 0, stream>>>(y, w, pos, offsets, E, K, H, out);
  } else {
    combine_kernel<T, false><<<grid, 256, 0, stream>>>(y, w, pos, offsets, E, K, H, out);
  }
  return cudaGetLastError();
}

// act[r, i] = swiglu(gate_up_out[r, i], gate_up_out[r, I + i]) for the S sorted rows (fp32 math
// through moe::swiglu, rounded to T): the SwiGLU of the grouped forward, between its two
// at::_grouped_mm calls. kVec: I a multiple of the 16-byte vector, both buffers aligned; each
// thread then does 16 bytes of a row. Grid-stride over the S * I (or S * I / kV) items.
template <typename T, bool kVec>
__global__ void swiglu_rows_kernel(const T* __restrict__ gate_up_out, int64_t S, int64_t I,
                                   T* __restrict__ act) {
  constexpr int64_t kV = kVec ? kVecElems<T> : 1;
  const int64_t per_row = I / kV, n = S * per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n; v += stride) {
    const int64_t r = v / per_row, i = (v - r * per_row) * kV;
    const T* g = gate_up_out + r * 2 * I + i;
    if constexpr (kVec) {
      float gv[kV], uv[kV];
      load_vec_f32<T>(g, gv);
      load_vec_f32<T>(g + I, uv);
      alignas(16) T o[kV];
#pragma unroll
      for (int j = 0; j < kV; ++j) o[j] = from_float<T>(moe::swiglu(gv[j], uv[j]));
      *reinterpret_cast<uint4*>(act + r * I + i) = *reinterpret_cast<const uint4*>(o);
    } else {
      act[r * I + i] = from_float<T>(moe::swiglu(to_float(g[0]), to_float(g[I])));
    }
  }
}

// Zeroes the slice [e * bytes, (e + 1) * bytes) of data for every expert e with no rows
// (offsets[e + 1] == offsets[e]); the other experts' slices are not touched, so the cost follows
// the idle experts. blocks_per_expert consecutive blocks share an expert. kVec: 16-byte stores
// (data aligned, bytes a multiple of 16).
template <bool kVec>
__global__ void zero_idle_kernel(unsigned char* __restrict__ data, int64_t bytes,
                                 const int64_t* __restrict__ offsets, int blocks_per_expert) {
  const int64_t e = blockIdx.x / blocks_per_expert;
  if (offsets[e + 1] != offsets[e]) return;
  const int64_t part = blockIdx.x % blocks_per_expert;
  const int64_t stride = static_cast<int64_t>(blocks_per_expert) * blockDim.x;
  unsigned char* base = data + e * bytes;
  if constexpr (kVec) {
    uint4* v = reinterpret_cast<uint4*>(base);
    for (int64_t i = part * blockDim.x + threadIdx.x; i < bytes / 16; i += stride) v[i] = uint4{0u, 0u, 0u, 0u};
  } else {
    for (int64_t i = part * blockDim.x + threadIdx.x; i < bytes; i += stride) base[i] = 0;
  }
}

// The backward's SwiGLU step, one block per sorted row r (all fp32 math, as the ATen steps):
// ga = gau[r] * w_s[r]; gh[r] = [ga * d act / d g | ga * d act / d u] (moe::swiglu_grad), rounded
// to T; grad_w[r] = sum_i gau[r, i] * act[r, i], act = swiglu(g, u) rounded to T as the forward
// stored it. A row outside [offsets[0], offsets[E]) (a dropped pair: its gate_up_out and gau rows
// were never written) gets gh = 0 and grad_w = 0 without reading them.
constexpr int kSwigluBwdThreads = 256;  // a power of two (the tree reduction)

template <typename T>
__global__ void swiglu_backward_kernel(const T* __restrict__ gate_up_out, const T* __restrict__ gau,
                                       const float* __restrict__ w_s, const int64_t* __restrict__ offsets,
                                       int64_t E, int64_t I, T* __restrict__ gh, float* __restrict__ grad_w) {
  __shared__ float part[kSwigluBwdThreads];
  const int64_t r = blockIdx.x;
  const bool dropped = r < offsets[0] || r >= offsets[E];  // (uniform over the block)
  T* out = gh + r * 2 * I;
  float dot = 0.f;
  if (dropped) {
    for (int64_t i = threadIdx.x; i < 2 * I; i += blockDim.x) out[i] = from_float<T>(0.f);
  } else {
    const T* gu = gate_up_out + r * 2 * I;
    const T* a_row = gau + r * I;
    const float w = w_s[r];
    for (int64_t i = threadIdx.x; i < I; i += blockDim.x) {
      const float g = to_float(gu[i]), u = to_float(gu[I + i]), a = to_float(a_row[i]);
      dot += a * to_float(from_float<T>(moe::swiglu(g, u)));
      float da_dg, da_du;
      moe::swiglu_grad(g, u, &da_dg, &da_du);
      const float ga = a * w;
      out[i] = from_float<T>(ga * da_dg);
      out[I + i] = from_float<T>(ga * da_du);
    }
  }
  // A fixed tree over the block's threads (deterministic).
  part[threadIdx.x] = dot;
  __syncthreads();
  for (int stride = kSwigluBwdThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_w[r] = dropped ? 0.f : part[0];
}

template <typename T>
cudaError_t launch_swiglu(const T* gate_up_out, int64_t S, int64_t I, T* act, cudaStream_t stream) {
  if (S == 0 || I == 0) return cudaSuccess;  // nothing to write (a zero grid is a launch error)
  const bool vec = I % kVecElems<T> == 0 && aligned16(gate_up_out) && aligned16(act);
  const int64_t items = S * (vec ? I / kVecElems<T> : I);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((items + 255) / 256, 16384));
  if (vec) {
    swiglu_rows_kernel<T, true><<<grid, 256, 0, stream>>>(gate_up_out, S, I, act);
  } else {
    swiglu_rows_kernel<T, false><<<grid, 256, 0, stream>>>(gate_up_out, S, I, act);
  }
  return cudaGetLastError();
}

template <typename T, bool kSwiGLU>
cudaError_t launch_gemv(const GroupedProblem& p, bool vec_in, int64_t rows, const T* A,
                        const T* B, T* out, T* act, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>((p.N + kGemvWarps - 1) / kGemvWarps), static_cast<unsigned>(rows));
  if (vec_in) {
    grouped_gemv<T, kSwiGLU, true><<<grid, kGemvWarps * 32, 0, stream>>>(p, rows, A, B, out, act);
  } else {
    grouped_gemv<T, kSwiGLU, false><<<grid, kGemvWarps * 32, 0, stream>>>(p, rows, A, B, out, act);
  }
  return cudaGetLastError();
}

// More than 48 KB of dynamic shared memory needs the opt-in (per kernel; cheap, no sync).
template <typename T, bool kSwiGLU, bool kVec, int kStages>
cudaError_t launch_wmma(const GroupedProblem& p, unsigned grid, int nt, const T* A, const T* B,
                        T* out, T* act, cudaStream_t stream) {
  constexpr int kBytes = wmma_smem_bytes(kStages);
  if (cudaError_t err = cudaFuncSetAttribute(grouped_gemm_wmma<T, kSwiGLU, kVec, kStages>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
      err != cudaSuccess)
    return err;
  grouped_gemm_wmma<T, kSwiGLU, kVec, kStages><<<grid, kGemmThreads, kBytes, stream>>>(
      p, nt, A, B, out, act);
  return cudaGetLastError();
}

template <typename T, bool kSwiGLU>
cudaError_t launch_gemm(const GroupedProblem& p, bool vec_in, int64_t max_tiles, const T* A,
                        const T* B, T* out, T* act, cudaStream_t stream) {
  constexpr int64_t kBN = kSwiGLU ? kBR / 2 : kBR;
  const int64_t n_tiles = (p.N + kBN - 1) / kBN;
  const int64_t blocks = max_tiles * n_tiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;  // beyond the 1-D grid
  const unsigned grid = static_cast<unsigned>(blocks);
  const int nt = static_cast<int>(n_tiles);
  if constexpr (std::is_same_v<T, float>) {
    if (vec_in) {
      grouped_gemm_fp32<kSwiGLU, true><<<grid, kGemmThreads, 0, stream>>>(p, nt, A, B, out, act);
    } else {
      grouped_gemm_fp32<kSwiGLU, false><<<grid, kGemmThreads, 0, stream>>>(p, nt, A, B, out, act);
    }
  } else {
    int dev = 0, optin = 0;
    if (cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return err;
    if (cudaError_t err =
            cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
        err != cudaSuccess)
      return err;
    if (optin >= wmma_smem_bytes(kStagesDeep)) {
      return vec_in ? launch_wmma<T, kSwiGLU, true, kStagesDeep>(p, grid, nt, A, B, out, act, stream)
                    : launch_wmma<T, kSwiGLU, false, kStagesDeep>(p, grid, nt, A, B, out, act, stream);
    }
    return vec_in ? launch_wmma<T, kSwiGLU, true, kStagesShallow>(p, grid, nt, A, B, out, act, stream)
                  : launch_wmma<T, kSwiGLU, false, kStagesShallow>(p, grid, nt, A, B, out, act, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_experts(const T* x, const int64_t* sorted_pairs, const int64_t* offsets,
                        const int64_t* pos, const T* gate_up, const T* down, const float* w,
                        int64_t T_, int64_t K, int64_t E, int64_t H, int64_t I, int* tile_start,
                        T* gate_up_out, T* act, T* y, T* out, cudaStream_t stream) {
  const int64_t S = T_ * K;
  if (S == 0) {  // no pairs (k = 0): the output is all zeros, as the CPU's combine gives
    return T_ * H == 0 ? cudaSuccess : cudaMemsetAsync(out, 0, sizeof(T) * T_ * H, stream);
  }
  if (I == 0) return cudaErrorInvalidValue;  // the op rejects it; a zero grid would fail anyway
  constexpr int64_t kV = kVecElems<T>;
  // 16-byte loads need the reduction length to be a multiple of the vector (every row then
  // starts 16-byte aligned) and aligned bases; 16-byte stores likewise for N and the outputs.
  const bool vec_up = H % kV == 0 && aligned16(x) && aligned16(gate_up);
  const bool vec_dn = I % kV == 0 && aligned16(act) && aligned16(down);
  const bool vec_out_up = I % kV == 0 && aligned16(gate_up_out) && aligned16(act);
  const bool vec_out_dn = H % kV == 0 && aligned16(y);
  GroupedProblem up{offsets, tile_start, E, sorted_pairs, K, I, H, 2 * I, vec_out_up};
  GroupedProblem dn{offsets, tile_start, E, nullptr, K, H, I, H, vec_out_dn};
  if (S <= kDecodeMaxRows) {
    up.tile_start = dn.tile_start = nullptr;
    if (cudaError_t err = launch_gemv<T, true>(up, vec_up, S, x, gate_up, gate_up_out, act, stream);
        err != cudaSuccess)
      return err;
    if (H == 0) return cudaSuccess;  // out is [T, 0]; a zero grid dimension is a launch error
    if (cudaError_t err = launch_gemv<T, false>(dn, vec_dn, S, act, down, y, nullptr, stream);
        err != cudaSuccess)
      return err;
    return launch_combine<T>(y, w, pos, offsets, E, T_, K, H, out, stream);
  }
  tile_start_kernel<<<1, 1, 0, stream>>>(offsets, E, tile_start);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  // sum_e ceil(m_e / kBM) <= ceil(S / kBM) + min(E, S): an upper bound known on the host.
  const int64_t max_tiles = (S + kBM - 1) / kBM + (E < S ? E : S);
  if (cudaError_t err = launch_gemm<T, true>(up, vec_up, max_tiles, x, gate_up, gate_up_out, act,
                                             stream);
      err != cudaSuccess)
    return err;
  if (H == 0) return cudaSuccess;  // out is [T, 0]; a zero grid dimension is a launch error
  if (cudaError_t err = launch_gemm<T, false>(dn, vec_dn, max_tiles, act, down, y, nullptr, stream);
      err != cudaSuccess)
    return err;
  return launch_combine<T>(y, w, pos, offsets, E, T_, K, H, out, stream);
}

// Stable sort of the S (token, k) pairs by expert for small S, in one block (the ATen sort,
// searchsorted and scatter of the binding are several launches, which dominate a decode step):
//   offsets[e] = #{j : id_j < e},  place(i) = #{j : id_j < id_i, or id_j == id_i and j < i},
//   sorted_pairs[place(i)] = i,  pos[i] = place(i).
// Plain counting over the ids staged in shared memory: exact, no atomics, same result as a
// stable sort. Ids outside [0, E) (unchecked calls) land before offsets[0] or after offsets[E],
// in no expert's rows.
constexpr int kSortMaxPairs = 1024;
constexpr int kSortThreads = 256;

__global__ void __launch_bounds__(kSortThreads)
sort_pairs_kernel(const int64_t* __restrict__ ids, int S, int64_t E,
                  int64_t* __restrict__ sorted_pairs, int64_t* __restrict__ offsets,
                  int64_t* __restrict__ pos) {
  __shared__ int sid[kSortMaxPairs];
  // Saturated, not truncated, to int: an out-of-range id (check_values=False) beyond int's range
  // must stay out of range, not wrap into [0, E). (Order is kept except among such ids.)
  for (int i = threadIdx.x; i < S; i += kSortThreads) {
    const int64_t v = ids[i];
    sid[i] = v < INT_MIN ? INT_MIN : (v > INT_MAX ? INT_MAX : static_cast<int>(v));
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e <= E; e += kSortThreads) {
    int c = 0;
    for (int j = 0; j < S; ++j) c += sid[j] < e;
    offsets[e] = c;
  }
  for (int i = threadIdx.x; i < S; i += kSortThreads) {
    const int v = sid[i];
    int place = 0;
    for (int j = 0; j < S; ++j) place += sid[j] < v || (sid[j] == v && j < i);
    sorted_pairs[place] = i;
    pos[i] = place;
  }
}

}  // namespace

cudaError_t launch_moe_experts(DType dtype, const void* x, const int64_t* sorted_pairs,
                               const int64_t* offsets, const int64_t* pos, const void* gate_up,
                               const void* down, const float* weights, int64_t T, int64_t K,
                               int64_t E, int64_t H, int64_t I, int* tile_start,
                               void* gate_up_out, void* act, void* y, void* out,
                               cudaStream_t stream) {
#define LMOE_RUN_EXPERTS(CT)                                                                    \
  return run_experts<CT>(static_cast<const CT*>(x), sorted_pairs, offsets, pos,                 \
                         static_cast<const CT*>(gate_up), static_cast<const CT*>(down), weights, \
                         T, K, E, H, I, tile_start, static_cast<CT*>(gate_up_out),              \
                         static_cast<CT*>(act), static_cast<CT*>(y), static_cast<CT*>(out),     \
                         stream)
  switch (dtype) {
    case DType::kFloat32: LMOE_RUN_EXPERTS(float);
    case DType::kBFloat16: LMOE_RUN_EXPERTS(__nv_bfloat16);
    case DType::kFloat16: LMOE_RUN_EXPERTS(__half);
  }
#undef LMOE_RUN_EXPERTS
  return cudaErrorInvalidValue;
}

int64_t moe_sort_pairs_max() { return kSortMaxPairs; }

cudaError_t launch_moe_sort_pairs(const int64_t* ids, int64_t S, int64_t E, int64_t* sorted_pairs,
                                  int64_t* offsets, int64_t* pos, cudaStream_t stream) {
  if (S <= 0 || S > kSortMaxPairs) return cudaErrorInvalidValue;
  sort_pairs_kernel<<<1, kSortThreads, 0, stream>>>(ids, static_cast<int>(S), E, sorted_pairs,
                                                    offsets, pos);
  return cudaGetLastError();
}

cudaError_t launch_moe_swiglu(DType dtype, const void* gate_up_out, int64_t S, int64_t I, void* act,
                              cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_swiglu(static_cast<const float*>(gate_up_out), S, I, static_cast<float*>(act), stream);
    case DType::kBFloat16:
      return launch_swiglu(static_cast<const __nv_bfloat16*>(gate_up_out), S, I,
                           static_cast<__nv_bfloat16*>(act), stream);
    case DType::kFloat16:
      return launch_swiglu(static_cast<const __half*>(gate_up_out), S, I, static_cast<__half*>(act), stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_moe_combine(DType dtype, const void* y, const float* weights, const int64_t* pos,
                               const int64_t* offsets, int64_t E, int64_t T, int64_t K, int64_t H,
                               void* out, cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;  // an empty output (a zero grid is a launch error)
  switch (dtype) {
    case DType::kFloat32:
      return launch_combine(static_cast<const float*>(y), weights, pos, offsets, E, T, K, H,
                            static_cast<float*>(out), stream);
    case DType::kBFloat16:
      return launch_combine(static_cast<const __nv_bfloat16*>(y), weights, pos, offsets, E, T, K, H,
                            static_cast<__nv_bfloat16*>(out), stream);
    case DType::kFloat16:
      return launch_combine(static_cast<const __half*>(y), weights, pos, offsets, E, T, K, H,
                            static_cast<__half*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_moe_swiglu_backward(DType dtype, const void* gate_up_out, const void* gau, const float* w_s,
                                       const int64_t* offsets, int64_t E, int64_t S, int64_t I, void* gh,
                                       float* grad_w, cudaStream_t stream) {
  if (S == 0) return cudaSuccess;  // (a zero grid is a launch error)
  if (S > 0x7fffffff) return cudaErrorInvalidValue;  // one block per row: beyond the 1-D grid
  const unsigned grid = static_cast<unsigned>(S);
#define LMOE_SWIGLU_BWD(CT)                                                                            \
  swiglu_backward_kernel<CT><<<grid, kSwigluBwdThreads, 0, stream>>>(static_cast<const CT*>(gate_up_out),            \
                                                       static_cast<const CT*>(gau), w_s, offsets, E, I, \
                                                       static_cast<CT*>(gh), grad_w);                  \
  return cudaGetLastError()
  switch (dtype) {
    case DType::kFloat32: { LMOE_SWIGLU_BWD(float); }
    case DType::kBFloat16: { LMOE_SWIGLU_BWD(__nv_bfloat16); }
    case DType::kFloat16: { LMOE_SWIGLU_BWD(__half); }
  }
#undef LMOE_SWIGLU_BWD
  return cudaErrorInvalidValue;
}

cudaError_t launch_moe_zero_idle(void* data, int64_t bytes_per_expert, const int64_t* offsets, int64_t E,
                                 cudaStream_t stream) {
  if (E == 0 || bytes_per_expert == 0) return cudaSuccess;
  // Up to 32 blocks of 256 threads x 16 bytes per idle expert: 11.5 MiB (gate_up at h2048 /
  // i1408 in bf16) is 90 stores per thread.
  const int64_t per = std::min<int64_t>((bytes_per_expert + 256 * 16 - 1) / (256 * 16), 32);
  if (E * per > 0x7fffffff) return cudaErrorInvalidValue;  // beyond the 1-D grid
  const unsigned grid = static_cast<unsigned>(E * per);
  auto* d = static_cast<unsigned char*>(data);
  if (bytes_per_expert % 16 == 0 && aligned16(data)) {
    zero_idle_kernel<true><<<grid, 256, 0, stream>>>(d, bytes_per_expert, offsets, static_cast<int>(per));
  } else {
    zero_idle_kernel<false><<<grid, 256, 0, stream>>>(d, bytes_per_expert, offsets, static_cast<int>(per));
  }
  return cudaGetLastError();
}

}  // namespace latentmoe::cuda
