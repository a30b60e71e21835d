// Launchers of the MoE CUDA kernels: raw pointers, no torch types (the .cu files include no
// torch headers). Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/moe_math.h"

namespace latentmoe::cuda {

// One thread per token runs moe::route_token (the CPU kernel's code). `choice` is [T, E] fp32
// scratch, used only where moe_route_needs_scratch(p) (else it may be null); bias may be null.
// Writes scores [T, E], weights [T, K], indices [T, K].
bool moe_route_needs_scratch(const moe::RouteParams& p);
cudaError_t launch_moe_route(const float* logits, const float* bias, moe::RouteParams p,
                             int64_t T, float* scores, float* choice, float* weights,
                             int64_t* indices, cudaStream_t stream);

// grad_logits [T, E] from grad_weights [T, K] and optional grad_scores [T, E].
cudaError_t launch_moe_route_backward(const float* grad_weights, const float* grad_scores,
                                      const float* scores, const int64_t* indices,
                                      moe::RouteParams p, int64_t T, float* grad_logits,
                                      cudaStream_t stream);

// Stable sort of the S flat expert ids (pair ids t*K+j) by expert, for 0 < S <=
// moe_sort_pairs_max(), in one launch: sorted_pairs [S] (pair ids grouped by expert, in pair
// order within an expert), offsets [E+1], pos [S] (inverse of sorted_pairs). The ids must be in
// [0, E). The same result as a stable sort + searchsorted + scatter.
int64_t moe_sort_pairs_max();
cudaError_t launch_moe_sort_pairs(const int64_t* ids, int64_t S, int64_t E, int64_t* sorted_pairs,
                                  int64_t* offsets, int64_t* pos, cudaStream_t stream);

// Routed SwiGLU experts given the expert-sorted (token, k) pairs.
//   x [T, H]; sorted_pairs [S = T*K] (pair ids t*K+j, grouped by expert); offsets [E+1];
//   pos [S] inverse of sorted_pairs; gate_up [E, 2I, H]; down [E, H, I]; weights [S] fp32 in
//   pair order. Scratch: tile_start [E+1] int32, act [S, I], y [S, H] (dtype).
//   Outputs: gate_up_out [S, 2I] (pre-activation, sorted order), out [T, H].
// Grouped GEMM tiles (64 rows x 128 weight rows) are scheduled over (expert, M-tile, N-tile);
// experts with no rows get no tiles. bf16/fp16 use tensor cores (WMMA, fp32 accumulate, 4-stage
// cp.async pipeline); fp32 uses FMA tiles with 4x8 register micro-tiles. With at most 64 pairs
// (decode) a bandwidth-bound GEMV (one warp per expert and output column) runs instead. Loads
// and stores are 16-byte vectors where the sizes and pointer alignments allow, element-wise
// otherwise.
cudaError_t launch_moe_experts(DType dtype, const void* x, const int64_t* sorted_pairs,
                               const int64_t* offsets, const int64_t* pos, const void* gate_up,
                               const void* down, const float* weights, int64_t T, int64_t K,
                               int64_t E, int64_t H, int64_t I, int* tile_start,
                               void* gate_up_out, void* act, void* y, void* out,
                               cudaStream_t stream);

// The grouped forward's steps around at::_grouped_mm (csrc/cpu/moe.cpp, experts_forward_grouped)
// and the backward's idle-expert zeroing, as kernels (one launch each instead of several ATen
// elementwise passes).
// act [S, I] = moe::swiglu(gate_up_out[:, :I], gate_up_out[:, I:]) in fp32, rounded to dtype.
cudaError_t launch_moe_swiglu(DType dtype, const void* gate_up_out, int64_t S, int64_t I, void* act,
                              cudaStream_t stream);
// out [T, H] = sum over k (in k order, fp32) of weights[t*K+k] * y[pos[t*K+k]], pairs whose row
// lies outside [offsets[0], offsets[E]) skipped: the kernels' own combine. weights fp32 [T*K].
cudaError_t launch_moe_combine(DType dtype, const void* y, const float* weights, const int64_t* pos,
                               const int64_t* offsets, int64_t E, int64_t T, int64_t K, int64_t H,
                               void* out, cudaStream_t stream);
// The backward's SwiGLU step over the S sorted rows: gh [S, 2I] (dtype) = [ga * da/dg | ga * da/du]
// with ga = gau [S, I] (dtype) times w_s [S] (fp32), and grad_w [S] (fp32) = sum_i gau * act (act
// recomputed and rounded to dtype as the forward stored it); rows outside [offsets[0],
// offsets[E]) get zeros (their gate_up_out / gau rows are not read).
cudaError_t launch_moe_swiglu_backward(DType dtype, const void* gate_up_out, const void* gau, const float* w_s,
                                       const int64_t* offsets, int64_t E, int64_t S, int64_t I, void* gh,
                                       float* grad_w, cudaStream_t stream);
// Zeroes the bytes_per_expert bytes of data at e * bytes_per_expert for every expert e with no
// rows (offsets[e + 1] == offsets[e]), and touches nothing else.
cudaError_t launch_moe_zero_idle(void* data, int64_t bytes_per_expert, const int64_t* offsets, int64_t E,
                                 cudaStream_t stream);

}  // namespace latentmoe::cuda
