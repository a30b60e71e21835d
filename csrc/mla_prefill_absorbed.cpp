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
  switch (settings::choice("mla_prefill", "LATENTMOE_MLA_PREFILL_FORWARD", {"auto", "kernel", "absorbed", "gemm"})) {
    case 1: return ForwardPath::kKernel;
    case 2: return ForwardPath::kAbsorbed;
    case 3: return ForwardPath::kGemm;
    default: return ForwardPath::kAuto;
  }
}

bool absorbed_supported(const Params& p) { return p.causal || p.window < 0; }

BackwardPath backward_path_choice() {
  switch (settings::choice("mla_prefill_backward", "LATENTMOE_MLA_PREFILL_BACKWARD", {"auto", "kernel", "absorbed"})) {
    case 1: return BackwardPath::kKernel;
    case 2: return BackwardPath::kAbsorbed;
    default: return BackwardPath::kAuto;
  }
}

namespace {

// a @ b with an fp32 result: bf16 / fp16 operands on CUDA keep their dtype (cuBLAS, fp32
// accumulation and output); elsewhere (the CPU has no bmm.dtype kernel) both go to fp32.
at::Tensor mm32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::bmm(a, b.to(at::kFloat));
  if (a.is_cuda()) return at::bmm(a, b.to(a.scalar_type()), at::kFloat);
  return at::bmm(a.to(at::kFloat), b.to(at::kFloat));
}

// Every row's latent keys [B, max_len, C+R] (the cache's dtype), zero from the row's length on
// (unused cache memory may hold anything, NaN included: a masked key still meets P = 0 in a GEMM).
// A contiguous cache is read in place before the zeroing copy; a paged one is gathered slot by
// slot (`slots` [B * max_len]: each key's flat slot), table entries past a row's pages clamped in
// range (their keys are zeroed like the rest).
struct LatentKeys {
  at::Tensor lens;      // [B] int64
  int64_t max_len = 0;  // the longest row
  at::Tensor pos;       // [max_len] int64: key positions
  at::Tensor past_end;  // [B, max_len, 1] bool: keys at or past the row's length
  at::Tensor keys;      // [B, max_len, C+R]
  at::Tensor slots;     // paged only
};

LatentKeys gather_keys(const Params& p, const at::Tensor& latent_cache, const at::Tensor& seqlens,
                       const at::Tensor& block_table) {
  LatentKeys k;
  k.lens = seqlens.to(at::kLong);
  k.max_len = std::max<int64_t>(0, k.lens.max().item<int64_t>());  // one host copy: the key extent
  if (k.max_len == 0) return k;
  const int64_t B = p.B, L = k.max_len, CR = p.C + p.R;
  k.pos = at::arange(L, k.lens.options());
  k.past_end = (k.pos.view({1, L}) >= k.lens.view({B, 1})).unsqueeze(-1);
  if (p.page_size == 0) {
    k.keys = latent_cache.narrow(1, 0, L).masked_fill(k.past_end, 0);
  } else {
    const int64_t pages = latent_cache.size(0), ps = p.page_size;
    auto page = block_table.to(at::kLong).index_select(1, at::div(k.pos, ps, "floor")).clamp(0, pages - 1);
    k.slots = (page * ps + at::remainder(k.pos, ps).view({1, L})).reshape({-1});
    k.keys = latent_cache.reshape({pages * ps, CR}).index_select(0, k.slots).view({B, L, CR}).masked_fill(k.past_end, 0);
  }
  return k;
}

// Keys [0, Lk) visible to queries s0 .. s0 + X - 1 of each row: [B, X, 1, Lk] bool. Query i of
// row b sits at lens_b - S + i; it sees keys before lens_b, not after itself if causal, and not
// more than `window` before itself (pos - l <= window: no overflow for any window).
at::Tensor visible(const Params& p, const LatentKeys& k, int64_t s0, int64_t X, int64_t Lk) {
  const auto qpos = (k.lens.view({p.B, 1}) - p.S + s0 + at::arange(X, k.lens.options()).view({1, X}))
                        .view({p.B, X, 1, 1});
  const auto l = k.pos.narrow(0, 0, Lk).view({1, 1, 1, Lk});
  auto vis = l < k.lens.view({p.B, 1, 1, 1});
  if (p.causal) vis = vis & (l <= qpos);
  if (p.window >= 0) vis = vis & ((qpos - l) <= p.window);
  return vis;
}

