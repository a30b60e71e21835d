// MoE routing CUDA kernels: one thread per token running the shared selection math of
// common/moe_math.h (ties -> lower index). Scores use the accurate expf on both sides, so CPU and
// GPU agree to an ulp or two; an exact near-tie can still break differently across devices.
#include "common/moe_math.h"
#include "cuda/moe/moe_launch.h"

namespace latentmoe::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void moe_route_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                                 moe::RouteParams p, int64_t T, float* __restrict__ scores,
                                 float* __restrict__ choice, float* __restrict__ weights,
                                 int64_t* __restrict__ indices) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int64_t E = p.num_experts, K = p.top_k;
  moe::route_token(logits + t * E, bias, p, scores + t * E, choice + t * E, weights + t * K,
                   indices + t * K);
}

__global__ void moe_route_backward_kernel(const float* __restrict__ grad_weights,
                                          const float* __restrict__ grad_scores,
                                          const float* __restrict__ scores,
                                          const int64_t* __restrict__ indices,
                                          moe::RouteParams p, int64_t T,
                                          float* __restrict__ grad_logits) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int64_t E = p.num_experts, K = p.top_k;
  moe::route_token_backward(grad_weights + t * K,
                            grad_scores != nullptr ? grad_scores + t * E : nullptr,
                            scores + t * E, indices + t * K, p, grad_logits + t * E);
}

unsigned blocks_for(int64_t T) { return static_cast<unsigned>((T + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_moe_route(const float* logits, const float* bias, moe::RouteParams p,
                             int64_t T, float* scores, float* choice, float* weights,
                             int64_t* indices, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  moe_route_kernel<<<blocks_for(T), kThreads, 0, stream>>>(logits, bias, p, T, scores, choice,
                                                            weights, indices);
  return cudaGetLastError();
}

cudaError_t launch_moe_route_backward(const float* grad_weights, const float* grad_scores,
                                      const float* scores, const int64_t* indices,
                                      moe::RouteParams p, int64_t T, float* grad_logits,
                                      cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  moe_route_backward_kernel<<<blocks_for(T), kThreads, 0, stream>>>(
      grad_weights, grad_scores, scores, indices, p, T, grad_logits);
  return cudaGetLastError();
}

}  // namespace latentmoe::cuda
