// Helpers for CUDA binding files (which include torch): dtype tags and launch-error checks.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "common/dtype.h"

namespace latentmoe::cuda {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_VALUE(false, "latentmoe: unsupported dtype ", t);
  }
}

inline void check_launch(const char* op, cudaError_t err) {
  if (err != cudaSuccess) {
    // A failed API call (an attribute, a launch configuration) also leaves the runtime's
    // last-error state set; clear it so the next, unrelated CUDA call does not report it.
    (void)cudaGetLastError();
    TORCH_CHECK(false, "latentmoe.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace latentmoe::cuda