// Keys the chunk of queries s0 .. s0 + X - 1 can see: causal, up to its last query's position in
// the longest row; all of them otherwise.
int64_t chunk_keys(const Params& p, int64_t max_len, int64_t s0, int64_t X) {
  return p.causal ? std::min(max_len, std::max<int64_t>(0, max_len - (p.S - s0 - X))) : max_len;
}

// Query tokens per chunk of the GEMM paths: `bytes_per` bytes per (query row, key) within
// kGemmChunkBytes; LATENTMOE_MLA_PREFILL_CHUNK overrides. 1 GiB: on an H200 (run 7) the bf16
// backward at 4K in 256 MiB chunks (16 of them, ~70 launches each) took 25.5 ms of wall time for
// 12.3 ms of kernels, bound by the host's ATen calls; 4 chunks launch a quarter as many.
constexpr int64_t kGemmChunkBytes = int64_t{1} << 30;
int64_t gemm_chunk(const Params& p, const char* op, int64_t max_len, int64_t bytes_per) {
  if (const auto n = positive_int_setting(op, "LATENTMOE_MLA_PREFILL_CHUNK")) return *n;
  return std::max<int64_t>(1, kGemmChunkBytes / std::max<int64_t>(1, p.B * p.H * max_len * bytes_per));
}

// a @ b in fp32 (both converted): the per-head products of the backward whose inner or outer
// dimension is a head dim (Dn, Dv, C), not the keys: cheap in fp32 even on CUDA, and they keep
// the gradients from rounding dq_lat / o_lat to the dtype.
at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) { return at::bmm(a.to(at::kFloat), b.to(at::kFloat)); }

// The absorbed queries of chunk s0 .. s0 + X - 1, [B, X*H, C+R] in the inputs' dtype:
// q_nope W_UK per head (`qn_h` [H, B*X, Dn]), then the chunk's q_pe.
at::Tensor absorbed_queries(const Params& p, const at::Tensor& qn_h, const at::Tensor& q_pe,
                            const at::Tensor& w_uk, int64_t s0, int64_t X) {
  const auto q_lat = at::bmm(qn_h, w_uk).view({p.H, p.B, X, p.C}).permute({1, 2, 0, 3});
  return at::cat({q_lat, q_pe.narrow(1, s0, X)}, -1).reshape({p.B, X * p.H, p.C + p.R});
}

