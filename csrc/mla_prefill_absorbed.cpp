// mla_prefill's forward through mla_decode (see mla_prefill_absorbed.h).
#include "mla_prefill_absorbed.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "common/settings.h"

namespace latentmoe::mla_prefill {
namespace {

// Bytes of chunk-sized temporaries (q_latent and out_latent with their head-major copies, about
// 6 values of max(C, Dv) per query row): 256 MiB is 2K tokens of 16 heads x C 512 in bf16, or 256
// tokens of 128 heads, still 32K query rows (hundreds of blocks) per mla_decode call.
constexpr int64_t kChunkBytes = int64_t{256} << 20;

int64_t chunk_tokens(const Params& p, int64_t elt) {
  if (const auto n = positive_int_setting("mla_prefill", "LATENTMOE_MLA_PREFILL_CHUNK")) return *n;
  const int64_t per_token = std::max<int64_t>(1, p.B * p.H * std::max(p.C, p.Dv) * 6 * elt);
  return std::max<int64_t>(1, kChunkBytes / per_token);
}

using DecodeFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const std::optional<at::Tensor>&, double,
                                                    bool, int64_t, const std::optional<at::Tensor>&, int64_t);

}  // namespace

std::optional<int64_t> positive_int_setting(const char* op, const char* name) {
  const char* v = settings::get(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK_VALUE(end != v && *end == '\0' && n >= 1, "latentmoe.", op, ": ", name,
                    " must be a positive integer, not '", v, "'");
  return static_cast<int64_t>(n);
}

ForwardPath forward_path_choice() {
  switch (settings::choice("mla_prefill", "LATENTMOE_MLA_PREFILL_FORWARD", {"auto", "kernel", "absorbed"})) {
    case 1: return ForwardPath::kKernel;
    case 2: return ForwardPath::kAbsorbed;
    default: return ForwardPath::kAuto;
  }
}

bool absorbed_supported(const Params& p) { return p.causal || p.window < 0; }

std::tuple<at::Tensor, at::Tensor> forward_absorbed(const Params& p, const at::Tensor& q_nope,
                                                    const at::Tensor& q_pe, const at::Tensor& latent_cache,
                                                    const at::Tensor& cache_seqlens, const at::Tensor& w_uk,
                                                    const at::Tensor& w_uv, double softmax_scale,
                                                    const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK_VALUE(absorbed_supported(p),
                    "latentmoe.mla_prefill: the absorbed forward (LATENTMOE_MLA_PREFILL_FORWARD=absorbed) takes "
                    "causal=True, or no window; got causal=False with window=", p.window);
  // The inner ops are implementation: no autograd, and no autocast (mla_prefill has no autocast
  // kernel, so an autocast region would otherwise recast the bmm's outputs under it).
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto out = at::empty({p.B, p.S, p.H, p.Dv}, q_nope.options());
  auto lse = at::empty({p.B, p.S, p.H}, q_nope.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  static auto decode = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("latentmoe::mla_decode", "")
                           .typed<DecodeFn>();
  // check_args has checked every length against the capacity. The longest row bounds each
  // chunk's mla_decode call (its splits cover [0, max_seqlen)): one more small host copy on CUDA.
  const int64_t max_len = cache_seqlens.max().item<int64_t>();
  if (max_len <= 0) {  // every row empty (e.g. a paged pool of no pages, which mla_decode refuses)
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor w_uv_t = w_uv.transpose(1, 2);  // [H, C, Dv]
  // mla_decode takes a contiguous cache and table (a strided cache is copied: the kernel path,
  // which auto picks for it, reads it in place).
  const at::Tensor cache = latent_cache.contiguous();
  std::optional<at::Tensor> table;
  if (block_table.has_value()) table = block_table->contiguous();
  // mla_decode takes at most 65535 blocks of (at least 8) query rows per batch row.
  const int64_t chunk = std::min(chunk_tokens(p, q_nope.element_size()), std::max<int64_t>(1, 65535 * 8 / p.H));
  for (int64_t s0 = 0; s0 < p.S; s0 += chunk) {
    const int64_t sc = std::min(chunk, p.S - s0);
    // Head-major GEMMs: q_latent[b, s, h] = q_nope[b, s0 + s, h] @ w_uk[h].
    at::Tensor q_lat;
    {
      auto qn = q_nope.narrow(1, s0, sc).permute({2, 0, 1, 3}).reshape({p.H, p.B * sc, p.Dn});
      q_lat = at::bmm(qn, w_uk).view({p.H, p.B, sc, p.C}).permute({1, 2, 0, 3}).contiguous();
    }
    auto q_pe_c = q_pe.narrow(1, s0, sc).contiguous();
    // 16-byte aligned rows for the tensor-core kernel (a contiguous slice may start anywhere).
    if (reinterpret_cast<uintptr_t>(q_pe_c.const_data_ptr()) % 16 != 0) q_pe_c = q_pe_c.clone();
    // Row b's queries s0 .. s0 + sc - 1 sit at lens_b - S + s0 + i: cut the row there, so that
    // mla_decode's query i (at lens_c - sc + i) lands on the same position. Causal: the keys past
    // it are invisible anyway; a cut below 0 leaves no key (those queries sit at negative
    // positions: output 0, LSE -inf, as the prefill kernels). Non-causal without a window:
    // positions do not matter and every row keeps its length.
    const int64_t cut = p.causal ? p.S - s0 - sc : 0;
    const at::Tensor lens_c = cut > 0 ? (cache_seqlens - cut).clamp_min(0) : cache_seqlens.contiguous();
    const int64_t max_c = std::max<int64_t>(0, max_len - cut);
    auto [o_lat, lse_c] = decode.call(q_lat, q_pe_c, cache, lens_c, table, softmax_scale, p.causal, p.window,
                                      std::nullopt, max_c);
    q_lat.reset();
    q_pe_c.reset();
    lse.narrow(1, s0, sc).copy_(lse_c);
    // out[b, s, h] = o_lat[b, s, h] @ w_uv[h]^T.
    auto ol = o_lat.permute({2, 0, 1, 3}).reshape({p.H, p.B * sc, p.C});
    o_lat.reset();
    out.narrow(1, s0, sc).copy_(at::bmm(ol, w_uv_t).view({p.H, p.B, sc, p.Dv}).permute({1, 2, 0, 3}));
  }
  return {out, lse};
}

}  // namespace latentmoe::mla_prefill
