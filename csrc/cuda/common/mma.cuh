// Warp-level tensor-core multiply-accumulate: D = A (16x16) * B (16x8) + D, bf16 or fp16 operands,
// fp32 accumulators (PTX mma.sync.aligned.m16n8k16.row.col, sm_80+). Fragment layouts are the
// PTX ISA's; with g = lane / 4 and t = lane % 4, each 32-bit register holds two 16-bit values,
// the lower-indexed one in its low half:
//   A (row-major 16x16): a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                        a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8, k x n):     b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   D (16x8, fp32):      d[0], d[1] = D[g][2t], D[g][2t+1]   d[2], d[3] = D[g+8][2t], D[g+8][2t+1]
// All 32 lanes of the warp must execute it together (warp-uniform control flow).
// tests/mla_decode_emulation/emu.h defines LATENTMOE_EMULATED_MMA and its own mma_16816 (a warp
// collective with these layouts), so the host emulation runs the same kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace latentmoe::cuda {

#ifndef LATENTMOE_EMULATED_MMA
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "16-bit operands");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // launchers pick tensor-core kernels only on sm_80+ devices
#endif
}
#endif

}  // namespace latentmoe::cuda
