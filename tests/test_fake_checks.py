"""The fake (meta) kernels repeat the real kernels' argument checks (python/latentmoe/ops/_checks.py).

Table-driven: every bad call is made once with CPU tensors (the C++ checks) and once with meta
tensors (the fake kernel); both must raise the same exception with the same message, naming the
same argument. Device mismatches (cpu + meta tensors) dispatch to the fake kernel whatever the real
kernel would do, so those only check that the fake raises RuntimeError naming the argument. Also:
good calls give the same output shapes on meta as on the CPU, and torch.compile traces through the
checks (a bad call fails while tracing; dynamic sizes stay dynamic).
"""

import re

import pytest
import torch

import latentmoe.ops  # noqa: F401  (registers the fake kernels)

F32, F16, F64, I32, I64 = torch.float32, torch.float16, torch.float64, torch.int32, torch.int64
BF16 = torch.bfloat16
NAN, INF = float("nan"), float("inf")


class T:
    """A tensor argument: zeros of ``shape`` and ``dtype``, made on the call's device."""

    def __init__(self, *shape, dtype=F32):
        self.shape, self.dtype = shape, dtype

    def __call__(self, device):
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


# Good calls: positional arguments in schema order (a callable makes a tensor for a device).
# moe_experts_backward's saved tensors route all 6 (token, k) pairs to expert 0.
GOOD = {
    "rms_norm": dict(input=T(3, 8), weight=T(8), eps=1e-6),
    "add_rms_norm": dict(input=T(3, 8), residual=T(3, 8), weight=T(8), eps=1e-6),
    "rms_norm_backward": dict(grad_out=T(3, 8), input=T(3, 8), weight=T(8), rstd=T(3)),
    "linear_small": dict(input=T(4, 8), weight=T(5, 8), bias=None),
    "linear_f32": dict(input=T(20, 8), weight=T(5, 8), bias=None),
    "bmm_small": dict(input=T(2, 3, 8), weight=T(2, 8, 5)),
    "mla_decode": dict(
        q_latent=T(2, 1, 2, 8), q_pe=T(2, 1, 2, 4), kv_cache=T(2, 6, 12), cache_seqlens=T(2, dtype=I32),
        block_table=None, softmax_scale=0.5, causal=True, window=-1, pe_cache=None, max_seqlen=-1,
    ),
    # H = 2, nope_dim N = 6, R = 4, V = 5, C = 8: q [2, 1, 2, N + R], kv_b_weight [H * (N + V), C]
    "mla_decode_absorbed": dict(
        q=T(2, 1, 2, 10), cos=T(2, 1, 4), sin=T(2, 1, 4), kv_b_weight=T(22, 8), kv_cache=T(2, 6, 12),
        cache_seqlens=T(2, dtype=I32), block_table=None, softmax_scale=0.5, nope_dim=6, rope_interleave=True,
        causal=True, window=-1, pe_cache=None, max_seqlen=-1,
    ),
    "mla_append_cache": dict(
        kv_cache=T(2, 6, 12), kv_latent=T(2, 3, 8), k_pe=T(2, 3, 4), norm_weight=T(8), eps=1e-6,
        cos=T(2, 3, 4), sin=T(2, 3, 4), cache_seqlens=T(2, dtype=I32), block_table=None,
        rope_interleave=True, check_values=True,
    ),
    "mla_prefill": dict(
        q_nope=T(2, 3, 2, 6), q_pe=T(2, 3, 2, 4), latent_cache=T(2, 6, 12), cache_seqlens=T(2, dtype=I32),
        w_uk=T(2, 6, 8), w_uv=T(2, 5, 8), softmax_scale=0.5, block_table=None, causal=True, window=-1,
    ),
    "mla_prefill_backward": dict(
        grad_out=T(2, 3, 2, 5), grad_lse=T(2, 3, 2), q_nope=T(2, 3, 2, 6), q_pe=T(2, 3, 2, 4),
        latent_cache=T(2, 6, 12), cache_seqlens=T(2, dtype=I32), w_uk=T(2, 6, 8), w_uv=T(2, 5, 8),
        out=T(2, 3, 2, 5), lse=T(2, 3, 2), softmax_scale=0.5, block_table=None, causal=True, window=-1,
    ),
    "moe_route": dict(
        logits=T(4, 16), e_score_correction_bias=None, top_k=2, n_group=4, topk_group=2, score_func="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=1.0,
    ),
    "moe_route_backward": dict(
        grad_weights=T(4, 2), grad_scores=None, scores=T(4, 16), indices=T(4, 2, dtype=I64),
        score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.0,
    ),
    "moe_experts": dict(
        hidden=T(3, 8), gate_up_proj=T(4, 10, 8), down_proj=T(4, 8, 5), weights=T(3, 2),
        indices=T(3, 2, dtype=I64), check_values=True,
    ),
    "moe_experts_backward": dict(
        grad_out=T(3, 8), hidden=T(3, 8), gate_up_proj=T(4, 10, 8), down_proj=T(4, 8, 5), weights=T(3, 2),
        sorted_pairs=lambda dev: torch.arange(6, device=dev),
        expert_offsets=lambda dev: torch.tensor([0, 6, 6, 6, 6], device=dev), gate_up_out=T(6, 10),
    ),
    "moe_pack_weight": dict(weight=T(4, 10, 7, dtype=BF16), gate_up=True),
    # H = 8, I = 5: gate_up_packed [4, ceil(5/32), ceil(8/2), 64, 2], down_packed [4, ceil(8/64), ceil(5/2), 64, 2]
    "moe_experts_packed": dict(
        hidden=T(3, 8, dtype=BF16), gate_up_packed=T(4, 1, 4, 64, 2, dtype=BF16),
        down_packed=T(4, 1, 3, 64, 2, dtype=BF16), weights=T(3, 2), indices=T(3, 2, dtype=I64),
        intermediate_size=5,
    ),
}
PAGED = dict(kv_cache=T(3, 4, 12), block_table=T(2, 2, dtype=I32))  # capacity 8
PAGED_PREFILL = dict(latent_cache=T(3, 4, 12), block_table=T(2, 2, dtype=I32))
SPLIT = dict(kv_cache=T(2, 6, 8), pe_cache=T(2, 6, 4))
# More good calls: the optional tensors given.
VARIANTS = [(op, {}) for op in GOOD] + [
    ("linear_small", dict(bias=T(5))),
    ("linear_f32", dict(bias=T(5))),
    ("bmm_small", dict(weight=lambda d: torch.zeros(2, 5, 8, device=d).transpose(1, 2))),
    ("moe_pack_weight", dict(weight=T(4, 10, 7))),
    ("moe_experts_packed", dict(hidden=T(3, 8), gate_up_packed=T(4, 1, 8, 64), down_packed=T(4, 1, 5, 64))),
    ("mla_decode", PAGED),
    ("mla_decode", SPLIT),
    ("mla_decode", {**PAGED, "max_seqlen": 8}),
    ("mla_decode_absorbed", PAGED),
    ("mla_decode_absorbed", SPLIT),
    ("mla_decode_absorbed", {**PAGED, "max_seqlen": 8}),
    ("mla_decode_absorbed", dict(cos=T(1, 1, 4), sin=T(1, 1, 4))),  # one table for every row
    ("mla_decode_absorbed", dict(kv_b_weight=T(12, 8))),  # V = 0: an empty output
    ("mla_decode_absorbed", dict(q=T(2, 1, 2, 4), nope_dim=0, kv_b_weight=T(10, 8))),  # N = 0
    ("mla_decode_absorbed", dict(q=T(2, 1, 2, 6), cos=T(2, 1, 0), sin=T(2, 1, 0),
                                 kv_cache=T(2, 6, 8))),  # R = 0
    ("mla_decode_absorbed", dict(q=T(8, 2, 2, 10), cos=T(8, 2, 4), sin=T(8, 2, 4), kv_cache=T(8, 6, 12),
                                 cache_seqlens=T(8, dtype=I32))),  # 16 query rows, the most it takes
    ("mla_append_cache", PAGED),
    ("mla_prefill", PAGED_PREFILL),
    ("mla_prefill_backward", PAGED_PREFILL),
    ("moe_route", dict(e_score_correction_bias=T(16))),
    ("moe_route_backward", dict(grad_scores=T(4, 16))),
]

