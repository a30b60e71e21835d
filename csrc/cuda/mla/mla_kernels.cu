// MLA CUDA kernels: split-KV absorbed decode on the latent cache + LSE merge, and the fused
// cache append. Math shared with the CPU kernels lives in common/mla_math.h and common/math.h.
//
// Decode: grid (n_splits, row groups, B). A block owns kRows query rows (row = (s, h)) of one
// batch row and one contiguous split of the keys. Per tile of kTile keys it stages the cache rows
// in shared memory as fp32 (read once, used by all kRows rows), computes the kRows x kTile scores
// (thread = (row, key)), runs the online softmax per row in one warp (warp = row, lane = key),
// and accumulates p . c_kv into registers (thread owns columns tid + j * kThreads).
// Partials (m, l, unnormalised accumulators) go to a workspace that the merge kernel combines.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/math.h"
#include "common/mla_math.h"
#include "cuda/common/cuda_utils.cuh"
#include "cuda/mla/mla_launch.h"

namespace latentmoe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 8;    // query rows per block == warps per block
constexpr int kTile = 32;   // keys per tile == lanes per warp
constexpr int kMaxCpt = 8;  // accumulator columns per thread: C <= kThreads * kMaxCpt
constexpr int64_t kMinSplitKeys = 256;
static_assert(kRows * kTile == kThreads, "one thread per (row, key) score");

__host__ __device__ inline int64_t tile_stride(int64_t D) { return D % 2 == 0 ? D + 1 : D; }

