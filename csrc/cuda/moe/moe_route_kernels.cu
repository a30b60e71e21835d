// MoE routing CUDA kernels. Forward: one warp per token (E <= 1024), the experts spread over the
// lanes (expert e in lane e % 32, register e / 32), with the selection rules of
// common/moe_math.h: group scores = sum of the two largest choice scores of the group, groups
// and experts picked greedily, ties -> lower index, the softmax denominator (math::tree_sum) and
// the weight sum added in the shared code's order, so CPU and GPU make the same picks.
// Larger E: one thread per token running moe::route_token itself. Scores use the accurate expf on
// both sides, so CPU and GPU agree to an ulp or two; an exact near-tie can still break
// differently across devices. Backward: one thread per token (moe::route_token_backward).
#include "common/moe_math.h"
#include "cuda/common/cuda_utils.cuh"
#include "cuda/moe/moe_launch.h"

namespace latentmoe::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRouteWarps = 4;      // tokens per block of the warp kernel
constexpr int kMaxGroups = 64;      // as moe::route_token
constexpr int kMaxWarpExperts = 1024;

// (value, index) candidates of the top-k argmax: index -1 = none. Better = larger value, ties to
// the lower index (NaN never enters: excluded experts are not candidates).
__device__ __forceinline__ void better_of(float& v, int& i, float& s, float ov, int oi, float os) {
  if (oi >= 0 && (i < 0 || ov > v || (ov == v && oi < i))) {
    v = ov;
    i = oi;
    s = os;
  }
}

template <int NPL>  // experts per lane: E <= 32 * NPL
__global__ void __launch_bounds__(kRouteWarps * 32)
moe_route_warp_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                      moe::RouteParams p, int64_t T, float* __restrict__ scores,
                      float* __restrict__ weights, int64_t* __restrict__ indices) {
  extern __shared__ float ex_s[];  // [kRouteWarps, E] exps of the softmax (softmax only)
  __shared__ float gscore_s[kRouteWarps * kMaxGroups];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= T) return;  // whole warps only; no block-wide barrier below
  const int E = p.num_experts, K = p.top_k;
  const float* lg = logits + t * E;
  float s[NPL], c[NPL];
  if (p.score_func == moe::kSigmoid) {
#pragma unroll
    for (int j = 0; j < NPL; ++j) {
      const int e = lane + 32 * j;
      s[j] = e < E ? math::accurate_sigmoid(lg[e]) : 0.f;
    }
  } else {
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < NPL; ++j) {
      const int e = lane + 32 * j;
      if (e < E) m = lg[e] > m ? lg[e] : m;
    }
    m = warp_max(m);
    float* ex = ex_s + warp * E;
#pragma unroll
    for (int j = 0; j < NPL; ++j) {
      const int e = lane + 32 * j;
      s[j] = e < E ? math::accurate_exp(lg[e] - m) : 0.f;
      if (e < E) ex[e] = s[j];
    }
    __syncwarp();
    float sum = 0.f;  // by one lane, in the shared code's order (math::tree_sum)
    if (lane == 0) sum = math::tree_sum(ex, E);
    sum = warp_sum(sum);  // the other lanes add zeros: exact
    const float inv = 1.f / sum;
#pragma unroll
    for (int j = 0; j < NPL; ++j) s[j] *= inv;
  }
  float nan_score = 0.f;  // 1 when a score or bias of the token is NaN (moe::routed_weight)
