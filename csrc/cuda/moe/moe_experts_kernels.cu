// MoE expert CUDA kernels: a grouped GEMM whose blocks are scheduled over
// (expert, M-tile, N-tile), used twice (gate_up with the SwiGLU fused into its epilogue, then
// down), and a deterministic weighted combine. Kept deliberately simple (scalar, bounds-checked
// tile loads; no async copies or pipelining) so it is obviously correct.
//
// GEMM shape per expert e with m_e rows (rows offsets[e] .. offsets[e+1] of the sorted pairs):
//   C[r, n] = sum_k A[row(r), k] * B_e[n, k],   B_e = weight + e * N_total * Kd  (HF layout,
//   [out_features, in_features], so both operands are K-contiguous).
// A rows are gathered on the fly: for gate_up, row(r) = token of the sorted pair; for down, the
// activation row itself. M-tiles of all experts are numbered consecutively (tile_start[e] is the
// first M-tile of expert e); grid.x covers an upper bound of the tile count (surplus blocks
// exit at once), grid.y the N-tiles. With at most kDecodeMaxRows pairs (decode), a
// bandwidth-bound warp-per-output GEMV (grouped_gemv) replaces the tiled GEMM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "common/moe_math.h"
#include "cuda/common/cuda_utils.cuh"
#include "cuda/moe/moe_launch.h"

namespace latentmoe::cuda {
namespace {

constexpr int kBM = 64;
constexpr int kBN = 64;

struct GroupedProblem {
  const int64_t* offsets;      // [E+1] rows of each expert in sorted order
  const int* tile_start;       // [E+1] first M-tile of each expert
  int64_t E;
  const int64_t* sorted_pairs; // gather map (gate_up) or null (down: identity rows)
  int64_t K;                   // top-k (pair id / K = token)
  int64_t N;                   // output columns per GEMM (I for gate_up, H for down)
  int64_t Kd;                  // reduction length (H for gate_up, I for down)
  int64_t b_rows;              // rows of one expert's weight (2I or H)
};

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

// ---- tensor-core path (bf16 / fp16 in, fp32 accumulate), 4 warps, 64x64 tile --------------
constexpr int kBK = 32;
constexpr int kLd = kBK + 8;   // smem row stride of A/B tiles (elements)
constexpr int kLdc = kBN + 4;  // smem row stride of the fp32 C tiles

template <typename T, bool kSwiGLU>
__global__ void __launch_bounds__(128)
grouped_gemm_wmma(GroupedProblem p, const T* __restrict__ A, const T* __restrict__ B,
                  T* __restrict__ out, T* __restrict__ act) {
  using namespace nvcuda;
  constexpr int kTileBytes = (kBM + (kSwiGLU ? 2 : 1) * kBN) * kLd * sizeof(T);
  constexpr int kCBytes = (kSwiGLU ? 2 : 1) * kBM * kLdc * sizeof(float);
  __shared__ __align__(128) unsigned char smem[kTileBytes > kCBytes ? kTileBytes : kCBytes];
  __shared__ int64_t row_base[kBM];
  T* As = reinterpret_cast<T*>(smem);
  T* Bg = As + kBM * kLd;
  T* Bu = Bg + kBN * kLd;

  const int tile = static_cast<int>(blockIdx.x);
  if (tile >= p.tile_start[p.E]) return;
  const int64_t e = expert_of_tile(p.tile_start, p.E, tile);
  const int64_t row0 = p.offsets[e];
  const int64_t m = p.offsets[e + 1] - row0;
  const int64_t m0 = static_cast<int64_t>(tile - p.tile_start[e]) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const T* Be = B + e * p.b_rows * p.Kd;
  const int tid = threadIdx.x;
  for (int r = tid; r < kBM; r += blockDim.x) {
    const int64_t lr = m0 + r;
    int64_t src = -1;
    if (lr < m) src = p.sorted_pairs != nullptr ? p.sorted_pairs[row0 + lr] / p.K : row0 + lr;
    row_base[r] = src;
  }
  const int warp = tid / 32, wm = warp / 2, wn = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_g[2][2], acc_u[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(acc_g[i][j], 0.f);
      wmma::fill_fragment(acc_u[i][j], 0.f);
    }
  __syncthreads();
  const T zero = from_float<T>(0.f);
  for (int64_t k0 = 0; k0 < p.Kd; k0 += kBK) {
    for (int idx = tid; idx < kBM * kBK; idx += blockDim.x) {
      const int r = idx / kBK, c = idx % kBK;
      const int64_t src = row_base[r];
      As[r * kLd + c] = (src >= 0 && k0 + c < p.Kd) ? A[src * p.Kd + k0 + c] : zero;
    }
    for (int idx = tid; idx < kBN * kBK; idx += blockDim.x) {
      const int n = idx / kBK, c = idx % kBK;
      const bool ok = n0 + n < p.N && k0 + c < p.Kd;
      Bg[n * kLd + c] = ok ? Be[(n0 + n) * p.Kd + k0 + c] : zero;
      if constexpr (kSwiGLU) Bu[n * kLd + c] = ok ? Be[(p.N + n0 + n) * p.Kd + k0 + c] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * kLd + kk, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(b, Bg + (wn * 32 + j * 16) * kLd + kk, kLd);
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::mma_sync(acc_g[i][j], a[i], b, acc_g[i][j]);
        if constexpr (kSwiGLU) {
          wmma::load_matrix_sync(b, Bu + (wn * 32 + j * 16) * kLd + kk, kLd);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc_u[i][j], a[i], b, acc_u[i][j]);
        }
      }
    }
    __syncthreads();
  }
  // The A/B tiles are dead: reuse their shared memory for the fp32 C tiles.
  float* Cg = reinterpret_cast<float*>(smem);
  float* Cu = Cg + kBM * kLdc;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float* dst = Cg + (wm * 32 + i * 16) * kLdc + wn * 32 + j * 16;
      wmma::store_matrix_sync(dst, acc_g[i][j], kLdc, wmma::mem_row_major);
      if constexpr (kSwiGLU)
        wmma::store_matrix_sync(Cu + (dst - Cg), acc_u[i][j], kLdc, wmma::mem_row_major);
    }
  __syncthreads();
  for (int idx = tid; idx < kBM * kBN; idx += blockDim.x) {
    const int r = idx / kBN, c = idx % kBN;
    if (m0 + r >= m || n0 + c >= p.N) continue;
    epilogue<T, kSwiGLU>(row0 + m0 + r, n0 + c, Cg[r * kLdc + c],
                         kSwiGLU ? Cu[r * kLdc + c] : 0.f, p.N, out, act);
  }
}

