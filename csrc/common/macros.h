// Portable qualifiers so one helper compiles for host (g++) and device (nvcc).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LMOE_HD __host__ __device__ __forceinline__
#else
#define LMOE_HD inline
#endif
