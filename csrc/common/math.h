// Math shared by the CPU and CUDA kernels. Float in, float out: loads and stores of bf16/fp16
// are each backend's business, so these helpers are the single source of the numerics and the
// CPU tests exercise the GPU's formulas. Not its last bits: on the device rms_rstd uses rsqrtf
// (<= 2 ulp) and fast_exp uses __expf (error growing with |x|, tiny results flushed to zero), where
// the host uses 1 / std::sqrt and std::exp; the CUDA tests compare against the reference with
// tolerances that cover this.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace latentmoe::math {

// 1 / sqrt(mean(x^2) + eps) from a sum of squares over `n` elements.
LMOE_HD float rms_rstd(float sum_sq, int n, float eps) {
  float mean = sum_sq / static_cast<float>(n);
#if defined(__CUDA_ARCH__)
  return rsqrtf(mean + eps);
#else
  return 1.0f / std::sqrt(mean + eps);
#endif
}

// d/dx of y = x * rstd(x) applied to grad_y, for one element:
//   grad_x = rstd * (grad_y - y * mean(grad_y * y))
// `mean_gy_y` is mean over the row of grad_y * y (y = x * rstd, in fp32).
LMOE_HD float rms_grad_input(float grad_y, float y, float rstd, float mean_gy_y) {
  return rstd * (grad_y - y * mean_gy_y);
}

LMOE_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

LMOE_HD float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

// expf without the device's fast approximation (__expf): for routing scores, whose last bits
// decide near-ties between experts, so CPU and GPU choose alike (both within ~1-2 ulp of exact).
LMOE_HD float accurate_exp(float x) { return expf(x); }

LMOE_HD float accurate_sigmoid(float x) { return 1.0f / (1.0f + accurate_exp(-x)); }

// Sum of x[0, n) in a fixed order that keeps the rounding error O(log n) instead of the O(n) of
// a running sum: leaves of 8 consecutive values summed in order, then the leaf sums combined as a
// balanced binary tree (a binary counter of partial sums). The CPU and the CUDA routing both call
// it, so they add in the same order. n < 8 * 2^31.
LMOE_HD float tree_sum(const float* x, int n) {
  constexpr int kLeaf = 8;
  float level[32];  // level[j]: the sum of 2^j leaves, held while bit j of `leaves` is set
  unsigned leaves = 0;
  for (int b = 0; b < n; b += kLeaf) {
    const int end = n - b < kLeaf ? n : b + kLeaf;
    float s = x[b];
    for (int i = b + 1; i < end; ++i) s += x[i];
    int j = 0;
    for (unsigned c = leaves; c & 1u; c >>= 1, ++j) s = level[j] + s;
    level[j] = s;
    ++leaves;
  }
  float total = 0.f;
  bool any = false;
  for (int j = 0; j < 32; ++j) {
    if (((leaves >> j) & 1u) == 0) continue;
    total = any ? level[j] + total : level[j];
    any = true;
  }
  return total;
}

LMOE_HD float silu(float x) { return x * sigmoid(x); }

// Online softmax state for one query row: running max `m`, running sum `l` of exp(s - m).
// `m = -inf, l = 0` is the empty state; merging with it is the identity.
struct SoftmaxState {
  float m;
  float l;
};

LMOE_HD SoftmaxState softmax_empty() { return {-INFINITY, 0.0f}; }

// Rescale factor for the accumulator when the running max moves from `m_old` to `m_new`.
LMOE_HD float softmax_rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : fast_exp(m_old - m_new);
}

// Natural-log log-sum-exp of a finished state; the empty state (l == 0) gives -inf. A NaN sum
// (a NaN score or query) stays NaN: `!(l <= 0)` rather than `l > 0`, which is false for NaN.
LMOE_HD float softmax_lse(SoftmaxState s) {
  return !(s.l <= 0.0f) ? s.m + logf(s.l) : -INFINITY;
}

// 1 / l for a finished softmax sum: 0 for the empty row (l == 0: output 0), NaN stays NaN.
LMOE_HD float softmax_inv_sum(float l) { return !(l <= 0.0f) ? 1.0f / l : 0.0f; }

// Rotate one (x1, x2) pair by angle with cos `c` and sin `s`: (x1 c - x2 s, x2 c + x1 s).
// HF's rotate_half pairs element i with i + d/2; the interleaved layout pairs 2i with 2i+1.
LMOE_HD void rope_rotate(float x1, float x2, float c, float s, float* o1, float* o2) {
  *o1 = x1 * c - x2 * s;
  *o2 = x2 * c + x1 * s;
}

}  // namespace latentmoe::math
