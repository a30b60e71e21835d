// DeepSeek-V3 routing math shared by the CPU and CUDA kernels: one token at a time, fp32, plain
// loops over the experts. The CPU kernel runs it per token in parallel; the CUDA kernel runs it
// with one thread per token, so both backends make exactly the same selections.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/math.h"

namespace latentmoe::moe {

enum ScoreFunc : int { kSigmoid = 0, kSoftmax = 1 };

struct RouteParams {
  int num_experts;  // E
  int top_k;        // K, 1 <= K <= topk_group * E / n_group
  int n_group;      // E % n_group == 0
  int topk_group;   // 1 <= topk_group <= n_group
  int score_func;   // ScoreFunc
  bool norm_topk_prob;
  float routed_scaling_factor;
};

constexpr float kNormEps = 1e-20f;

LMOE_HD bool is_nan(float v) { return v != v; }

// Index of the largest non-NaN entry of x[0, n) (strictly greater wins: ties -> lower index), or
// -1 when every entry is NaN. NaN marks "excluded" (masked group or already chosen).
LMOE_HD int argmax_skip_nan(const float* x, int n) {
  int best = -1;
  float best_v = 0.f;
  for (int i = 0; i < n; ++i) {
    const float v = x[i];
    if (is_nan(v)) continue;
    if (best < 0 || v > best_v) {
      best = i;
      best_v = v;
    }
  }
  return best;
}

// The K largest non-NaN entries of x[0, n) in descending order, ties -> lower index: the picks of
// K calls of argmax_skip_nan that each mark their pick NaN, in one pass (each entry is compared
// with the K-th best so far, and only the few that beat it are inserted; at E = 256, K = 8 the K
// passes cost a 512-token routing on 2 Zen 1 cores 1.64 ms against 1.28 in one pass). top_v [K]
// and top_i [K] receive them; returns how many there are (fewer than K only when fewer entries
// are non-NaN).
LMOE_HD int top_k_skip_nan(const float* x, int n, int K, float* top_v, int64_t* top_i) {
  int m = 0;
  for (int i = 0; i < n; ++i) {
    const float v = x[i];
    if (is_nan(v) || (m == K && !(v > top_v[K - 1]))) continue;
    int j = m < K ? m++ : K - 1;
    for (; j > 0 && v > top_v[j - 1]; --j) {  // strictly greater: an equal earlier entry stays first
      top_v[j] = top_v[j - 1];
      top_i[j] = top_i[j - 1];
    }
    top_v[j] = v;
    top_i[j] = i;
  }
  return m;
}

// Scores of one token: sigmoid(logit) or softmax over the row.
LMOE_HD void route_scores(const float* logits, int E, int score_func, float* scores) {
  if (score_func == kSigmoid) {
    for (int e = 0; e < E; ++e) scores[e] = math::accurate_sigmoid(logits[e]);
    return;
  }
  float m = -INFINITY;
  for (int e = 0; e < E; ++e) m = logits[e] > m ? logits[e] : m;
  for (int e = 0; e < E; ++e) scores[e] = math::accurate_exp(logits[e] - m);
  // A running sum over E = 256 exps was 3-8x less accurate than torch.softmax; the tree keeps
  // the denominator within a few ulp (the CUDA warp kernel calls the same function).
  const float inv = 1.f / math::tree_sum(scores, E);
  for (int e = 0; e < E; ++e) scores[e] *= inv;
}

// The token's weights once its scores are known: NaN for all K when any score is NaN (a NaN
// router logit or weight) or any selection bias is, so the NaN reaches the token's output (for a
// NaN score, as with HF, whose topk picks the NaN expert). The picks themselves stay among the
// finite scores: in range and deterministic.
LMOE_HD float routed_weight(float w, bool nan_score) { return nan_score ? NAN : w; }

// Routing of one token. `choice` is E floats of scratch; `bias` may be null.
// Outputs: scores [E] (unbiased), weights [K] (fp32; all NaN if a score is NaN), indices [K] in
// descending biased score, ties -> lower index. Non-kept groups are excluded (HF masks them with
// -inf).
LMOE_HD void route_token(const float* logits, const float* bias, const RouteParams& p,
                         float* scores, float* choice, float* weights, int64_t* indices) {
  const int E = p.num_experts;
  route_scores(logits, E, p.score_func, scores);
  bool nan_score = false;
  for (int e = 0; e < E; ++e) {
    const float c = scores[e] + (bias != nullptr ? bias[e] : 0.f);
    // A NaN score or a NaN selection bias (scores are finite or NaN, so c is NaN exactly then):
    // the token's weights are NaN. A NaN bias makes every token's output NaN, where HF would
    // silently send every token to that expert.
    nan_score = nan_score || is_nan(c);
    choice[e] = is_nan(c) ? -INFINITY : c;  // NaN is our "excluded" mark; keep it unambiguous
  }
  if (p.n_group > 1) {
    const int gs = E / p.n_group;
    // Keep the topk_group groups with the largest sum of their top-2 choice scores. Group
    // scores are computed once (from unmasked values), then groups are picked greedily.
    constexpr int kMaxGroups = 64;
    float group_score[kMaxGroups];
    for (int g = 0; g < p.n_group; ++g) {
      const float* c = choice + g * gs;
      int i1 = argmax_skip_nan(c, gs);
      float top1 = c[i1], top2 = -INFINITY;
      bool have2 = false;
      for (int i = 0; i < gs; ++i) {
        if (i == i1) continue;
        if (!have2 || c[i] > top2) {
          top2 = c[i];
          have2 = true;
        }
      }
      const float gsum = have2 ? top1 + top2 : top1;
      // (+inf) + (-inf) (infinite biases) is NaN, the "excluded" mark: such a group ranks last
      // instead, so the picks below always find topk_group groups.
      group_score[g] = is_nan(gsum) ? -INFINITY : gsum;
    }
    bool kept[kMaxGroups];
    for (int g = 0; g < p.n_group; ++g) kept[g] = false;
    for (int j = 0; j < p.topk_group; ++j) {
      const int g = argmax_skip_nan(group_score, p.n_group);
      kept[g] = true;
      group_score[g] = NAN;
    }
    for (int g = 0; g < p.n_group; ++g)
      if (!kept[g])
        for (int i = 0; i < gs; ++i) choice[g * gs + i] = NAN;
  }
  // (K <= the number of kept experts, whose choices are never NaN: all K are found.)
  top_k_skip_nan(choice, E, p.top_k, weights, indices);
  float sum = 0.f;
  for (int k = 0; k < p.top_k; ++k) {
    weights[k] = scores[indices[k]];
    sum += weights[k];
  }
  // Divide then scale, as HF does, so fp32 results match it closely.
  for (int k = 0; k < p.top_k; ++k)
    weights[k] = routed_weight(p.norm_topk_prob ? (weights[k] / (sum + kNormEps)) * p.routed_scaling_factor
                                                : weights[k] * p.routed_scaling_factor,
                               nan_score);
}

// An index the backward may use: [0, E). The CPU rejects others before the math runs; on CUDA
// (no host copy of the indices) the math skips them, so nothing is read or written out of bounds.
LMOE_HD bool valid_expert(int64_t e, int E) { return e >= 0 && e < E; }

// Backward of one token's routing to its logits.
//   grad_weights [K]: dL/dweights; grad_scores [E] or null: dL/dscores (e.g. from an aux loss).
//   scores [E], indices [K] as returned by route_token (entries outside [0, E) are skipped).
//   Writes grad_logits [E].
LMOE_HD void route_token_backward(const float* grad_weights, const float* grad_scores,
                                  const float* scores, const int64_t* indices,
                                  const RouteParams& p, float* grad_logits) {
  const int E = p.num_experts;
  for (int e = 0; e < E; ++e) grad_logits[e] = grad_scores != nullptr ? grad_scores[e] : 0.f;
  const float c = p.routed_scaling_factor;
  if (p.norm_topk_prob) {
    // w_k = c s_k / D, D = sum_j s_j + eps:  dL/ds_j = c (g_j / D - sum_k g_k s_k / D^2).
    float D = 0.f, dot = 0.f;
    for (int k = 0; k < p.top_k; ++k) {
      if (!valid_expert(indices[k], E)) continue;
      const float s = scores[indices[k]];
      D += s;
      dot += grad_weights[k] * s;
    }
    D += kNormEps;
    for (int k = 0; k < p.top_k; ++k)
      if (valid_expert(indices[k], E)) grad_logits[indices[k]] += c * (grad_weights[k] / D - dot / (D * D));
  } else {
    for (int k = 0; k < p.top_k; ++k)
      if (valid_expert(indices[k], E)) grad_logits[indices[k]] += c * grad_weights[k];
  }
  // Now grad_logits holds dL/dscores; chain through the score function.
  if (p.score_func == kSigmoid) {
    for (int e = 0; e < E; ++e) grad_logits[e] *= scores[e] * (1.f - scores[e]);
  } else {
    float dot = 0.f;
    for (int e = 0; e < E; ++e) dot += grad_logits[e] * scores[e];
    for (int e = 0; e < E; ++e) grad_logits[e] = scores[e] * (grad_logits[e] - dot);
  }
}

// SwiGLU of one (gate, up) pair and its derivatives: a = silu(g) * u.
LMOE_HD float swiglu(float g, float u) { return math::silu(g) * u; }

// d a / d g and d a / d u.
LMOE_HD void swiglu_grad(float g, float u, float* da_dg, float* da_du) {
  const float s = math::accurate_sigmoid(g);
  *da_du = g * s;
  *da_dg = u * s * (1.f + g * (1.f - s));
}

}  // namespace latentmoe::moe