template <typename T, int CPT>
__global__ void __launch_bounds__(kThreads) mla_decode_split_kernel(MlaDecodeArgs a) {
  extern __shared__ float smem[];
  const int64_t C = a.C, R = a.R, D = C + R, KS = tile_stride(D);
  float* qs = smem;                 // [kRows, D]
  float* ks = qs + kRows * D;       // [kTile, KS]
  float* ps = ks + kTile * KS;      // [kRows, kTile]
  float* alpha_s = ps + kRows * kTile;  // [kRows]
  __shared__ int64_t lo_s[kRows], hi_s[kRows];

  const T* q_latent = static_cast<const T*>(a.q_latent);
  const T* q_pe = static_cast<const T*>(a.q_pe);
  const T* cache = static_cast<const T*>(a.kv_cache);
  const T* pe_src = static_cast<const T*>(a.pe_src);
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.z, sp = blockIdx.x;
  const int64_t rows = a.Sq * a.H;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int nrows = static_cast<int>(rows - r0 < kRows ? rows - r0 : kRows);
  int64_t seqlen = a.seqlens[b];
  // Host-checked, or (unchecked calls) cut to what the splits cover: never past the cache.
  const int64_t cap = a.capacity < a.max_seqlen ? a.capacity : a.max_seqlen;
  seqlen = seqlen < 0 ? 0 : (seqlen > cap ? cap : seqlen);

  for (int64_t i = tid; i < kRows * D; i += kThreads) {
    const int64_t r = i / D, c = i % D;
    float v = 0.f;
    if (r < nrows) {
      const int64_t off = b * rows + r0 + r;
      v = c < C ? to_float(q_latent[off * C + c]) : to_float(q_pe[off * R + (c - C)]);
    }
    qs[i] = v * a.scale;
  }
  if (tid < kRows) {
    mla::KeyRange kr{0, 0};
    if (tid < nrows) kr = mla::visible_keys(seqlen, a.Sq, (r0 + tid) / a.H, a.causal, a.window);
    lo_s[tid] = kr.lo;
    hi_s[tid] = kr.hi;
  }
  __syncthreads();
  int64_t lo_all = seqlen, hi_all = 0;
  for (int r = 0; r < nrows; ++r) {
    if (hi_s[r] > lo_s[r]) {
      lo_all = min(lo_all, lo_s[r]);
      hi_all = max(hi_all, hi_s[r]);
    }
  }
  // Splits tile [0, max_seqlen): sized by the longest row, not the capacity, so a large cache
  // holding short rows launches no idle blocks. Keys past a row's seqlen are never read.
  const int64_t split_len = a.max_seqlen > 0 ? (a.max_seqlen + a.n_splits - 1) / a.n_splits : 1;
  const int64_t k_begin = max(lo_all, sp * split_len);
  const int64_t k_end = min(hi_all, (sp + 1) * split_len);

  const int warp = tid >> 5, lane = tid & 31;
  float m_run = -INFINITY, l_run = 0.f;  // state of row `warp`, replicated in its lanes
  float acc[kRows][CPT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int j = 0; j < CPT; ++j) acc[r][j] = 0.f;

  for (int64_t t0 = k_begin; t0 < k_end; t0 += kTile) {
    __syncthreads();  // previous tile fully consumed
    for (int64_t i = tid; i < kTile * D; i += kThreads) {
      const int64_t k = i / D, c = i % D, t = t0 + k;
      float v = 0.f;
      if (t < k_end) {
        const int64_t row = mla::cache_row(a.block_table, a.max_pages, a.page_size, a.lmax, a.num_pages, b, t);
        v = c < C ? to_float(cache[row * a.kv_stride + c]) : to_float(pe_src[row * a.pe_stride + (c - C)]);
      }
      ks[k * KS + c] = v;
    }
    __syncthreads();
    // Scores: warp = query row, lane = key.
    const int64_t t = t0 + lane;
    float s = -INFINITY;
    if (warp < nrows && t < k_end && t >= lo_s[warp] && t < hi_s[warp]) {
      const float* q = qs + warp * D;
      const float* k = ks + lane * KS;
      float dot = 0.f;
      for (int64_t c = 0; c < D; ++c) dot = fmaf(q[c], k[c], dot);
      s = dot;
    }
    const float m_new = fmaxf(m_run, warp_max(s));
    const float p = s == -INFINITY ? 0.f : math::fast_exp(s - m_new);
    const float alpha = math::softmax_rescale(m_run, m_new);
    l_run = l_run * alpha + warp_sum(p);
    m_run = m_new;
    ps[warp * kTile + lane] = p;
    if (lane == 0) alpha_s[warp] = alpha;
    __syncthreads();
    const int kn = static_cast<int>(k_end - t0 < kTile ? k_end - t0 : kTile);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= nrows) break;
      const float al = alpha_s[r];
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int64_t c = tid + j * kThreads;
        if (c < C) {
          float v = acc[r][j] * al;
          for (int k = 0; k < kn; ++k) v = fmaf(ps[r * kTile + k], ks[k * KS + c], v);
          acc[r][j] = v;
        }
      }
    }
  }
  const int64_t pbase = (b * a.n_splits + sp) * rows + r0;
  if (lane == 0 && warp < nrows) {
    a.part_m[pbase + warp] = m_run;
    a.part_l[pbase + warp] = l_run;
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= nrows) break;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int64_t c = tid + j * kThreads;
      if (c < C) a.part_acc[(pbase + r) * C + c] = acc[r][j];
    }
  }
}

// One block per (b, row): combine the splits by LSE, normalise, write out and lse.
template <typename T>
__global__ void mla_decode_merge_kernel(MlaDecodeArgs a) {
  const int64_t rows = a.Sq * a.H;
  const int64_t br = blockIdx.x, b = br / rows, r = br % rows;
  float m_max = -INFINITY;
  for (int64_t sp = 0; sp < a.n_splits; ++sp) {
    const int64_t i = (b * a.n_splits + sp) * rows + r;
    if (a.part_l[i] > 0.f) m_max = fmaxf(m_max, a.part_m[i]);
  }
  float l_sum = 0.f;
  for (int64_t sp = 0; sp < a.n_splits; ++sp) {
    const int64_t i = (b * a.n_splits + sp) * rows + r;
    l_sum += mla::merge_weight(a.part_m[i], a.part_l[i], m_max) * a.part_l[i];
  }
  const float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;
  T* out = static_cast<T*>(a.out);
  for (int64_t c = threadIdx.x; c < a.C; c += blockDim.x) {
    float o = 0.f;
    for (int64_t sp = 0; sp < a.n_splits; ++sp) {
      const int64_t i = (b * a.n_splits + sp) * rows + r;
      const float w = mla::merge_weight(a.part_m[i], a.part_l[i], m_max);
      if (w != 0.f) o += w * a.part_acc[i * a.C + c];
    }
    out[br * a.C + c] = from_float<T>(o * inv);
  }
  if (threadIdx.x == 0) a.lse[br] = math::softmax_lse({m_max, l_sum});
}

