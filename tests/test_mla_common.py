"""Shared helpers for the MLA tests: small random DeepseekV3 configs, HF modules, masks.

(Collected by pytest as a module with one sanity test; imported by the other MLA test files.)
"""

from __future__ import annotations

import math

import torch

from transformers import DeepseekV3Config
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)


def make_config(
    heads: int = 3,
    q_lora: int | None = 24,
    kv_lora: int = 48,
    rope: int = 16,
    nope: int = 20,
    v: int = 12,
    hidden: int = 40,
    interleave: bool = True,
    yarn: bool = False,
) -> DeepseekV3Config:
    """A tiny DeepseekV3 config with odd dims; YaRN adds factor 4 with mscale/mscale_all_dim."""
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope_parameters = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.9,
            "mscale_all_dim": 0.8,
            "beta_fast": 32,
            "beta_slow": 1,
        }
    cfg = DeepseekV3Config(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        q_lora_rank=q_lora,
        kv_lora_rank=kv_lora,
        qk_rope_head_dim=rope,
        qk_nope_head_dim=nope,
        v_head_dim=v,
        rope_interleave=interleave,
        rope_parameters=rope_parameters,
        max_position_embeddings=256,
        attention_bias=False,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
    )
    cfg._attn_implementation = "eager"
    return cfg


def make_hf_attention(cfg, dtype=torch.float32, seed: int = 0) -> DeepseekV3Attention:
    """HF attention with random (non-trivial) weights, norms included, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    attn = DeepseekV3Attention(cfg, layer_idx=0)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return attn.to(dtype).eval()


def rope_embeddings(cfg, position_ids: torch.Tensor, dtype=torch.float32):
    """HF's (cos, sin) ``[B, S, R]`` for ``position_ids [B, S]``."""
    rot = DeepseekV3RotaryEmbedding(cfg)
    x = torch.empty(1, dtype=dtype)
    return rot(x, position_ids)


def causal_additive_mask(batch: int, q_len: int, past: int, dtype=torch.float32) -> torch.Tensor:
    """HF eager-style additive mask ``[B, 1, Sq, past+Sq]``: query i sees keys ``<= past + i``."""
    L = past + q_len
    j = torch.arange(L)[None, :]
    i = torch.arange(q_len)[:, None] + past
    m = torch.zeros(q_len, L, dtype=dtype).masked_fill(j > i, torch.finfo(dtype).min)
    return m[None, None].expand(batch, 1, q_len, L)


def hf_cache(cfg):
    return DynamicCache(config=cfg)


def attention_pair(cfg, dtype=torch.float32):
    """(HF ``DeepseekV3Attention`` with random weights, latentmoe's attention with the same
    weights, in eval mode), layer 0, in ``dtype``."""
    from latentmoe.nn import MultiHeadLatentAttention

    hf = make_hf_attention(cfg, dtype)
    mine = MultiHeadLatentAttention(cfg, 0).to(dtype)
    mine.load_state_dict(hf.state_dict(), strict=True)
    return hf, mine.eval()


def hf_model_pair(model_cls, attn_impl: str, moe: bool = False):
    """(config, an HF ``model_cls`` (``DeepseekV3Model`` / ``DeepseekV3ForCausalLM``), the same
    model with latentmoe's attention in every layer): 2 layers, 3 heads, q_lora, random weights.
    Dense MLPs unless ``moe`` (then layer 1 is a routed-experts layer)."""
    from latentmoe.nn import MultiHeadLatentAttention

    cfg = make_config(heads=3, q_lora=24)
    cfg._attn_implementation = attn_impl
    cfg.num_hidden_layers = 2
    cfg.first_k_dense_replace = 1 if moe else 2
    torch.manual_seed(0)
    hf = model_cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    ours = model_cls(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    layers = ours.model.layers if hasattr(ours, "model") else ours.layers
    for i, layer in enumerate(layers):
        attn = MultiHeadLatentAttention(cfg, i)
        attn.load_state_dict(layer.self_attn.state_dict(), strict=True)
        layer.self_attn = attn
    return cfg, hf, ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the trusted value)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_config_helper_is_sane():
    cfg = make_config(heads=9, q_lora=None, yarn=True)
    attn = make_hf_attention(cfg)
    assert attn.q_proj is not None and attn.num_heads == 9
    assert attn.scaling != (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5  # YaRN mscale applied


def offload_like_accelerate(model: torch.nn.Module) -> None:
    """What accelerate's cpu_offload does to a model (without needing accelerate): every module
    with parameters of its own keeps them on the meta device and gets an instance-level
    ``forward`` that brings them in for the call and sends them back after it. A module that reads
    a sub-module's weight without calling it sees a meta tensor."""
    import functools

    for mod in list(model.modules()):
        own = dict(mod.named_parameters(recurse=False))
        if not own:
            continue
        store = {k: v.detach().clone() for k, v in own.items()}
        for k, v in own.items():
            setattr(mod, k, torch.nn.Parameter(v.detach().to("meta"), requires_grad=v.requires_grad))
        old = mod.forward

        def forward(*args, _mod=mod, _old=old, _store=store, **kwargs):
            for k, v in _store.items():
                setattr(_mod, k, torch.nn.Parameter(v, requires_grad=False))
            try:
                return _old(*args, **kwargs)
            finally:
                for k, v in _store.items():
                    setattr(_mod, k, torch.nn.Parameter(v.to("meta"), requires_grad=False))

        mod.forward = functools.update_wrapper(forward, old)
