// Launchers of the RMSNorm CUDA kernels: raw pointers, no torch types, so the .cu file
// compiles without torch headers. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace latentmoe::cuda {

// out[r, :] = w * to_dtype(x[r, :] * rstd[r]); if `residual` is non-null, x is first replaced by
// h = x + residual, written to `residual_out`.
cudaError_t launch_rms_norm(DType dtype, const void* x, const void* residual, const void* w,
                            void* out, void* residual_out, float* rstd, int64_t rows, int64_t D,
                            float eps, cudaStream_t stream);

// grad_x and per-block grad_w partials [n_partials, D] (fp32), then the ordered column sum into
// grad_w_f32 [D]. `n_partials` is returned by rms_norm_backward_partials(rows).
int64_t rms_norm_backward_partials(int64_t rows);
cudaError_t launch_rms_norm_backward(DType dtype, const void* g, const void* x, const void* w,
                                     const float* rstd, void* gx, float* gw_partial,
                                     float* gw_f32, int64_t rows, int64_t D, cudaStream_t stream);

}  // namespace latentmoe::cuda