template <typename T, int CPT>
cudaError_t decode_typed_cpt(const MlaDecodeArgs& a, cudaStream_t stream) {
  const size_t smem = mla_decode_smem_bytes(a.C + a.R);
  auto kernel = mla_decode_split_kernel<T, CPT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t rows = a.Sq * a.H;
  dim3 grid(static_cast<unsigned>(a.n_splits), static_cast<unsigned>((rows + kRows - 1) / kRows),
            static_cast<unsigned>(a.B));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  mla_decode_merge_kernel<T><<<static_cast<unsigned>(a.B * rows), 128, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t decode_typed(const MlaDecodeArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.Sq * a.H == 0) return cudaSuccess;
  const int64_t cpt = (a.C + kThreads - 1) / kThreads;
  if (cpt <= 1) return decode_typed_cpt<T, 1>(a, stream);
  if (cpt <= 2) return decode_typed_cpt<T, 2>(a, stream);
  if (cpt <= 4) return decode_typed_cpt<T, 4>(a, stream);
  if (cpt <= kMaxCpt) return decode_typed_cpt<T, kMaxCpt>(a, stream);
  return cudaErrorInvalidValue;
}

// ---- append ------------------------------------------------------------------------------------

template <typename T>
__global__ void mla_append_kernel(MlaAppendArgs a) {
  extern __shared__ float sm[];  // x, cos, sin, out: 4 * R floats
  __shared__ float scratch[32];
  const int64_t bs = blockIdx.x, b = bs / a.S, s = bs % a.S;
  const int64_t C = a.C, R = a.R, D = C + R;
  const T* latent = static_cast<const T*>(a.kv_latent) + bs * C;
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
  float* x = sm;
  float* cs = x + R;
  float* sn = cs + R;
  float* o = sn + R;
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) {
    x[i] = to_float(static_cast<const T*>(a.k_pe)[bs * R + i]);
    cs[i] = to_float(static_cast<const T*>(a.cos)[bs * R + i]);
    sn[i] = to_float(static_cast<const T*>(a.sin)[bs * R + i]);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < R / 2; i += blockDim.x) mla::rope_pair(x, cs, sn, R / 2, i, a.interleave, o);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) dst[C + i] = from_float<T>(o[i]);
}

template <typename T>
cudaError_t append_typed(const MlaAppendArgs& a, cudaStream_t stream) {
  if (a.B * a.S == 0) return cudaSuccess;
  const size_t smem = 4 * static_cast<size_t>(a.R) * sizeof(float);
  mla_append_kernel<T><<<static_cast<unsigned>(a.B * a.S), 128, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int64_t mla_decode_num_splits(int64_t B, int64_t rows, int64_t max_seqlen, int sm_count) {
  const int64_t blocks = B * ((rows + kRows - 1) / kRows);
  const int64_t want = (2 * static_cast<int64_t>(sm_count) + blocks - 1) / blocks;
  const int64_t most = (max_seqlen + kMinSplitKeys - 1) / kMinSplitKeys;
  int64_t n = want < most ? want : most;
  if (n > 65535) n = 65535;
  return n < 1 ? 1 : n;
}

size_t mla_decode_smem_bytes(int64_t D) {
  return sizeof(float) * static_cast<size_t>(kRows * D + kTile * tile_stride(D) + kRows * kTile + kRows);
}

int64_t mla_decode_max_c() { return static_cast<int64_t>(kThreads) * kMaxCpt; }

cudaError_t launch_mla_decode(DType dtype, const MlaDecodeArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return decode_typed<float>(a, stream);
    case DType::kBFloat16: return decode_typed<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return decode_typed<__half>(a, stream);
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

}  // namespace latentmoe::cuda