// ---- fp32 path: FMA tiles, 256 threads, each owns a 4x4 (x2 for SwiGLU) sub-tile ----------
constexpr int kBKf = 16;

template <bool kSwiGLU>
__global__ void __launch_bounds__(256)
grouped_gemm_fp32(GroupedProblem p, const float* __restrict__ A, const float* __restrict__ B,
                  float* __restrict__ out, float* __restrict__ act) {
  __shared__ float As[kBKf][kBM + 1];
  __shared__ float Bg[kBKf][kBN + 1];
  __shared__ float Bu[kSwiGLU ? kBKf : 1][kBN + 1];
  __shared__ int64_t row_base[kBM];
  const int tile = static_cast<int>(blockIdx.x);
  if (tile >= p.tile_start[p.E]) return;
  const int64_t e = expert_of_tile(p.tile_start, p.E, tile);
  const int64_t row0 = p.offsets[e];
  const int64_t m = p.offsets[e + 1] - row0;
  const int64_t m0 = static_cast<int64_t>(tile - p.tile_start[e]) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const float* Be = B + e * p.b_rows * p.Kd;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  for (int r = tid; r < kBM; r += blockDim.x) {
    const int64_t lr = m0 + r;
    int64_t src = -1;
    if (lr < m) src = p.sorted_pairs != nullptr ? p.sorted_pairs[row0 + lr] / p.K : row0 + lr;
    row_base[r] = src;
  }
  float acc_g[4][4] = {}, acc_u[4][4] = {};
  __syncthreads();
  for (int64_t k0 = 0; k0 < p.Kd; k0 += kBKf) {
    for (int idx = tid; idx < kBM * kBKf; idx += blockDim.x) {
      const int r = idx / kBKf, c = idx % kBKf;
      const int64_t src = row_base[r];
      As[c][r] = (src >= 0 && k0 + c < p.Kd) ? A[src * p.Kd + k0 + c] : 0.f;
    }
    for (int idx = tid; idx < kBN * kBKf; idx += blockDim.x) {
      const int n = idx / kBKf, c = idx % kBKf;
      const bool ok = n0 + n < p.N && k0 + c < p.Kd;
      Bg[c][n] = ok ? Be[(n0 + n) * p.Kd + k0 + c] : 0.f;
      if constexpr (kSwiGLU) Bu[c][n] = ok ? Be[(p.N + n0 + n) * p.Kd + k0 + c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBKf; ++kk) {
      float a[4], bg[4], bu[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        bg[j] = Bg[kk][tx + 16 * j];
        bu[j] = kSwiGLU ? Bu[kk][tx + 16 * j] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc_g[i][j] = fmaf(a[i], bg[j], acc_g[i][j]);
          if constexpr (kSwiGLU) acc_u[i][j] = fmaf(a[i], bu[j], acc_u[i][j]);
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = m0 + ty + 16 * i, c = n0 + tx + 16 * j;
      if (r < m && c < p.N)
        epilogue<float, kSwiGLU>(row0 + r, c, acc_g[i][j], acc_u[i][j], p.N, out, act);
    }
}

// ---- decode path (few rows): one warp per (sorted row, output column) ------------------------
// Every row's dot products stream the expert's weight rows once, coalesced across the warp's
// lanes: bandwidth-bound, with none of the 64-row tile padding of the GEMM above.
constexpr int64_t kDecodeMaxRows = 64;
constexpr int kGemvWarps = 8;

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

template <typename T, bool kSwiGLU>
__global__ void __launch_bounds__(kGemvWarps * 32)
grouped_gemv(GroupedProblem p, int64_t rows, const T* __restrict__ A, const T* __restrict__ B,
             T* __restrict__ out, T* __restrict__ act) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  const int64_t r = blockIdx.y;
  if (n >= p.N || r >= rows) return;  // uniform per warp: n and r are the same for all lanes
  const int64_t e = expert_of_row(p.offsets, p.E, r);
  const int64_t src = p.sorted_pairs != nullptr ? p.sorted_pairs[r] / p.K : r;
  const T* a = A + src * p.Kd;
  const T* wg = B + (e * p.b_rows + n) * p.Kd;
  const T* wu = kSwiGLU ? B + (e * p.b_rows + p.N + n) * p.Kd : wg;
  float g = 0.f, u = 0.f;
  for (int64_t k = lane; k < p.Kd; k += 32) {
    const float av = to_float(a[k]);
    g = fmaf(av, to_float(wg[k]), g);
    if constexpr (kSwiGLU) u = fmaf(av, to_float(wu[k]), u);
  }
  g = warp_sum(g);
  if constexpr (kSwiGLU) u = warp_sum(u);
  if (lane == 0) epilogue<T, kSwiGLU>(r, n, g, u, p.N, out, act);
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

// out[t, :] = sum_k w[t*K+k] * y[pos[t*K+k], :], fp32, in k order (deterministic).
template <typename T>
__global__ void combine_kernel(const T* __restrict__ y, const float* __restrict__ w,
                               const int64_t* __restrict__ pos, int64_t K, int64_t H,
                               T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += w[t * K + k] * to_float(y[pos[t * K + k] * H + h]);
    out[t * H + h] = from_float<T>(acc);
  }
}

template <typename T, bool kSwiGLU>
cudaError_t launch_gemm(const GroupedProblem& p, dim3 grid, const T* A, const T* B, T* out,
                        T* act, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    grouped_gemm_fp32<kSwiGLU><<<grid, 256, 0, stream>>>(p, A, B, out, act);
  } else {
    grouped_gemm_wmma<T, kSwiGLU><<<grid, 128, 0, stream>>>(p, A, B, out, act);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_experts(const T* x, const int64_t* sorted_pairs, const int64_t* offsets,
                        const int64_t* pos, const T* gate_up, const T* down, const float* w,
                        int64_t T_, int64_t K, int64_t E, int64_t H, int64_t I, int* tile_start,
                        T* gate_up_out, T* act, T* y, T* out, cudaStream_t stream) {
  const int64_t S = T_ * K;
  if (S == 0) return cudaSuccess;
  if (S <= kDecodeMaxRows) {
    GroupedProblem up{offsets, nullptr, E, sorted_pairs, K, I, H, 2 * I};
    dim3 grid_up(static_cast<unsigned>((I + kGemvWarps - 1) / kGemvWarps), static_cast<unsigned>(S));
    grouped_gemv<T, true><<<grid_up, kGemvWarps * 32, 0, stream>>>(up, S, x, gate_up, gate_up_out, act);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    if (H == 0) return cudaSuccess;  // out is [T, 0]; a zero grid dimension is a launch error
    GroupedProblem dn{offsets, nullptr, E, nullptr, K, H, I, H};
    dim3 grid_dn(static_cast<unsigned>((H + kGemvWarps - 1) / kGemvWarps), static_cast<unsigned>(S));
    grouped_gemv<T, false><<<grid_dn, kGemvWarps * 32, 0, stream>>>(dn, S, act, down, y, nullptr);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    combine_kernel<T><<<static_cast<unsigned>(T_), 256, 0, stream>>>(y, w, pos, K, H, out);
    return cudaGetLastError();
  }
  tile_start_kernel<<<1, 1, 0, stream>>>(offsets, E, tile_start);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  // sum_e ceil(m_e / kBM) <= ceil(S / kBM) + min(E, S): an upper bound known on the host.
  const int64_t max_tiles = (S + kBM - 1) / kBM + (E < S ? E : S);
  GroupedProblem up{offsets, tile_start, E, sorted_pairs, K, I, H, 2 * I};
  dim3 grid_up(static_cast<unsigned>(max_tiles), static_cast<unsigned>((I + kBN - 1) / kBN));
  if (cudaError_t err = launch_gemm<T, true>(up, grid_up, x, gate_up, gate_up_out, act, stream);
      err != cudaSuccess)
    return err;
  if (H == 0) return cudaSuccess;  // out is [T, 0]; a zero grid dimension is a launch error
  GroupedProblem dn{offsets, tile_start, E, nullptr, K, H, I, H};
  dim3 grid_dn(static_cast<unsigned>(max_tiles), static_cast<unsigned>((H + kBN - 1) / kBN));
  if (cudaError_t err = launch_gemm<T, false>(dn, grid_dn, act, down, y, nullptr, stream);
      err != cudaSuccess)
    return err;
  combine_kernel<T><<<static_cast<unsigned>(T_), 256, 0, stream>>>(y, w, pos, K, H, out);
  return cudaGetLastError();
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

}  // namespace latentmoe::cuda
