"""Shared helpers of the MoE tests: small HF DeepseekV3 configs and modules with random weights."""

from __future__ import annotations

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

# name -> config kwargs. Odd hidden / intermediate sizes on purpose.
CONFIGS = {
    "v3": dict(
        hidden_size=40, moe_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=2,
    ),
    "odd": dict(
        hidden_size=37, moe_intermediate_size=19, n_routed_experts=12, num_experts_per_tok=3,
        n_group=3, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.7, n_shared_experts=1,
    ),
    "no_norm": dict(
        hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=1,
    ),
    "top1": dict(
        hidden_size=24, moe_intermediate_size=8, n_routed_experts=6, num_experts_per_tok=1,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, n_shared_experts=1,
    ),
}


def hf_config(name: str) -> DeepseekV3Config:
    cfg = DeepseekV3Config(hidden_act="silu", **CONFIGS[name])
    cfg._experts_implementation = "eager"
    return cfg


def hf_moe(name: str, dtype=torch.float32, seed: int = 0, **overrides) -> DeepseekV3MoE:
    """A DeepseekV3MoE with every parameter and the selection bias drawn at random (never zero);
    ``overrides`` set config fields (e.g. ``n_shared_experts=0``)."""
    cfg = hf_config(name)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    moe = DeepseekV3MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) * (max(p.shape[-1], 1) ** -0.5))
        moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.1)
    return moe.to(dtype)


def hf_v2_router(num_experts: int, top_k: int, hidden: int, scale: float) -> DeepseekV2TopkRouter:
    """HF's softmax router (greedy top-k, no renormalisation) with random weights."""
    from transformers import DeepseekV2Config

    cfg = DeepseekV2Config(
        hidden_size=hidden, num_attention_heads=1, num_key_value_heads=1, n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=scale,
    )
    router = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight) * hidden**-0.5)
    return router


def sort_by_index(weights: torch.Tensor, indices: torch.Tensor):
    """Order each row's (weight, index) pairs by expert id (HF's topk order is unspecified)."""
    order = indices.argsort(dim=-1)
    return weights.gather(-1, order), indices.gather(-1, order)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
