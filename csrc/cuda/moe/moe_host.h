// Host-side MoE helpers shared by the CPU and CUDA registrations, implemented in
// csrc/cpu/moe.cpp (always built): argument checks, and the device-generic backward of
// moe_experts written with ATen GEMMs on the expert-sorted rows (runs on CPU and CUDA tensors).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>

#include "common/moe_math.h"

namespace latentmoe::moe_host {

// Validates moe_route's arguments (ValueError naming the argument) and returns the params.
moe::RouteParams check_route_args(const at::Tensor& logits,
                                  const std::optional<at::Tensor>& bias, int64_t top_k,
                                  int64_t n_group, int64_t topk_group,
                                  const std::string& score_func, bool norm_topk_prob,
                                  double routed_scaling_factor);

// moe_route_backward's shapes, dtypes, devices and score_func (not the index values: the CPU
// checks those itself; on CUDA that would cost a host copy, and the kernel skips any index
// outside [0, E) instead of writing out of bounds).
void check_route_backward_args(const at::Tensor& grad_weights,
                               const std::optional<at::Tensor>& grad_scores,
                               const at::Tensor& scores, const at::Tensor& indices,
                               const std::string& score_func);

// Shapes, dtypes and devices of moe_experts (not the index values).
void check_experts_args(const char* op, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
                        const at::Tensor& down_proj, const at::Tensor& weights,
                        const at::Tensor& indices);

// check_experts_args for moe_experts_backward, which has no indices (its pairs come pre-sorted).
void check_experts_backward_args(const at::Tensor& hidden, const at::Tensor& gate_up_proj,
                                 const at::Tensor& down_proj, const at::Tensor& weights);

// moe_experts_backward's own tensors: grad_out like hidden, sorted_pairs [T*k] and
// expert_offsets [E+1] int64, gate_up_out [T*k, 2I] in hidden's dtype.
void check_experts_backward_tensors(const at::Tensor& grad_out, const at::Tensor& hidden,
                                    const at::Tensor& gate_up_proj, const at::Tensor& weights,
                                    const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets,
                                    const at::Tensor& gate_up_out);

// How experts_backward runs its four GEMM groups (data and weight gradients of gate_up and down):
// kLoop, one ATen GEMM per active expert and group (4 per active expert); kGrouped, one
// at::_grouped_mm per group over the expert-sorted rows (4 calls, offsets read on the device, no
// host copy). at::_grouped_mm has a fast kernel for bf16 on sm90 / sm100 (what HF's grouped_mm
// experts use); elsewhere it loops over the groups itself.
enum class BackwardGemms { kLoop, kGrouped };

// LATENTMOE_MOE_BACKWARD_GEMM=auto|grouped|loop (unset or auto: nullopt, the caller's choice);
// ValueError on any other value. Tests force either path.
std::optional<BackwardGemms> backward_gemm_setting();

// Whether at::_grouped_mm takes the backward's operands: every row stride (H and I elements) a
// multiple of 16 bytes.
bool grouped_gemm_aligned(int64_t H, int64_t I, at::ScalarType dtype);

// LATENTMOE_MOE_FORWARD_GEMM=auto|grouped|kernel: true for grouped, false for kernel, nullopt for
// auto (unset; the caller's choice). ValueError on any other value.
std::optional<bool> forward_grouped_setting();

// Device kernels standing in for some ATen steps of experts_forward_grouped and experts_backward
// (the CUDA binding passes its own; an empty member runs the ATen steps, as on the CPU). Each
// writes its output tensor in place; shapes as in the comments.
struct DeviceSteps {
  // act [S, I] (dtype) = silu(g) * u of gate_up_out [S, 2I] = [g | u], in fp32, rounded.
  std::function<void(const at::Tensor& gate_up_out, const at::Tensor& act)> swiglu;
  // out [T, H] = sum over k (fp32) of weights[t, k] * y[pos[t*K+k]]; weights [T, K] fp32
  // contiguous; pairs whose row lies outside [offsets[0], offsets[E]) are skipped.
  std::function<void(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& pos,
                     const at::Tensor& offsets, const at::Tensor& out)>
      combine;
  // The backward's SwiGLU step: gh [S, 2I] (dtype) and grad_w_s [S] (fp32) from gate_up_out
  // [S, 2I], gau [S, I] (the unweighted gradient of act, dtype) and w_s [S] (fp32); rows outside
  // [offsets[0], offsets[E]) get zeros.
  std::function<void(const at::Tensor& gate_up_out, const at::Tensor& gau, const at::Tensor& w_s,
                     const at::Tensor& offsets, const at::Tensor& gh, const at::Tensor& grad_w_s)>
      swiglu_backward;
  // Zeroes grad [E, ...]'s slice of every expert with no rows (offsets[e+1] == offsets[e]).
  std::function<void(const at::Tensor& grad, const at::Tensor& offsets)> zero_idle;
};

// The forward of moe_experts on ATen ops (any device): the pairs' rows gathered in expert order,
// gate_up and down as one at::_grouped_mm each over them (offsets passed on the device: no host
// sync where at::_grouped_mm is native, bf16 on sm90 / sm100; elsewhere it copies them to the
// host itself, so a forced grouped forward there is not CUDA-graph capturable), the SwiGLU
// between in fp32 rounded to the input dtype (the backward's own steps), and each token's k rows
// summed in fp32 by an ATen reduction. Returns (out [T, H], gate_up_out [T*k, 2I]) as the kernels
// do; pairs outside [expert_offsets[0], expert_offsets[E]) (ids out of range that an
// unchecked CUDA call sorted aside) contribute nothing. H and I must be multiples of 16 bytes
// (grouped_gemm_aligned; ValueError otherwise). pos: each pair's row in the sorted order.
std::tuple<at::Tensor, at::Tensor> experts_forward_grouped(
    const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
    const at::Tensor& weights, const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets,
    const at::Tensor& pos, const DeviceSteps& steps = {});

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& sorted_pairs,
    const at::Tensor& expert_offsets, const at::Tensor& gate_up_out, BackwardGemms gemms,
    const DeviceSteps& steps = {});

}  // namespace latentmoe::moe_host
