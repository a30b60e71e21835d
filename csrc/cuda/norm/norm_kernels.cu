// RMSNorm CUDA kernels. One block per row; fp32 math from common/math.h (shared with CPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/math.h"
#include "cuda/common/cuda_utils.cuh"
#include "cuda/norm/norm_launch.h"

namespace latentmoe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerPartial = 64;
constexpr int64_t kMaxPartials = 65535;  // gridDim.y limit of the dw-partial launch

// Rows each dw partial sums: 64, or more once 64-row partials would exceed the grid's y limit.
int64_t rows_per_partial(int64_t rows) {
  const int64_t spread = (rows + kMaxPartials - 1) / kMaxPartials;
  return spread > kRowsPerPartial ? spread : kRowsPerPartial;
}

// A thread's share of a long row is summed in blocks of kSumSteps of its elements, each block's
// sum then added to the running one (as the CPU kernels block their lane sums): at most
// kSumSteps terms per level instead of D / blockDim. Rows of at most kSumSteps * blockDim
// elements sum as one level (0 + s = s).
constexpr int64_t kSumSteps = 256;

template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                const T* __restrict__ w, T* __restrict__ out,
                                T* __restrict__ residual_out, float* __restrict__ rstd_out,
                                int64_t D, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * D;
  float sum_sq = 0.f;
  const int64_t span = kSumSteps * blockDim.x;
  for (int64_t b = 0; b < D; b += span) {
    float blk = 0.f;
    for (int64_t i = b + threadIdx.x; i < min(D, b + span); i += blockDim.x) {
      float v = to_float(xr[i]);
      if (residual != nullptr) {
        T h = from_float<T>(v + to_float(residual[row * D + i]));
        residual_out[row * D + i] = h;
        v = to_float(h);
      }
      blk += v * v;
    }
    sum_sq += blk;
  }
  __shared__ float scratch[32];
  sum_sq = block_sum(sum_sq, scratch);
  const float rstd = math::rms_rstd(sum_sq, static_cast<int>(D), eps);
  if (threadIdx.x == 0) rstd_out[row] = rstd;
  const T* src = residual != nullptr ? residual_out + row * D : xr;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    float y = to_float(from_float<T>(to_float(src[i]) * rstd));
    out[row * D + i] = from_float<T>(y * to_float(w[i]));
  }
}

// One block per row: grad_x. grad_w partials: block b of the second kernel sums rows
// [b*rows_per_partial(rows), ...) per column, in row order.
template <typename T>
__global__ void rms_norm_backward_dx_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                            const T* __restrict__ w,
                                            const float* __restrict__ rstd, T* __restrict__ gx,
                                            int64_t D) {
  const int64_t row = blockIdx.x;
  const float rs = rstd[row];
  float dot = 0.f;
  const int64_t span = kSumSteps * blockDim.x;
  for (int64_t b = 0; b < D; b += span) {
    float blk = 0.f;
    for (int64_t i = b + threadIdx.x; i < min(D, b + span); i += blockDim.x) {
      float y = to_float(x[row * D + i]) * rs;
      blk += to_float(g[row * D + i]) * to_float(w[i]) * y;
    }
    dot += blk;
  }
  __shared__ float scratch[32];
  dot = block_sum(dot, scratch);
  const float mean_gy_y = dot / static_cast<float>(D);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    float y = to_float(x[row * D + i]) * rs;
    float gy = to_float(g[row * D + i]) * to_float(w[i]);
    gx[row * D + i] = from_float<T>(math::rms_grad_input(gy, y, rs, mean_gy_y));
  }
}

template <typename T>
__global__ void rms_norm_backward_dw_partial_kernel(const T* __restrict__ g,
                                                    const T* __restrict__ x,
                                                    const float* __restrict__ rstd,
                                                    float* __restrict__ partial, int64_t rows,
                                                    int64_t D, int64_t per_partial) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= D) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * per_partial;
  const int64_t r1 = min(rows, r0 + per_partial);
  float acc = 0.f;
  for (int64_t r = r0; r < r1; ++r) acc += to_float(g[r * D + col]) * to_float(x[r * D + col]) * rstd[r];
  partial[blockIdx.y * D + col] = acc;
}

__global__ void column_sum_kernel(const float* __restrict__ partial, float* __restrict__ out,
                                  int64_t n, int64_t D) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= D) return;
  float acc = 0.f;
  for (int64_t p = 0; p < n; ++p) acc += partial[p * D + col];
  out[col] = acc;
}

template <typename T>
cudaError_t rms_norm_typed(const void* x, const void* residual, const void* w, void* out,
                           void* residual_out, float* rstd, int64_t rows, int64_t D, float eps,
                           cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;  // one block per row: the 1-D grid's limit
  rms_norm_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(w),
      static_cast<T*>(out), static_cast<T*>(residual_out), rstd, D, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t rms_norm_backward_typed(const void* g, const void* x, const void* w, const float* rstd,
                                    void* gx, float* gw_partial, float* gw_f32, int64_t rows,
                                    int64_t D, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;  // one block per row: the 1-D grid's limit
  rms_norm_backward_dx_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(g), static_cast<const T*>(x), static_cast<const T*>(w), rstd,
      static_cast<T*>(gx), D);
  const int64_t n_partials = rms_norm_backward_partials(rows);
  dim3 grid(static_cast<unsigned>((D + kThreads - 1) / kThreads), static_cast<unsigned>(n_partials));
  rms_norm_backward_dw_partial_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(g), static_cast<const T*>(x), rstd, gw_partial, rows, D, rows_per_partial(rows));
  column_sum_kernel<<<static_cast<unsigned>((D + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      gw_partial, gw_f32, n_partials, D);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rms_norm(DType dtype, const void* x, const void* residual, const void* w,
                            void* out, void* residual_out, float* rstd, int64_t rows, int64_t D,
                            float eps, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return rms_norm_typed<float>(x, residual, w, out, residual_out, rstd, rows, D, eps, stream);
    case DType::kBFloat16:
      return rms_norm_typed<__nv_bfloat16>(x, residual, w, out, residual_out, rstd, rows, D, eps, stream);
    case DType::kFloat16:
      return rms_norm_typed<__half>(x, residual, w, out, residual_out, rstd, rows, D, eps, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t rms_norm_backward_partials(int64_t rows) {
  const int64_t per = rows_per_partial(rows);
  return (rows + per - 1) / per;  // at most kMaxPartials
}

cudaError_t launch_rms_norm_backward(DType dtype, const void* g, const void* x, const void* w,
                                     const float* rstd, void* gx, float* gw_partial,
                                     float* gw_f32, int64_t rows, int64_t D, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return rms_norm_backward_typed<float>(g, x, w, rstd, gx, gw_partial, gw_f32, rows, D, stream);
    case DType::kBFloat16:
      return rms_norm_backward_typed<__nv_bfloat16>(g, x, w, rstd, gx, gw_partial, gw_f32, rows, D, stream);
    case DType::kFloat16:
      return rms_norm_backward_typed<__half>(g, x, w, rstd, gx, gw_partial, gw_f32, rows, D, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace latentmoe::cuda
