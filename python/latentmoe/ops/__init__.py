"""Typed wrappers over ``torch.ops.latentmoe.*``; importing this registers fake kernels and autograd."""

from latentmoe.ops.linear import bmm_small, linear_f32, linear_small
from latentmoe.ops.mla import mla_append_cache, mla_decode, mla_decode_absorbed
from latentmoe.ops.mla_prefill import mla_prefill
from latentmoe.ops.moe import moe_experts, moe_experts_packed, moe_pack_experts, moe_route
from latentmoe.ops.norm import add_rms_norm, rms_norm

__all__ = [
    "rms_norm", "add_rms_norm", "linear_small", "linear_f32", "bmm_small", "mla_decode", "mla_decode_absorbed", "mla_append_cache", "mla_prefill", "moe_route", "moe_experts",
    "moe_pack_experts", "moe_experts_packed",
]
