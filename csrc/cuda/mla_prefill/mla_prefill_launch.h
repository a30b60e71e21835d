// Launchers of the MLA prefill CUDA kernels: raw pointers, no torch types, so the .cu file
// compiles without torch headers. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/mla_prefill_math.h"

namespace latentmoe::cuda {

// Dynamic shared memory (bytes) one block of each kernel needs for these head dims (forward: with
// the smallest query tile; the launcher takes a larger tile when the device has room).
size_t mla_prefill_forward_smem_bytes(const mla_prefill::Params& p);
size_t mla_prefill_backward_smem_bytes(const mla_prefill::Params& p);

// out [B, S, H, Dv] (contiguous, dtype) and lse [B, S, H] fp32. `seqlens` [B] int32 on device,
// already validated to lie in [0, Lmax]; `block_table` [B, max_pages] int32 (contiguous, entries
// validated) for a paged cache, nullptr for a contiguous one (p.page_size == 0).
cudaError_t launch_mla_prefill_forward(DType dtype, const mla_prefill::Params& p, const void* q_nope,
                                       const void* q_pe, const void* latent_cache, const int32_t* block_table,
                                       const int32_t* seqlens,
                                       const void* w_uk, const void* w_uv, void* out, float* lse,
                                       cudaStream_t stream);

// grad_out / out [B, S, H, Dv] contiguous (dtype), grad_lse / lse [B, S, H] fp32 contiguous.
// Writes grad_q_nope [B, S, H, Dn] and grad_q_pe [B, S, H, R] (contiguous, dtype) and ADDS into
// the zero-initialised fp32 accumulators grad_cache (the cache's shape, contiguous), grad_w_uk [H, Dn, C],
// grad_w_uv [H, Dv, C] (atomics). `delta` [B, S, H] fp32 is scratch (dO . O - dlse per query).
cudaError_t launch_mla_prefill_backward(DType dtype, const mla_prefill::Params& p, const void* grad_out,
                                        const float* grad_lse, const void* q_nope, const void* q_pe,
                                        const void* latent_cache, const int32_t* block_table,
                                        const int32_t* seqlens, const void* w_uk,
                                        const void* w_uv, const void* out, const float* lse,
                                        void* grad_q_nope, void* grad_q_pe, float* grad_cache,
                                        float* grad_w_uk, float* grad_w_uv, float* delta, cudaStream_t stream);

}  // namespace latentmoe::cuda
