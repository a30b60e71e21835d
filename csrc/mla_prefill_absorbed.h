// mla_prefill's forward through mla_decode: absorbed queries attending on the latent cache.
//
// Per chunk of query tokens: q_latent = q_nope W_UK (per head, a batched GEMM), then mla_decode
// on the latent cache (the chunk's queries as its Sq query tokens, each row's length cut to the
// chunk's last position, so mla_decode's "query i sits at cache_seqlens - Sq + i" puts every
// query at its prefill position), then out = out_latent W_UV^T. The same attention as the
// prefill kernels (K_nope = c W_UK^T, V = c W_UV^T per head), associated the other way round.
// Extra memory is bounded by the chunk (kChunkBytes), whatever S is: O(1) in the tokens.
//
// Why: on GPUs with tensor cores this runs the prefill on mla_decode's tensor-core kernel, which
// the per-head decompressing prefill kernel does not use. Device-generic (ATen ops and the
// dispatcher): the CPU runs the same code for the tests (LATENTMOE_MLA_PREFILL_FORWARD=absorbed).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/mla_prefill_checks.h"
#include "common/mla_prefill_math.h"

namespace latentmoe::mla_prefill {

enum class ForwardPath { kAuto, kKernel, kAbsorbed, kGemm };

// The environment variable `name` as a positive integer, or nullopt when unset or empty; any
// other value is a ValueError naming the op and the variable (test and tuning settings).
std::optional<int64_t> positive_int_setting(const char* op, const char* name);

// LATENTMOE_MLA_PREFILL_FORWARD=auto|kernel|absorbed|gemm (unset: auto). Anything else is a ValueError.
ForwardPath forward_path_choice();

// Whether the absorbed path computes this call's masking: causal (any window), or no window.
// (A non-causal window depends on each query's position, which the chunking would move.)
bool absorbed_supported(const Params& p);

// out [B, S, H, Dv] (q_nope's dtype) and lse [B, S, H] fp32, as mla_prefill. Arguments already
// checked by check_args (p). LATENTMOE_MLA_PREFILL_CHUNK (query tokens per chunk, >= 1) overrides
// the chunk size (tests).
std::tuple<at::Tensor, at::Tensor> forward_absorbed(const Params& p, const at::Tensor& q_nope,
                                                    const at::Tensor& q_pe, const at::Tensor& latent_cache,
                                                    const at::Tensor& cache_seqlens, const at::Tensor& w_uk,
                                                    const at::Tensor& w_uv, double softmax_scale,
                                                    const std::optional<at::Tensor>& block_table);

// out [B, S, H, Dv] and lse [B, S, H] fp32, as mla_prefill, on batched GEMMs (ATen, any device):
// per chunk of query tokens (temporaries within 1 GiB; LATENTMOE_MLA_PREFILL_CHUNK overrides),
// scores of the absorbed queries [q_nope W_UK | q_pe] against every latent key row [c | pe] of
// the chunk's key range, masked per query (causal, window, lengths; any mask, contiguous or paged
// cache), lse and P = exp(z - lse) in fp32, then out = (P c) W_UV^T per head. bf16 / fp16: the
// score and P c GEMMs take fp32 outputs on CUDA (tensor cores), P and P c are rounded to the
// dtype before their GEMMs (the CPU runs the same roundings with fp32 GEMMs). Keys past a row's
// length are zeroed before they are read. Extra memory: the chunk's [rows x keys] blocks and
// O(tokens) gathered keys; per-head K/V are never formed.
std::tuple<at::Tensor, at::Tensor> forward_gemm(const Params& p, const at::Tensor& q_nope, const at::Tensor& q_pe,
                                                const at::Tensor& latent_cache, const at::Tensor& cache_seqlens,
                                                const at::Tensor& w_uk, const at::Tensor& w_uv,
                                                const std::optional<at::Tensor>& block_table);

enum class BackwardPath { kAuto, kKernel, kAbsorbed };

// LATENTMOE_MLA_PREFILL_BACKWARD=auto|kernel|absorbed (unset: auto). Anything else is a ValueError.
BackwardPath backward_path_choice();

// mla_prefill_backward in the absorbed form, on batched GEMMs (ATen, any device): per chunk of
// query tokens (its temporaries bounded at 1 GiB; LATENTMOE_MLA_PREFILL_CHUNK overrides), the
// absorbed queries [q_nope W_UK | q_pe] score every latent key row [c | pe] of the chunk's key
// range, the probabilities are recomputed (normalised by their own log-sum-exp, so they sum to 1
// whichever forward produced out / lse), and the gradients follow as GEMMs:
//   dO_lat = dO W_UV;  dP = dO_lat c^T;  dZ = P (dP - dO_lat . (P c) + grad_lse);
//   d[q_lat | q_pe] = scale dZ [c | pe];  dq_nope = dq_lat W_UK^T;  dW_UK = q_nope^T dq_lat;
//   dW_UV = dO^T (P c);  d[c | pe] = scale dZ^T [q_lat | q_pe] + [P^T dO_lat | 0].
// Every mask (causal, window, lengths) is applied per query; keys past a row's length are zeroed
// before they are read (unused cache memory may hold anything). The per-head K/V are never
// formed: extra memory is the chunk's [rows x keys] fp32 blocks plus O(tokens) gathered keys and
// fp32 key gradients. In bf16 / fp16 the GEMMs over the keys take the dtype's operands with fp32
// outputs on CUDA (tensor cores): P, dZ and dO_lat are rounded to the dtype before them, as
// FlashAttention's backward rounds P and dS; the per-head products (W_UK, W_UV and their
// gradients, a head dim on both sides) run in fp32 on fp32 dq_latent / P c. The CPU runs the
// same roundings with fp32 GEMMs. Deterministic (no atomics; a paged cache's gradient is an index_add, which
// ATen makes deterministic under torch.use_deterministic_algorithms). Writes io's gradients.
void backward_absorbed(BackwardIO& io, const at::Tensor& q_nope, const at::Tensor& q_pe,
                       const at::Tensor& latent_cache, const at::Tensor& w_uk, const at::Tensor& w_uv);

}  // namespace latentmoe::mla_prefill
