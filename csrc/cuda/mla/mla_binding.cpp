// CUDA registrations of the MLA ops: argument checks (shared with CPU, common/mla_checks.h),
// workspace allocation and launches.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/linear_checks.h"
#include "common/mla_checks.h"
#include "common/settings.h"
#include "cuda/common/binding_utils.h"
#include "cuda/mla/mla_launch.h"

namespace latentmoe::cuda {
namespace {

namespace chk = latentmoe::checks;

// LATENTMOE_MLA_DECODE_KERNEL=auto|cuda_cores|tensor_cores (unset: auto) picks the split kernel;
// tests use it to run both kernels on one call.
int decode_kernel_choice() {
  switch (settings::choice("mla_decode", "LATENTMOE_MLA_DECODE_KERNEL", {"auto", "cuda_cores", "tensor_cores"})) {
    case 1: return kDecodeCudaCores;
    case 2: return kDecodeTensorCores;
    default: return kDecodeAuto;
  }
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cuda(const at::Tensor& q_latent, const at::Tensor& q_pe,
                                                   const at::Tensor& kv_cache, const at::Tensor& cache_seqlens,
                                                   const c10::optional<at::Tensor>& block_table,
                                                   double softmax_scale, bool causal, int64_t window,
                                                   const c10::optional<at::Tensor>& pe_cache, int64_t max_seqlen) {
  const char* op = "mla_decode";
  mla::check_decode_queries(op, q_latent, q_pe);
  const int64_t B = q_latent.size(0), Sq = q_latent.size(1), H = q_latent.size(2);
  const int64_t C = q_latent.size(3), R = q_pe.size(3);
  auto d = mla::check_cache(op, kv_cache, cache_seqlens, block_table, B, C, R, q_latent, "q_latent", pe_cache);
  mla::check_decode_scalars(softmax_scale, window);
  TORCH_CHECK_VALUE(C <= mla_decode_max_c(), "latentmoe.mla_decode: argument 'q_latent' has C = ", C,
                    "; the CUDA kernel supports C <= ", mla_decode_max_c());
  // Grid limits: batch rows on grid z, blocks of query rows on grid y (65535 each).
  const int64_t rpb = mla_decode_rows_per_block(C);
  TORCH_CHECK_VALUE(B <= kMlaDecodeMaxBatch, "latentmoe.mla_decode: argument 'q_latent' has batch ", B,
                    "; the CUDA kernel takes at most ", kMlaDecodeMaxBatch, " batch rows per call (split the batch)");
  TORCH_CHECK_VALUE((Sq * H + rpb - 1) / rpb <= 65535, "latentmoe.mla_decode: argument 'q_latent' has ",
                    Sq, " x ", H, " query rows per batch row; the CUDA kernel takes at most ", 65535 * rpb);
  c10::cuda::CUDAGuard guard(q_latent.device());
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK_VALUE(mla_decode_smem_bytes(C, R) <= props->sharedMemPerBlockOptin,
                    "latentmoe.mla_decode: argument 'kv_cache' rows of C+R = ", C + R,
                    " values need more shared memory than this GPU offers per block");
  // max_seqlen = -1: check lengths and table on a host copy (one sync) and take the longest row;
  // given: no host copy, the kernel cuts rows at max_seqlen and clamps pages (never out of bounds).
  if (mla::check_max_seqlen(op, max_seqlen, d) < 0) {
    max_seqlen = mla::check_cache_values(op, d, cache_seqlens, block_table, 0);
  }

  auto out = at::empty_like(q_latent);
  auto lse = at::empty({B, Sq, H}, q_latent.options().dtype(at::kFloat));
  const int64_t rows = Sq * H;
  MlaDecodeArgs a{};
  a.q_latent = q_latent.const_data_ptr();
  a.q_pe = q_pe.const_data_ptr();
  a.kv_cache = kv_cache.const_data_ptr();
  a.pe_src = d.split ? pe_cache->const_data_ptr()
                     : static_cast<const char*>(kv_cache.const_data_ptr()) + C * kv_cache.element_size();
  a.kv_stride = d.kv_stride;
  a.pe_stride = d.pe_stride;
  a.seqlens = cache_seqlens.const_data_ptr<int32_t>();
  a.block_table = d.paged ? block_table->const_data_ptr<int32_t>() : nullptr;
  a.out = out.mutable_data_ptr();
  a.lse = lse.mutable_data_ptr<float>();
  a.B = B; a.Sq = Sq; a.H = H; a.C = C; a.R = R;
  a.lmax = d.lmax; a.page_size = d.page_size; a.max_pages = d.max_pages; a.num_pages = d.num_pages;
  a.capacity = d.capacity;
  a.max_seqlen = max_seqlen;
  a.scale = static_cast<float>(softmax_scale);
  a.causal = causal;
  a.window = window;
  a.kernel = decode_kernel_choice();
  const DType dtype = to_dtype(q_latent.scalar_type());
  TORCH_CHECK_VALUE(a.kernel != kDecodeTensorCores || mla_decode_tensor_cores_apply(dtype, a),
                    "latentmoe.mla_decode: LATENTMOE_MLA_DECODE_KERNEL=tensor_cores, but the tensor-core kernel does not "
                    "apply to this call (it needs bf16 / fp16, C and R multiples of 8, C <= 512, 16-byte aligned "
                    "q_latent / q_pe / cache rows and an sm_80+ GPU and build)");
  // The split count follows the kernel that will run (its query rows per block).
  a.n_splits = mla_decode_num_splits(dtype, a, props->multiProcessorCount);
  // One workspace allocation: partial accumulators [B, n_splits, rows, C], then m and l
  // [B, n_splits, rows] each (C is a whole number of floats, so every part stays 4-byte aligned).
  // A single split writes out and lse directly and needs none.
  const int64_t n_part = B * a.n_splits * rows;
  at::Tensor work;
  if (a.n_splits > 1) {
    work = at::empty({n_part * (C + 2)}, q_latent.options().dtype(at::kFloat));
    a.part_acc = work.mutable_data_ptr<float>();
    a.part_m = a.part_acc + n_part * C;
    a.part_l = a.part_acc + n_part * (C + 1);
  }
  check_launch(op, launch_mla_decode(dtype, a, at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

void mla_append_cache_cuda(at::Tensor& kv_cache, const at::Tensor& kv_latent, const at::Tensor& k_pe,
                           const at::Tensor& norm_weight, double eps, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
                           bool rope_interleave, bool check_values) {
  const char* op = "mla_append_cache";
  mla::check_append_args(op, kv_latent, k_pe, norm_weight, cos, sin, eps);
  const int64_t B = kv_latent.size(0), S = kv_latent.size(1);
  auto d = mla::check_cache(op, kv_cache, cache_seqlens, block_table, B, kv_latent.size(2), k_pe.size(2),
                            kv_latent, "kv_latent");
  // check_values = false: no host copy (capturable); the kernel skips slots outside the cache and
  // clamps pages, so bad values write nothing out of bounds.
  if (check_values) mla::check_cache_values(op, d, cache_seqlens, block_table, S);
  c10::cuda::CUDAGuard guard(kv_latent.device());
  MlaAppendArgs a{};
  a.kv_cache = kv_cache.mutable_data_ptr();
  a.kv_latent = kv_latent.const_data_ptr();
  a.k_pe = k_pe.const_data_ptr();
  a.norm_weight = norm_weight.const_data_ptr();
  a.cos = cos.const_data_ptr();
  a.sin = sin.const_data_ptr();
  a.seqlens = cache_seqlens.const_data_ptr<int32_t>();
  a.block_table = d.paged ? block_table->const_data_ptr<int32_t>() : nullptr;
  a.B = B; a.S = S; a.C = d.C; a.R = d.R;
  a.latent_sb = kv_latent.stride(0); a.latent_ss = kv_latent.stride(1);
  a.pe_sb = k_pe.stride(0); a.pe_ss = k_pe.stride(1);
  a.lmax = d.lmax; a.page_size = d.page_size; a.max_pages = d.max_pages;
  a.num_pages = d.num_pages; a.capacity = d.capacity;
  a.eps = static_cast<float>(eps);
  a.interleave = rope_interleave;
  check_launch(op, launch_mla_append_cache(to_dtype(kv_latent.scalar_type()), a, at::cuda::getCurrentCUDAStream()));
}

// A decode step's attention from the q projection's per-head queries (see the CPU op): the
// queries' RoPE (one kernel), q_latent = q_nope W_UK per head (cuBLAS, written straight into the
// [B, S, H, C] layout), mla_decode, then out = o_latent W_UV^T per head, W_UK / W_UV read in place
// from kv_b_weight. One op instead of the module's ~10 separate ones and the Python between them
// (an eager decode step is bound by the host on a GPU).
at::Tensor mla_decode_absorbed_cuda(const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin,
                                    const at::Tensor& kv_b_weight, const at::Tensor& kv_cache,
                                    const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
                                    double softmax_scale, int64_t nope_dim, bool rope_interleave, bool causal,
                                    int64_t window, const c10::optional<at::Tensor>& pe_cache, int64_t max_seqlen) {
  const char* op = "mla_decode_absorbed";
  const mla::AbsorbedDims a = mla::check_absorbed_args(op, q, cos, sin, kv_b_weight, nope_dim, linear::kMaxRows);
  auto d = mla::check_cache(op, kv_cache, cache_seqlens, block_table, a.B, a.C, a.R, q, "q", pe_cache);
  mla::check_decode_scalars(softmax_scale, window);
  c10::cuda::CUDAGuard guard(q.device());
  // The lengths checked once here (mla_decode below then makes no second host copy).
  if (mla::check_max_seqlen(op, max_seqlen, d) < 0) {
    max_seqlen = mla::check_cache_values(op, d, cache_seqlens, block_table, 0);
  }
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // (implementation; the op has no backward)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = a.B, S = a.S, H = a.H, N = a.N, R = a.R, C = a.C, V = a.V;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto q_pe = at::empty({B, S, H, R}, q.options());
  check_launch(op, launch_mla_rope_queries(to_dtype(q.scalar_type()), q.const_data_ptr(), cos.const_data_ptr(),
                                           sin.const_data_ptr(), cos.size(0) == B && B > 1, B, S, H, N, R,
                                           rope_interleave, q_pe.mutable_data_ptr(), stream));
  const at::Tensor w = kv_b_weight.view({H, N + V, C});
  // [H, B*S, N] (a strided view of q) @ W_UK [H, N, C] -> q_latent [B, S, H, C]
  auto q_latent = at::empty({B, S, H, C}, q.options());
  auto q_lat_heads = q_latent.view({B * S, H, C}).transpose(0, 1);
  at::bmm_out(q_lat_heads, q.narrow(3, 0, N).permute({2, 0, 1, 3}).reshape({H, B * S, N}), w.narrow(1, 0, N));
  auto o_latent = std::get<0>(mla_decode_cuda(q_latent, q_pe, kv_cache, cache_seqlens, block_table, softmax_scale,
                                              causal, window, pe_cache, max_seqlen));
  // [H, B*S, C] @ W_UV^T [H, C, V] -> out [B, S, H, V]
  auto out = at::empty({B, S, H, V}, q.options());
  auto out_heads = out.view({B * S, H, V}).transpose(0, 1);
  at::bmm_out(out_heads, o_latent.view({B * S, H, C}).transpose(0, 1), w.narrow(1, N, V).transpose(1, 2));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, CUDA, m) {
  m.impl("mla_decode", &mla_decode_cuda);
  m.impl("mla_decode_absorbed", &mla_decode_absorbed_cuda);
  m.impl("mla_append_cache", &mla_append_cache_cuda);
}

}  // namespace latentmoe::cuda