#pragma unroll
  for (int j = 0; j < NPL; ++j) {
    const int e = lane + 32 * j;
    const float v = s[j] + (bias != nullptr && e < E ? bias[e] : 0.f);
    if (e < E && moe::is_nan(v)) nan_score = 1.f;  // a NaN score or bias (as route_token)
    c[j] = e < E ? (moe::is_nan(v) ? -INFINITY : v) : NAN;  // NaN: not a candidate
  }
  nan_score = warp_max(nan_score);
  if (p.n_group > 1) {
    const int gs = E / p.n_group;
    float* gscore = gscore_s + warp * kMaxGroups;
    for (int g = 0; g < p.n_group; ++g) {
      // The two largest values of the group (a multiset: a tie counts twice).
      float t1 = -INFINITY, t2 = -INFINITY;
#pragma unroll
      for (int j = 0; j < NPL; ++j) {
        const int e = lane + 32 * j;
        if (e < E && e / gs == g) {
          const float v = c[j];
          if (v > t1) {
            t2 = t1;
            t1 = v;
          } else if (v > t2) {
            t2 = v;
          }
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float o1 = __shfl_xor_sync(0xffffffffu, t1, o), o2 = __shfl_xor_sync(0xffffffffu, t2, o);
        const float hi = fmaxf(t1, o1), lo = fminf(t1, o1);
        t2 = fmaxf(lo, fmaxf(t2, o2));
        t1 = hi;
      }
      if (lane == 0) {
        const float gsum = gs == 1 ? t1 : t1 + t2;
        gscore[g] = moe::is_nan(gsum) ? -INFINITY : gsum;  // as route_token: ranks last, never excluded
      }
    }
    __syncwarp();
    uint64_t kept = 0;  // the same greedy picks in every lane
    for (int j = 0; j < p.topk_group; ++j) {
      __syncwarp();
      const int g = moe::argmax_skip_nan(gscore, p.n_group);
      kept |= uint64_t{1} << g;
      __syncwarp();  // every lane read gscore before lane 0 marks the pick
      if (lane == 0) gscore[g] = NAN;
    }
#pragma unroll
    for (int j = 0; j < NPL; ++j) {
      const int e = lane + 32 * j;
      if (e < E && !((kept >> (e / gs)) & 1)) c[j] = NAN;
    }
  }
  float sum = 0.f;
  for (int k = 0; k < K; ++k) {
    float bv = 0.f, bs = 0.f;
    int bi = -1;
#pragma unroll
    for (int j = 0; j < NPL; ++j) {  // ascending e within the lane: ties keep the lower index
      if (!moe::is_nan(c[j]) && (bi < 0 || c[j] > bv)) {
        bv = c[j];
        bi = lane + 32 * j;
        bs = s[j];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o), os = __shfl_xor_sync(0xffffffffu, bs, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      better_of(bv, bi, bs, ov, oi, os);
    }
    // bi >= 0: K <= the number of kept experts (host-checked).
#pragma unroll
    for (int j = 0; j < NPL; ++j)
      if (lane + 32 * j == bi) c[j] = NAN;
    sum += bs;
    if (lane == 0) {
      indices[t * K + k] = bi;
      weights[t * K + k] = bs;
    }
  }
  if (lane == 0) {
    for (int k = 0; k < K; ++k) {  // divide then scale, as the shared code (and HF)
      const float w = weights[t * K + k];
      weights[t * K + k] = moe::routed_weight(p.norm_topk_prob ? (w / (sum + moe::kNormEps)) * p.routed_scaling_factor
                                                               : w * p.routed_scaling_factor,
                                              nan_score != 0.f);
    }
  }
#pragma unroll
  for (int j = 0; j < NPL; ++j) {
    const int e = lane + 32 * j;
    if (e < E) scores[t * E + e] = s[j];
  }
}

template <int NPL>
cudaError_t launch_route_warp(const float* logits, const float* bias, const moe::RouteParams& p, int64_t T,
                              float* scores, float* weights, int64_t* indices, cudaStream_t stream) {
  const size_t smem = p.score_func == moe::kSoftmax ? sizeof(float) * kRouteWarps * p.num_experts : 0;
  const unsigned blocks = static_cast<unsigned>((T + kRouteWarps - 1) / kRouteWarps);
  moe_route_warp_kernel<NPL><<<blocks, kRouteWarps * 32, smem, stream>>>(logits, bias, p, T, scores, weights,
                                                                         indices);
  return cudaGetLastError();
}

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

// The warp kernels keep a token's choice scores in registers; only the one-thread-per-token
// kernel needs the [T, E] scratch.
bool moe_route_needs_scratch(const moe::RouteParams& p) {
  return !(p.n_group <= kMaxGroups && p.num_experts <= kMaxWarpExperts);
}

cudaError_t launch_moe_route(const float* logits, const float* bias, moe::RouteParams p,
                             int64_t T, float* scores, float* choice, float* weights,
                             int64_t* indices, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if ((T + kRouteWarps - 1) / kRouteWarps > 0x7fffffff) return cudaErrorInvalidValue;  // beyond the 1-D grid
  const int E = p.num_experts;
  if (!moe_route_needs_scratch(p)) {
    if (E <= 32) return launch_route_warp<1>(logits, bias, p, T, scores, weights, indices, stream);
    if (E <= 64) return launch_route_warp<2>(logits, bias, p, T, scores, weights, indices, stream);
    if (E <= 128) return launch_route_warp<4>(logits, bias, p, T, scores, weights, indices, stream);
    if (E <= 256) return launch_route_warp<8>(logits, bias, p, T, scores, weights, indices, stream);
    if (E <= 512) return launch_route_warp<16>(logits, bias, p, T, scores, weights, indices, stream);
    return launch_route_warp<32>(logits, bias, p, T, scores, weights, indices, stream);
  }
  if (choice == nullptr) return cudaErrorInvalidValue;
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