// The attention weights of chunk s0 .. s0 + X - 1 over keys [0, Lk): P = exp(z - lse), the scores
// z = scale Qa K^T in fp32 masked to -inf where `visible` says no, lse their log-sum-exp.
// Returns P [B, X, H, Lk] fp32 (0 at masked keys; a query that sees no key gets all 0) and lse
// [B, X, H, 1] (-inf for such a query). The forward writes this lse out; the backward normalises
// by it rather than by the forward's (see backward_absorbed).
std::pair<at::Tensor, at::Tensor> softmax_block(const Params& p, const LatentKeys& k, const at::Tensor& Qa,
                                                const at::Tensor& K, int64_t s0, int64_t X, int64_t Lk) {
  auto P = mm32(Qa, K.transpose(1, 2)).view({p.B, X, p.H, Lk});
  P.mul_(p.scale).masked_fill_(visible(p, k, s0, X, Lk).logical_not(), -std::numeric_limits<float>::infinity());
  auto lse = at::logsumexp(P, -1, /*keepdim=*/true);
  P.sub_(at::where(at::isinf(lse), at::zeros_like(lse), lse)).exp_();
  return {std::move(P), std::move(lse)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_gemm(const Params& p, const at::Tensor& q_nope, const at::Tensor& q_pe,
                                                const at::Tensor& latent_cache, const at::Tensor& cache_seqlens,
                                                const at::Tensor& w_uk, const at::Tensor& w_uv,
                                                const std::optional<at::Tensor>& block_table) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dt = q_nope.scalar_type();
  const int64_t B = p.B, S = p.S, H = p.H, C = p.C, Dn = p.Dn, Dv = p.Dv;
  auto out = at::empty({B, S, H, Dv}, q_nope.options());
  auto lse = at::empty({B, S, H}, q_nope.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const LatentKeys k = gather_keys(p, latent_cache, cache_seqlens, block_table.has_value() ? *block_table : at::Tensor());
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (k.max_len == 0) {  // every row empty
    out.zero_();
    lse.fill_(neg_inf);
    return {out, lse};
  }
  const auto w_uv_t = w_uv.transpose(1, 2);  // [H, C, Dv]
  // The fp32 scores / P block and P's low-precision copy: about 10 bytes per (query row, key).
  const int64_t chunk = gemm_chunk(p, "mla_prefill", k.max_len, 10);
  for (int64_t s0 = 0; s0 < S; s0 += chunk) {
    const int64_t X = std::min(chunk, S - s0);
    const int64_t Lk = chunk_keys(p, k.max_len, s0, X);
    if (Lk == 0) {  // every query of the chunk before every row's first key
      out.narrow(1, s0, X).zero_();
      lse.narrow(1, s0, X).fill_(neg_inf);
      continue;
    }
    const auto K = k.keys.narrow(1, 0, Lk);
    const auto qn_h = q_nope.narrow(1, s0, X).permute({2, 0, 1, 3}).reshape({H, B * X, Dn});
    auto [Z, lse_c] = softmax_block(p, k, absorbed_queries(p, qn_h, q_pe, w_uk, s0, X), K, s0, X, Lk);
    lse.narrow(1, s0, X).copy_(lse_c.squeeze(-1));
    const auto P = Z.to(dt).view({B, X * H, Lk});
    Z.reset();
    // out = (P c) W_UV^T per head.
    const auto ol_h = mm32(P, K.narrow(2, 0, C)).to(dt).view({B, X, H, C}).permute({2, 0, 1, 3}).reshape({H, B * X, C});
    out.narrow(1, s0, X).copy_(at::bmm(ol_h, w_uv_t).view({H, B, X, Dv}).permute({1, 2, 0, 3}));
  }
  return {out, lse};
}

void backward_absorbed(BackwardIO& io, const at::Tensor& q_nope, const at::Tensor& q_pe,
                       const at::Tensor& latent_cache, const at::Tensor& w_uk, const at::Tensor& w_uv) {
  const Params& p = io.p;
  if (p.B * p.S == 0) return;
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dt = q_nope.scalar_type();
  const int64_t B = p.B, S = p.S, H = p.H, C = p.C, R = p.R, CR = C + R, Dn = p.Dn, Dv = p.Dv;
  // The intermediates that feed a GEMM, in the inputs' dtype (see the header).
  auto lowp = [dt](const at::Tensor& t) { return t.to(dt); };
  const LatentKeys k = gather_keys(p, latent_cache, io.seqlens, io.block_table);
  const int64_t max_len = k.max_len;
  if (max_len == 0) {  // every row empty: no query sees a key, every gradient stays 0
    io.grad_q_nope.zero_();
    io.grad_q_pe.zero_();
    return;
  }
  const at::Tensor& keys = k.keys;
  auto grad_keys = p.page_size == 0 ? io.grad_cache.narrow(1, 0, max_len)
                                    : at::zeros({B, max_len, CR}, keys.options().dtype(at::kFloat));
  const auto w_uk_t = w_uk.transpose(1, 2);  // [H, C, Dn]
  // Chunk: the fp32 [rows x keys] blocks (scores / P, dP / dZ, their low-precision copies), about
  // 16 bytes per (query row, key), within kChunkBytes.
  const int64_t chunk = gemm_chunk(p, "mla_prefill_backward", max_len, 16);
  const double scale = p.scale;
  for (int64_t s0 = 0; s0 < S; s0 += chunk) {
    const int64_t X = std::min(chunk, S - s0);
    const int64_t Lk = chunk_keys(p, max_len, s0, X);
    const auto qn_h = q_nope.narrow(1, s0, X).permute({2, 0, 1, 3}).reshape({H, B * X, Dn});
    if (Lk == 0) {  // (causal: every query of the chunk before every row's first key)
      io.grad_q_nope.narrow(1, s0, X).zero_();
      io.grad_q_pe.narrow(1, s0, X).zero_();
      continue;
    }
    const auto K = keys.narrow(1, 0, Lk);       // [B, Lk, C+R]
    const auto Kc = K.narrow(2, 0, C);          // [B, Lk, C]
    // Absorbed queries [B, X*H, C+R], rounded to the dtype as the forward's.
    const auto Qa = absorbed_queries(p, qn_h, q_pe, w_uk, s0, X);
    // P = softmax of the scores over the visible keys, [B, X, H, Lk] fp32, normalised by its own
    // log-sum-exp (not the forward's lse: after another forward path, e.g. the kernel's fp32
    // decompressed keys, the scores recomputed here from the rounded q_latent differ by about
    // an ulp of the dtype times |z|, and exp(z - lse) no longer summed to 1: bf16 weight
    // gradients off by an ulp more than the low-precision reference). A query that sees no key
    // gets P = 0 (its lse -inf).
    auto P = softmax_block(p, k, Qa, K, s0, X, Lk).first;
    const auto P_lp = lowp(P).view({B, X * H, Lk});
    // dO_lat = dO W_UV per head, [H, B*X, C] -> [B, X*H, C]
    const auto go = io.grad_out.narrow(1, s0, X);
    const auto dO_h = go.permute({2, 0, 1, 3}).reshape({H, B * X, Dv});
    const auto dol32 = mm32(dO_h, w_uv).view({H, B, X, C}).permute({1, 2, 0, 3}).reshape({B, X * H, C});
    const auto dol = lowp(dol32);
    // o_lat = P c (recomputed, fp32): for dW_UV, and for D = rowsum(dO o out) = dO_lat . o_lat,
    // taken from the same P and dO_lat as dP (the forward's rounded `out` is not read: in bf16
    // its rounding error in D reached the query gradients undamped, about 3x the low-precision
    // reference's error).
    const auto ol = mm32(P_lp, Kc);  // [B, X*H, C]
    const auto D = (dol32 * ol).sum(-1).view({B, X, H, 1})
                       .sub_(io.grad_lse.narrow(1, s0, X).unsqueeze(-1));
    // dZ = P (dO_lat c^T - D + grad_lse)
    auto dZ = mm32(dol, Kc.transpose(1, 2)).view({B, X, H, Lk});
    dZ.sub_(D).mul_(P);
    P.reset();
    const auto dZ_lp = lowp(dZ).view({B, X * H, Lk});
    dZ.reset();
    // d[q_lat | q_pe] = scale dZ [c | pe]
    auto dQa = mm32(dZ_lp, K).mul_(scale).view({B, X, H, CR});
    io.grad_q_pe.narrow(1, s0, X).copy_(dQa.narrow(3, C, R));
    const auto dql_h = dQa.narrow(3, 0, C).permute({2, 0, 1, 3}).reshape({H, B * X, C});  // fp32
    io.grad_q_nope.narrow(1, s0, X).copy_(mm_f32(dql_h, w_uk_t).view({H, B, X, Dn}).permute({1, 2, 0, 3}));
    io.grad_w_uk.add_(mm_f32(qn_h.transpose(1, 2), dql_h));
    dQa.reset();
    // dW_UV = dO^T o_lat
    const auto ol_h = ol.view({B, X, H, C}).permute({2, 0, 1, 3}).reshape({H, B * X, C});
    io.grad_w_uv.add_(mm_f32(dO_h.transpose(1, 2), ol_h));
    // d[c | pe] = scale dZ^T [q_lat | q_pe] + [P^T dO_lat | 0]
    auto gk = grad_keys.narrow(1, 0, Lk);
    gk.add_(mm32(dZ_lp.transpose(1, 2), Qa).mul_(scale));
    gk.narrow(2, 0, C).add_(mm32(P_lp.transpose(1, 2), dol));
  }
  if (p.page_size != 0) {
    // Only the slots rows read (t < len): a clamped table entry past a row's pages adds nothing.
    const auto keep = k.past_end.logical_not().reshape({-1});
    io.grad_cache.view({-1, CR}).index_add_(0, k.slots.masked_select(keep),
                                            grad_keys.view({B * max_len, CR}).index_select(0, keep.nonzero().view(-1)));
  }
}

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
