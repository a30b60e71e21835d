// CUDA registrations of the MLA prefill ops: argument checks, shared-memory budget, launches.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/mla_prefill_checks.h"
#include "cuda/common/binding_utils.h"
#include "cuda/mla/mla_launch.h"
#include "cuda/mla_prefill/mla_prefill_launch.h"
#include "mla_prefill_absorbed.h"

namespace latentmoe::cuda {
namespace {

using mla_prefill::Params;

// The kernels keep tiles in shared memory (the forward: latent rows of C + R, or, when those do not
// fit, per-head K/V tiles; the backward: per-head K/V tiles): refuse dims that do not fit, with
// the numbers, instead of failing at launch.
void check_smem(const char* op, size_t need) {
  int dev = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK_VALUE(need <= static_cast<size_t>(limit), "latentmoe.", op, ": head dims need ", need,
                    " bytes of shared memory per block but the device allows ", limit,
                    "; reduce qk_nope_head_dim / qk_rope_head_dim / v_head_dim");
}

// auto's choice of the forward: the absorbed path (mla_prefill_absorbed.h) where mla_decode's
// tensor-core kernel takes the call (bf16 / fp16, C and R multiples of 8, C <= 512, aligned rows,
// sm_80+), the masking allows it and the cache is contiguous; the batched-GEMM forward otherwise.
bool absorbed_on_tensor_cores(const Params& p, const at::Tensor& q_nope, const at::Tensor& latent_cache) {
  // (Batches beyond mla_decode's grid limit stay on the prefill kernel, whose grid is 1-D.)
  if (q_nope.scalar_type() == at::kFloat || !mla_prefill::absorbed_supported(p) || !latent_cache.is_contiguous() ||
      p.B > kMlaDecodeMaxBatch)
    return false;
  MlaDecodeArgs a{};
  a.q_latent = nullptr;  // allocated by the absorbed path (aligned)
  a.q_pe = nullptr;      // a contiguous copy of each chunk (aligned)
  a.kv_cache = latent_cache.const_data_ptr();
  a.pe_src = static_cast<const char*>(a.kv_cache) + p.C * latent_cache.element_size();
  a.kv_stride = a.pe_stride = p.C + p.R;
  a.B = p.B;
  a.Sq = std::min<int64_t>(p.S, 64);
  a.H = p.H;
  a.C = p.C;
  a.R = p.R;
  return mla_decode_tensor_cores_apply(to_dtype(q_nope.scalar_type()), a);
}

std::tuple<at::Tensor, at::Tensor> mla_prefill_cuda(const at::Tensor& q_nope, const at::Tensor& q_pe,
                                                    const at::Tensor& latent_cache,
                                                    const at::Tensor& cache_seqlens, const at::Tensor& w_uk,
                                                    const at::Tensor& w_uv, double softmax_scale,
                                                    const std::optional<at::Tensor>& block_table, bool causal,
                                                    int64_t window) {
  const char* op = "mla_prefill";
  const Params p = mla_prefill::check_args(op, q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv,
                                           softmax_scale, block_table, causal, window);
  c10::cuda::CUDAGuard guard(q_nope.device());
  // auto: the absorbed path where mla_decode's tensor cores take it, the batched-GEMM forward
  // otherwise (fp32, other widths, paged caches, non-causal windows). On an H200 at 4K (run 7,
  // the layer with the op forced): bf16 absorbed 4.96 ms, GEMMs 8.3 (host-bound on small chunks),
  // the prefill kernel 19.7; fp32 GEMMs 14.4 ms, the kernel 17.5. The kernel stays reachable
  // (LATENTMOE_MLA_PREFILL_FORWARD=kernel).
  const auto path = mla_prefill::forward_path_choice();
  if (path == mla_prefill::ForwardPath::kAbsorbed ||
      (path == mla_prefill::ForwardPath::kAuto && absorbed_on_tensor_cores(p, q_nope, latent_cache)))
    return mla_prefill::forward_absorbed(p, q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, softmax_scale,
                                         block_table);
  if (path != mla_prefill::ForwardPath::kKernel)
    return mla_prefill::forward_gemm(p, q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, block_table);
  auto bt = block_table.has_value() ? block_table->contiguous() : at::Tensor();
  auto out = at::empty({p.B, p.S, p.H, p.Dv}, q_nope.options());
  auto lse = at::empty({p.B, p.S, p.H}, q_nope.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  check_smem(op, mla_prefill_forward_smem_bytes(p));
  auto lens = cache_seqlens.contiguous();
  check_launch(op, launch_mla_prefill_forward(to_dtype(q_nope.scalar_type()), p, q_nope.const_data_ptr(),
                                              q_pe.const_data_ptr(), latent_cache.const_data_ptr(),
                                              bt.defined() ? bt.const_data_ptr<int32_t>() : nullptr,
                                              lens.const_data_ptr<int32_t>(), w_uk.const_data_ptr(),
                                              w_uv.const_data_ptr(), out.mutable_data_ptr(),
                                              lse.mutable_data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_prefill_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q_nope, const at::Tensor& q_pe,
    const at::Tensor& latent_cache, const at::Tensor& cache_seqlens, const at::Tensor& w_uk,
    const at::Tensor& w_uv, const at::Tensor& out, const at::Tensor& lse, double softmax_scale,
    const std::optional<at::Tensor>& block_table, bool causal, int64_t window) {
  const char* op = "mla_prefill_backward";
  auto io = mla_prefill::prepare_backward(op, grad_out, grad_lse, q_nope, q_pe, latent_cache, cache_seqlens, w_uk,
                                         w_uv, out, lse, softmax_scale, block_table, causal, window);
  const Params& p = io.p;
  c10::cuda::CUDAGuard guard(q_nope.device());
  // auto: the absorbed backward on batched GEMMs (cuBLAS; tensor cores in bf16 / fp16), every
  // dtype and mask. The scalar kernel below (forced by LATENTMOE_MLA_PREFILL_BACKWARD=kernel) took
  // 911 ms against HF's 17.7 ms for an fp32 training step at 4K on an H200.
  if (mla_prefill::backward_path_choice() != mla_prefill::BackwardPath::kKernel) {
    mla_prefill::backward_absorbed(io, q_nope, q_pe, latent_cache, w_uk, w_uv);
    return io.results();
  }
  if (p.B * p.S > 0) {
    // The latent-cache and kv_b gradients are summed with fp32 atomics: under
    // torch.use_deterministic_algorithms(True) this raises (or warns, with warn_only=True).
    at::globalContext().alertNotDeterministic(
        "latentmoe::mla_prefill_backward on CUDA (fp32 atomicAdd into the latent-cache and kv_b_proj "
        "gradients; the CPU backward is deterministic)");
    check_smem(op, mla_prefill_backward_smem_bytes(p));
    auto delta = at::empty({p.B, p.S, p.H}, q_nope.options().dtype(at::kFloat));
    check_launch(op, launch_mla_prefill_backward(
                         to_dtype(q_nope.scalar_type()), p, io.grad_out.const_data_ptr(),
                         io.grad_lse.const_data_ptr<float>(), q_nope.const_data_ptr(), q_pe.const_data_ptr(),
                         latent_cache.const_data_ptr(),
                         io.block_table.defined() ? io.block_table.const_data_ptr<int32_t>() : nullptr,
                         io.seqlens.const_data_ptr<int32_t>(), w_uk.const_data_ptr(), w_uv.const_data_ptr(),
                         io.out.const_data_ptr(), io.lse.const_data_ptr<float>(),
                         io.grad_q_nope.mutable_data_ptr(), io.grad_q_pe.mutable_data_ptr(),
                         io.grad_cache.mutable_data_ptr<float>(), io.grad_w_uk.mutable_data_ptr<float>(),
                         io.grad_w_uv.mutable_data_ptr<float>(), delta.mutable_data_ptr<float>(),
                         at::cuda::getCurrentCUDAStream()));
  }
  return io.results();
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CUDA, m) {
  m.impl("mla_prefill", &mla_prefill_cuda);
  m.impl("mla_prefill_backward", &mla_prefill_backward_cuda);
}

}  // namespace latentmoe::cuda