QL, QP = T(2, 1, 2, 8), T(2, 1, 2, 4)
EMPTY_APPEND = dict(kv_latent=T(2, 0, 8), k_pe=T(2, 0, 4), cos=T(2, 0, 4), sin=T(2, 0, 4))
ODD_ROPE = dict(kv_cache=T(2, 6, 11), k_pe=T(2, 3, 3), cos=T(2, 3, 3), sin=T(2, 3, 3))
NO_HEADS = dict(q_nope=T(2, 3, 0, 6), q_pe=T(2, 3, 0, 4), w_uk=T(0, 6, 8), w_uv=T(0, 5, 8))
# (op, overrides of the good call, the argument the error names). Overrides naming a block_table
# or pe_cache start from the paged / split call.
BAD = [
    ("rms_norm", dict(input=T(3, 8, dtype=I32)), "input"),
    ("rms_norm", dict(input=T()), "input"),
    ("rms_norm", dict(input=T(0, 8)), "input"),
    ("rms_norm", dict(weight=T(8, dtype=F16)), "weight"),
    ("rms_norm", dict(weight=T(1, 8)), "weight"),
    ("rms_norm", dict(weight=T(7)), "weight"),
    ("rms_norm", dict(eps=float("nan")), "eps"),
    ("rms_norm", dict(eps=-1e-6), "eps"),
    ("add_rms_norm", dict(eps=float("inf")), "eps"),
    ("add_rms_norm", dict(weight=T(7)), "weight"),
    ("add_rms_norm", dict(residual=T(3, 8, dtype=F64)), "residual"),
    ("add_rms_norm", dict(residual=T(2, 8)), "residual"),
    ("rms_norm_backward", dict(input=T(3, 8, dtype=I32)), "input"),
    ("rms_norm_backward", dict(grad_out=T(3, 8, dtype=F16)), "grad_out"),
    ("rms_norm_backward", dict(grad_out=T(2, 8)), "grad_out"),
    ("rms_norm_backward", dict(rstd=T(3, dtype=F16)), "rstd"),
    ("rms_norm_backward", dict(rstd=T(2)), "rstd"),
    ("rms_norm_backward", dict(rstd=T(3, 1)), "rstd"),  # one value per row, but not [rows]
    ("rms_norm_backward", dict(input=T(2, 3, 4), grad_out=T(2, 3, 4), weight=T(4), rstd=T(3, 2)), "rstd"),
    ("linear_small", dict(input=T(4, 8, dtype=I32)), "input"),
    ("linear_small", dict(input=T(1, 4, 8)), "input"),
    ("linear_small", dict(input=T(17, 8)), "input"),
    ("linear_small", dict(weight=T(5, 8, dtype=F16)), "weight"),
    ("linear_small", dict(weight=T(8)), "weight"),
    ("linear_small", dict(weight=T(5, 7)), "weight"),
    ("linear_small", dict(bias=T(5, dtype=F16)), "bias"),
    ("linear_small", dict(bias=T(1, 5)), "bias"),
    ("linear_small", dict(bias=T(4)), "bias"),
    ("linear_f32", dict(input=T(20, 8, dtype=BF16)), "input"),
    ("linear_f32", dict(input=T(1, 20, 8)), "input"),
    ("linear_f32", dict(weight=T(5, 8, dtype=F64)), "weight"),
    ("linear_f32", dict(weight=T(8)), "weight"),
    ("linear_f32", dict(weight=T(5, 7)), "weight"),
    ("linear_f32", dict(bias=T(5, dtype=F16)), "bias"),
    ("linear_f32", dict(bias=T(1, 5)), "bias"),
    ("linear_f32", dict(bias=T(4)), "bias"),
    ("bmm_small", dict(input=T(2, 3, 8, dtype=I32)), "input"),
    ("bmm_small", dict(input=T(3, 8)), "input"),
    ("bmm_small", dict(input=T(2, 17, 8)), "input"),
    ("bmm_small", dict(weight=T(2, 8, 5, dtype=F16)), "weight"),
    ("bmm_small", dict(weight=T(8, 5)), "weight"),
    ("bmm_small", dict(weight=T(3, 8, 5)), "weight"),
    ("bmm_small", dict(weight=T(2, 7, 5)), "weight"),
    ("mla_decode", dict(q_latent=T(2, 1, 2, 8, dtype=I32)), "q_latent"),
    ("mla_decode", dict(q_latent=T(2, 2, 8)), "q_latent"),
    ("mla_decode", dict(q_pe=T(2, 1, 2, 4, dtype=F16)), "q_pe"),
    ("mla_decode", dict(q_pe=T(2, 2, 4)), "q_pe"),
    ("mla_decode", dict(q_pe=T(2, 1, 3, 4)), "q_pe"),
    ("mla_decode", dict(q_latent=T(2, 0, 2, 8), q_pe=T(2, 0, 2, 4)), "q_latent"),
    ("mla_decode", dict(kv_cache=T(2, 6, 12, dtype=F16)), "kv_cache"),
    ("mla_decode", dict(kv_cache=T(2, 12)), "kv_cache"),
    ("mla_decode", dict(kv_cache=T(2, 6, 13)), "kv_cache"),
    ("mla_decode", dict(kv_cache=T(3, 6, 12)), "kv_cache"),
    ("mla_decode", dict(cache_seqlens=T(2, dtype=I64)), "cache_seqlens"),
    ("mla_decode", dict(cache_seqlens=T(2, 1, dtype=I32)), "cache_seqlens"),
    ("mla_decode", dict(cache_seqlens=T(3, dtype=I32)), "cache_seqlens"),
    ("mla_decode", dict(block_table=T(2, 2, dtype=I64)), "block_table"),
    ("mla_decode", dict(block_table=T(2, dtype=I32)), "block_table"),
    ("mla_decode", dict(block_table=T(3, 2, dtype=I32)), "block_table"),
    ("mla_decode", dict(block_table=T(2, 2, dtype=I32), kv_cache=T(3, 0, 12)), "kv_cache"),
    # An empty page pool: the unchecked paths (max_seqlen given, check_values=False) clamp table
    # entries into [0, num_pages), so it is rejected up front.
    ("mla_decode", dict(block_table=T(2, 2, dtype=I32), kv_cache=T(0, 4, 12), max_seqlen=8), "kv_cache"),
    ("mla_append_cache", dict(block_table=T(2, 2, dtype=I32), kv_cache=T(0, 4, 12)), "kv_cache"),
    ("mla_decode", dict(pe_cache=T(2, 6, 4), kv_cache=T(2, 6, 12)), "kv_cache"),
    ("mla_decode", dict(pe_cache=T(2, 6, 4, dtype=F64)), "pe_cache"),
    ("mla_decode", dict(pe_cache=T(2, 5, 4)), "pe_cache"),
    ("mla_decode", dict(pe_cache=T(2, 6, 5)), "pe_cache"),
    ("mla_decode", dict(window=-2), "window"),
    ("mla_decode", dict(softmax_scale=NAN), "softmax_scale"),
    ("mla_decode", dict(softmax_scale=-INF), "softmax_scale"),
    ("mla_decode", dict(max_seqlen=-2), "max_seqlen"),
    ("mla_decode", dict(max_seqlen=7), "max_seqlen"),
    ("mla_decode", dict(block_table=T(2, 2, dtype=I32), max_seqlen=9), "max_seqlen"),
    ("mla_decode_absorbed", dict(q=T(2, 1, 2, 10, dtype=I32)), "q"),
    ("mla_decode_absorbed", dict(q=T(2, 1, 2, 10, dtype=F64)), "q"),
    ("mla_decode_absorbed", dict(q=T(2, 2, 10)), "q"),
    ("mla_decode_absorbed", dict(q=T(17, 1, 2, 10)), "q"),  # 17 query rows
    ("mla_decode_absorbed", dict(q=T(2, 1, 0, 10)), "q"),
    ("mla_decode_absorbed", dict(q=T(2, 1, 2, 0), nope_dim=0), "q"),
    ("mla_decode_absorbed", dict(nope_dim=-1), "nope_dim"),
    ("mla_decode_absorbed", dict(nope_dim=11), "nope_dim"),
    ("mla_decode_absorbed", dict(nope_dim=5), "q"),  # odd rope dim 5
    ("mla_decode_absorbed", dict(cos=T(2, 1, 4, dtype=F16)), "cos"),
    ("mla_decode_absorbed", dict(cos=T(2, 4)), "cos"),
    ("mla_decode_absorbed", dict(cos=T(2, 1, 6)), "cos"),
    ("mla_decode_absorbed", dict(cos=T(3, 1, 4)), "cos"),
    ("mla_decode_absorbed", dict(cos=T(2, 2, 4)), "cos"),
    ("mla_decode_absorbed", dict(sin=T(2, 1, 2)), "sin"),
    ("mla_decode_absorbed", dict(sin=T(1, 1, 4, dtype=F64)), "sin"),
    ("mla_decode_absorbed", dict(kv_b_weight=T(21, 8)), "kv_b_weight"),  # rows not a multiple of H
    ("mla_decode_absorbed", dict(kv_b_weight=T(10, 8)), "kv_b_weight"),  # fewer than nope_dim rows per head
    ("mla_decode_absorbed", dict(kv_b_weight=T(22, 8, dtype=F16)), "kv_b_weight"),
    ("mla_decode_absorbed", dict(kv_b_weight=T(176)), "kv_b_weight"),
    ("mla_decode_absorbed", dict(kv_b_weight=T(22, 0)), "kv_b_weight"),
    ("mla_decode_absorbed", dict(kv_b_weight=T(22, 9)), "kv_cache"),  # C = 9 vs cache rows of 8 + 4
    ("mla_decode_absorbed", dict(kv_cache=T(2, 6, 12, dtype=F16)), "kv_cache"),
    ("mla_decode_absorbed", dict(kv_cache=T(3, 6, 12)), "kv_cache"),
    ("mla_decode_absorbed", dict(cache_seqlens=T(2, dtype=I64)), "cache_seqlens"),
    ("mla_decode_absorbed", dict(cache_seqlens=T(3, dtype=I32)), "cache_seqlens"),
    ("mla_decode_absorbed", dict(block_table=T(2, 2, dtype=I64)), "block_table"),
    ("mla_decode_absorbed", dict(block_table=T(3, 2, dtype=I32)), "block_table"),
    ("mla_decode_absorbed", dict(pe_cache=T(2, 6, 4, dtype=F64)), "pe_cache"),
    ("mla_decode_absorbed", dict(pe_cache=T(2, 6, 5)), "pe_cache"),
    ("mla_decode_absorbed", dict(window=-2), "window"),
    ("mla_decode_absorbed", dict(softmax_scale=NAN), "softmax_scale"),
    ("mla_decode_absorbed", dict(max_seqlen=-2), "max_seqlen"),
    ("mla_decode_absorbed", dict(max_seqlen=7), "max_seqlen"),
    ("mla_append_cache", dict(kv_latent=T(2, 3, 8, dtype=I32)), "kv_latent"),
    ("mla_append_cache", dict(kv_latent=T(6, 8)), "kv_latent"),
    ("mla_append_cache", dict(k_pe=T(2, 3, 4, dtype=F16)), "k_pe"),
    ("mla_append_cache", dict(cos=T(6, 4)), "cos"),
    ("mla_append_cache", dict(sin=T(1, 3, 4)), "sin"),
    ("mla_append_cache", ODD_ROPE, "k_pe"),
    ("mla_append_cache", dict(cos=T(2, 3, 6)), "cos"),
    ("mla_append_cache", dict(norm_weight=T(8, dtype=F64)), "norm_weight"),
    ("mla_append_cache", dict(norm_weight=T(7)), "norm_weight"),
    ("mla_append_cache", EMPTY_APPEND, "kv_latent"),
    ("mla_append_cache", dict(eps=NAN), "eps"),
    ("mla_append_cache", dict(eps=INF), "eps"),
    ("mla_append_cache", dict(eps=-1e-6), "eps"),
    ("mla_append_cache", dict(kv_cache=T(2, 6, 12, dtype=F16)), "kv_cache"),
    ("mla_append_cache", dict(kv_cache=T(2, 6, 13)), "kv_cache"),
    ("mla_append_cache", dict(cache_seqlens=T(2, dtype=I64)), "cache_seqlens"),
    ("mla_append_cache", dict(block_table=T(2, 2, dtype=I64)), "block_table"),
    ("mla_prefill", dict(q_nope=T(2, 3, 2, 6, dtype=I32)), "q_nope"),
    ("mla_prefill", dict(q_nope=T(2, 3, 12)), "q_nope"),
    ("mla_prefill", dict(q_pe=T(2, 3, 8)), "q_pe"),
    ("mla_prefill", dict(latent_cache=T(12, 12)), "latent_cache"),
    ("mla_prefill", dict(cache_seqlens=T(2, 1, dtype=I32)), "cache_seqlens"),
    ("mla_prefill", dict(w_uk=T(12, 8)), "w_uk"),
    ("mla_prefill", dict(w_uv=T(10, 8)), "w_uv"),
    ("mla_prefill", dict(q_pe=T(2, 3, 2, 4, dtype=F16)), "q_pe"),
    ("mla_prefill", dict(w_uv=T(2, 5, 8, dtype=F64)), "w_uv"),
    ("mla_prefill", dict(cache_seqlens=T(2, dtype=I64)), "cache_seqlens"),
    ("mla_prefill", dict(block_table=T(2, dtype=I32)), "block_table"),
    ("mla_prefill", dict(block_table=T(2, 2, dtype=I64)), "block_table"),
    ("mla_prefill", dict(block_table=T(3, 2, dtype=I32)), "block_table"),
    ("mla_prefill", dict(block_table=T(2, 2, dtype=I32), latent_cache=T(3, 0, 12)), "latent_cache"),
    ("mla_prefill", NO_HEADS, "q_nope"),
    ("mla_prefill", dict(q_pe=T(2, 2, 2, 4)), "q_pe"),
    ("mla_prefill", dict(latent_cache=T(3, 6, 12)), "latent_cache"),
    ("mla_prefill", dict(w_uk=T(2, 6, 0)), "w_uk"),
    ("mla_prefill", dict(latent_cache=T(2, 6, 13)), "latent_cache"),
    ("mla_prefill", dict(w_uk=T(3, 6, 8)), "w_uk"),
    ("mla_prefill", dict(w_uk=T(2, 5, 8)), "w_uk"),
    ("mla_prefill", dict(w_uv=T(3, 5, 8)), "w_uv"),
    ("mla_prefill", dict(w_uv=T(2, 5, 7)), "w_uv"),
    ("mla_prefill", dict(w_uv=T(2, 0, 8)), "w_uv"),
    ("mla_prefill", dict(cache_seqlens=T(3, dtype=I32)), "cache_seqlens"),
    ("mla_prefill", dict(softmax_scale=INF), "softmax_scale"),
    ("mla_prefill", dict(window=-2), "window"),
    ("mla_prefill_backward", dict(q_nope=T(2, 3, 12)), "q_nope"),
    ("mla_prefill_backward", dict(window=-2), "window"),
    ("mla_prefill_backward", dict(grad_out=T(2, 3, 2, 5, dtype=F16)), "grad_out"),
    ("mla_prefill_backward", dict(out=T(2, 3, 2, 5, dtype=F64)), "out"),
    ("mla_prefill_backward", dict(grad_lse=T(2, 3, 2, dtype=F16)), "grad_lse"),
    ("mla_prefill_backward", dict(lse=T(2, 3, 2, dtype=F64)), "lse"),
    ("mla_prefill_backward", dict(grad_out=T(2, 3, 2, 4)), "grad_out"),
    ("mla_prefill_backward", dict(out=T(2, 3, 5)), "out"),
    ("mla_prefill_backward", dict(grad_lse=T(2, 3, 3)), "grad_lse"),
    ("mla_prefill_backward", dict(lse=T(2, 3, 2, 1)), "lse"),
    ("moe_route", dict(logits=T(4, 16, 1)), "logits"),
    ("moe_route", dict(logits=T(4, 16, dtype=F16)), "logits"),
    ("moe_route", dict(logits=T(4, 0)), "logits"),
    ("moe_route", dict(e_score_correction_bias=T(1, 16)), "e_score_correction_bias"),
    ("moe_route", dict(e_score_correction_bias=T(16, dtype=F16)), "e_score_correction_bias"),
    ("moe_route", dict(e_score_correction_bias=T(8)), "e_score_correction_bias"),
    ("moe_route", dict(score_func="relu"), "score_func"),
    ("moe_route", dict(n_group=0), "n_group"),
    ("moe_route", dict(n_group=65), "n_group"),
    ("moe_route", dict(n_group=3), "n_group"),
    ("moe_route", dict(topk_group=0), "topk_group"),
    ("moe_route", dict(topk_group=5), "topk_group"),
    ("moe_route", dict(top_k=0), "top_k"),
    ("moe_route", dict(top_k=9), "top_k"),
    ("moe_route", dict(top_k=17, n_group=1, topk_group=1), "top_k"),
    ("moe_route", dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
    ("moe_route_backward", dict(score_func="tanh"), "score_func"),
    ("moe_route_backward", dict(scores=T(16)), "scores"),
    ("moe_route_backward", dict(scores=T(4, 16, dtype=F16)), "scores"),
    ("moe_route_backward", dict(indices=T(8, dtype=I64)), "indices"),
    ("moe_route_backward", dict(indices=T(4, 2, dtype=I32)), "indices"),
    ("moe_route_backward", dict(indices=T(3, 2, dtype=I64)), "indices"),
    ("moe_route_backward", dict(grad_weights=T(8)), "grad_weights"),
    ("moe_route_backward", dict(grad_weights=T(4, 2, dtype=F16)), "grad_weights"),
    ("moe_route_backward", dict(grad_weights=T(4, 3)), "grad_weights"),
    ("moe_route_backward", dict(grad_scores=T(4, 16, dtype=F64)), "grad_scores"),
    ("moe_route_backward", dict(grad_scores=T(4, 15)), "grad_scores"),
    ("moe_experts", dict(hidden=T(3, 8, 1)), "hidden"),
    ("moe_experts", dict(hidden=T(3, 8, dtype=I32)), "hidden"),
    ("moe_experts", dict(gate_up_proj=T(10, 8)), "gate_up_proj"),
    ("moe_experts", dict(down_proj=T(8, 5)), "down_proj"),
    ("moe_experts", dict(gate_up_proj=T(4, 10, 8, dtype=F16)), "gate_up_proj"),
    ("moe_experts", dict(down_proj=T(4, 8, 5, dtype=F16)), "down_proj"),
    ("moe_experts", dict(gate_up_proj=T(4, 10, 7)), "gate_up_proj"),
    ("moe_experts", dict(gate_up_proj=T(4, 9, 8)), "gate_up_proj"),
    ("moe_experts", dict(gate_up_proj=T(4, 0, 8)), "gate_up_proj"),
    ("moe_experts", dict(down_proj=T(3, 8, 5)), "down_proj"),
    ("moe_experts", dict(down_proj=T(4, 7, 5)), "down_proj"),
    ("moe_experts", dict(down_proj=T(4, 8, 6)), "down_proj"),
    ("moe_experts", dict(indices=T(6, dtype=I64)), "indices"),
    ("moe_experts", dict(indices=T(3, 2, dtype=I32)), "indices"),
    ("moe_experts", dict(indices=T(2, 2, dtype=I64)), "indices"),
    ("moe_experts", dict(weights=T(6)), "weights"),
    ("moe_experts", dict(weights=T(3, 3)), "weights"),
    ("moe_experts", dict(weights=T(3, 2, dtype=F16)), "weights"),
    ("moe_experts", dict(weights=T(3, 2, dtype=F64)), "weights"),
    ("moe_experts_backward", dict(hidden=T(3, 8, dtype=I32)), "hidden"),
    ("moe_experts_backward", dict(hidden=T(8)), "hidden"),  # ranks before the stand-in's sizes
    ("moe_experts_backward", dict(weights=T(6)), "weights"),
    ("moe_experts_backward", dict(gate_up_proj=T(4, 10, 8, dtype=F16)), "gate_up_proj"),
    ("moe_experts_backward", dict(down_proj=T(4, 8, 6)), "down_proj"),
    ("moe_experts_backward", dict(weights=T(3, 2, 1)), "weights"),
    ("moe_experts_backward", dict(grad_out=T(3, 8, dtype=F16)), "grad_out"),
    ("moe_experts_backward", dict(grad_out=T(2, 8)), "grad_out"),
    ("moe_experts_backward", dict(sorted_pairs=T(6, dtype=I32)), "sorted_pairs"),
    ("moe_experts_backward", dict(sorted_pairs=T(5, dtype=I64)), "sorted_pairs"),
    ("moe_experts_backward", dict(expert_offsets=T(5, dtype=I32)), "expert_offsets"),
    ("moe_experts_backward", dict(expert_offsets=T(4, dtype=I64)), "expert_offsets"),
    ("moe_experts_backward", dict(gate_up_out=T(6, 10, dtype=F16)), "gate_up_out"),
    ("moe_experts_backward", dict(gate_up_out=T(6, 9)), "gate_up_out"),
    ("moe_pack_weight", dict(weight=T(4, 10, dtype=BF16)), "weight"),
    ("moe_pack_weight", dict(weight=T(4, 10, 7, dtype=F16)), "weight"),
    ("moe_pack_weight", dict(weight=T(4, 0, 7, dtype=BF16)), "weight"),
    ("moe_pack_weight", dict(weight=T(4, 9, 7, dtype=BF16)), "weight"),
    ("moe_experts_packed", dict(hidden=T(3, 8)), "gate_up_packed"),  # fp32 hidden, bf16 panels
    ("moe_experts_packed", dict(hidden=T(3, 8, dtype=F16)), "hidden"),
    ("moe_experts_packed", dict(hidden=T(3, 8), gate_up_packed=T(4, 1, 8, 64), down_packed=T(4, 1, 5, 64),
                                weights=T(3, 2, dtype=BF16)), "weights"),
    ("moe_experts_packed", dict(hidden=T(3, 8), gate_up_packed=T(4, 1, 8, 64), down_packed=T(4, 1, 6, 64)),
     "down_packed"),
    ("moe_experts_packed", dict(hidden=T(3, 8), gate_up_packed=T(4, 1, 8, 64), down_packed=T(4, 1, 5, 64, 1)),
     "down_packed"),
    ("moe_experts_packed", dict(hidden=T(3, 8, 1, dtype=BF16)), "hidden"),
    ("moe_experts_packed", dict(hidden=T(3, 0, dtype=BF16)), "hidden"),
    ("moe_experts_packed", dict(intermediate_size=0), "intermediate_size"),
    ("moe_experts_packed", dict(gate_up_packed=T(4, 1, 4, 64, dtype=BF16)), "gate_up_packed"),
    ("moe_experts_packed", dict(gate_up_packed=T(0, 1, 4, 64, 2, dtype=BF16)), "gate_up_packed"),
    ("moe_experts_packed", dict(gate_up_packed=T(4, 1, 4, 64, 2)), "gate_up_packed"),
    ("moe_experts_packed", dict(gate_up_packed=T(4, 1, 5, 64, 2, dtype=BF16)), "gate_up_packed"),
    ("moe_experts_packed", dict(intermediate_size=40), "gate_up_packed"),
    ("moe_experts_packed", dict(down_packed=T(4, 1, 3, 64, 2, dtype=F16)), "down_packed"),
    ("moe_experts_packed", dict(down_packed=T(3, 1, 3, 64, 2, dtype=BF16)), "down_packed"),
    ("moe_experts_packed", dict(down_packed=T(4, 1, 4, 64, 2, dtype=BF16)), "down_packed"),
    ("moe_experts_packed", dict(indices=T(3, 2)), "indices"),
    ("moe_experts_packed", dict(indices=T(2, 2, dtype=I64)), "indices"),
    ("moe_experts_packed", dict(weights=T(3, 3)), "weights"),
    ("moe_experts_packed", dict(weights=T(3, 2, dtype=F16)), "weights"),
    # Two errors: the first in the C++ order wins.
    ("rms_norm_backward", dict(rstd=T(2, dtype=F16), grad_out=T(2, 8)), "grad_out"),
    ("linear_small", dict(input=T(17, 8), weight=T(5, 7)), "input"),
    ("linear_f32", dict(input=T(20, 8, dtype=F16), weight=T(5, 7)), "input"),
    ("bmm_small", dict(input=T(2, 17, 8), weight=T(3, 8, 5)), "input"),
    ("mla_decode", dict(window=-2, softmax_scale=NAN, max_seqlen=99), "window"),
    ("mla_decode", dict(kv_cache=T(2, 6, 13), q_pe=T(2, 1, 3, 4)), "q_pe"),
    ("mla_decode_absorbed", dict(window=-2, softmax_scale=NAN, max_seqlen=99), "window"),
    ("mla_decode_absorbed", dict(kv_b_weight=T(21, 8), cos=T(2, 1, 6)), "cos"),
    ("mla_decode_absorbed", dict(q=T(17, 1, 2, 10), nope_dim=-1), "q"),
    ("mla_append_cache", dict(eps=NAN, kv_cache=T(2, 6, 13)), "eps"),
    ("mla_prefill", dict(window=-2, softmax_scale=INF), "softmax_scale"),
    ("mla_prefill", dict(w_uv=T(2, 5, 7), cache_seqlens=T(2, dtype=I64)), "cache_seqlens"),
    ("moe_route", dict(score_func="relu", top_k=17, e_score_correction_bias=T(8)), "e_score_correction_bias"),
    ("moe_route", dict(score_func="relu", top_k=17), "score_func"),
    ("moe_experts", dict(weights=T(3, 2, dtype=F64), down_proj=T(4, 8, 6)), "down_proj"),
    ("moe_experts_backward", dict(gate_up_out=T(6, 9), sorted_pairs=T(5, dtype=I64)), "sorted_pairs"),
]


def _spec(op, overrides):
    """The good call's arguments with ``overrides`` (from the paged / split call if they name a
    block_table / pe_cache)."""
    start = dict(GOOD[op])
    if "block_table" in overrides:
        start.update(PAGED_PREFILL if op.startswith("mla_prefill") else PAGED)
    elif "pe_cache" in overrides:
        start.update(SPLIT)
    assert set(overrides) <= set(start), overrides
    return {**start, **overrides}


def _args(op, overrides, device):
    """Positional arguments; ``device`` is one device, or a function of the argument's name."""
    dev = device if callable(device) else (lambda name: device)
    return [v(dev(k)) if callable(v) else v for k, v in _spec(op, overrides).items()]


def _call(op, args):
    return getattr(torch.ops.latentmoe, op).default(*args)


def _raised(op, args):
    try:
        _call(op, args)
    except Exception as e:  # noqa: BLE001  (the test compares what was raised)
        return e
    return None


def _arg_name(err):
    m = re.search(r"argument '(\w+)'", str(err))
    return m and m.group(1)


@pytest.mark.parametrize(
    "op, overrides, name", BAD, ids=[f"{op}-{i}-{name}" for i, (op, _, name) in enumerate(BAD)]
)
def test_fake_raises_as_the_cpu_kernel(op, overrides, name):
    cpu = _raised(op, _args(op, overrides, "cpu"))
    meta = _raised(op, _args(op, overrides, "meta"))
    assert cpu is not None, "the CPU kernel accepted the call"
    assert meta is not None, f"the fake kernel accepted a call the CPU kernel rejects: {cpu}"
    assert (type(meta), _arg_name(meta)) == (type(cpu), _arg_name(cpu)) == (ValueError, name), (cpu, meta)
    assert str(meta) == str(cpu)


def _required_tensors(op):
    """The schema's Tensor arguments that may not be None (not ``Tensor?``)."""
    schema = getattr(torch.ops.latentmoe, op).default._schema
    return [a.name for a in schema.arguments if isinstance(a.type, torch._C.TensorType)]


# (Not where it is the call's only tensor: the dispatcher itself then refuses the call before any
# kernel, NotImplementedError "There were no tensor arguments"; the ops' Python wrappers, e.g.
# latentmoe.ops.moe_route and moe_pack_experts, name it: test_none_in_the_wrappers.)
NONE_CASES = [(op, name) for op in GOOD for name in _required_tensors(op)
              if sum(callable(v) for v in GOOD[op].values()) > 1]


@pytest.mark.parametrize("op, name", NONE_CASES, ids=[f"{op}-{name}" for op, name in NONE_CASES])
def test_none_for_a_required_tensor_is_named(op, name):
    # A None where a tensor is required: named by the CPU and the fake kernel alike (the CPU
    # kernels failed with "tensor does not have a device", the fakes with AttributeError).
    for device in ("cpu", "meta"):
        err = _raised(op, _args(op, {name: None}, device))
        assert isinstance(err, ValueError) and f"argument '{name}' is None" in str(err), (device, err)


def test_none_in_the_wrappers():
    from latentmoe.ops import moe_pack_experts, moe_route

    with pytest.raises(ValueError, match="moe_route: argument 'logits' is None"):
        moe_route(None, 2)
    with pytest.raises(ValueError, match="moe_route: argument 'logits' is None"):
        moe_route(None, 2, router_weight=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="moe_pack_experts: argument 'gate_up_proj' is None"):
        moe_pack_experts(None, torch.zeros(2, 8, 4))


# Each tensor argument of each good call (of a variant: the tensors it changes) moved to meta.
DEVICE_CASES = [
    (op, overrides, name)
    for op, overrides in VARIANTS
    for name, value in _spec(op, overrides).items()
    if callable(value) and (not overrides or name in overrides)
    and sum(map(callable, _spec(op, overrides).values())) > 1
]


@pytest.mark.parametrize(
    "op, overrides, name", DEVICE_CASES,
    ids=[f"{op}-{i}-{name}" for i, (op, _, name) in enumerate(DEVICE_CASES)],
)
def test_fake_rejects_mixed_devices(op, overrides, name):
    # One tensor on meta, the others on the CPU: the dispatcher picks the meta (fake) kernel.
    args = _args(op, overrides, lambda arg: "meta" if arg == name else "cpu")
    with pytest.raises(RuntimeError, match="all tensors must be on one device") as info:
        _call(op, args)
    assert f"'{name}' is on meta" in str(info.value)


def _meta_of(out):
    outs = out if isinstance(out, tuple) else (out,)
    return [None if t is None else (tuple(t.shape), t.dtype, t.stride()) for t in outs]


# Good calls with transposed inputs where the kernels accept them: the real kernels return
# contiguous outputs, and the fakes must report the same strides (torch.compile asserts it).
STRIDED = [
    ("rms_norm", lambda d: dict(input=torch.randn(8, 3, device=d).t())),
    ("add_rms_norm", lambda d: dict(input=torch.randn(8, 3, device=d).t(),
                                    residual=torch.randn(8, 3, device=d).t())),
    ("moe_route", lambda d: dict(logits=torch.randn(16, 4, device=d).t())),
]


@pytest.mark.parametrize("op, make", STRIDED, ids=[op for op, _ in STRIDED])
def test_strided_inputs_same_output_strides_on_meta(op, make):
    want = _meta_of(_call(op, _args(op, make("cpu"), "cpu")))
    assert _meta_of(_call(op, _args(op, make("meta"), "meta"))) == want


@pytest.mark.parametrize(
    "op, overrides", VARIANTS, ids=[f"{op}-{i}" for i, (op, _) in enumerate(VARIANTS)]
)
def test_good_calls_same_outputs_on_meta(op, overrides):
    want = _meta_of(_call(op, _args(op, overrides, "cpu")))
    got = _call(op, _args(op, overrides, "meta"))
    assert _meta_of(got) == want
    assert all(t is None or t.device.type == "meta" for t in (got if isinstance(got, tuple) else (got,)))


def test_compile_bad_top_k_fails_while_tracing():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def route(logits):
        return torch.ops.latentmoe.moe_route.default(logits, None, 17, 1, 1, "sigmoid", True, 1.0)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="argument 'top_k'"):
        torch.compile(route, fullgraph=True, backend=backend)(torch.randn(4, 16))
    assert graphs == []  # the fake kernel raised: no graph was made, no kernel ran


def test_compile_dynamic_sizes_stay_dynamic():
    # The checks compare symbolic sizes (guards) but never specialize them: one graph serves both T.
    from torch._dynamo.testing import CompileCounter

    def moe(hidden, router, gate_up, down):
        weights, indices, _ = torch.ops.latentmoe.moe_route.default(
            hidden @ router.T, None, 2, 4, 2, "softmax", True, 1.0
        )
        return torch.ops.latentmoe.moe_experts.default(hidden, gate_up, down, weights, indices, True)[0]

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(moe, fullgraph=True, dynamic=True, backend=counter)
    weights = (torch.randn(16, 8), torch.randn(16, 10, 8), torch.randn(16, 8, 5))
    for tokens in (3, 7):
        hidden = torch.randn(tokens, 8)
        torch.testing.assert_close(compiled(hidden, *weights), moe(hidden, *weights))
    assert counter.frame_count == 1
