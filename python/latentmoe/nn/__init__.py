"""Drop-in ``nn.Module`` layers with Hugging Face-compatible constructor arguments and state dicts."""

from latentmoe.nn.mla import LatentKVCache, MultiHeadLatentAttention
from latentmoe.nn.moe import MoE, MoEExperts, no_load_counting, pack_experts, unpack_experts
from latentmoe.nn.norm import RMSNorm

__all__ = ["RMSNorm", "MultiHeadLatentAttention", "LatentKVCache", "MoE", "MoEExperts", "no_load_counting", "pack_experts", "unpack_experts"]
