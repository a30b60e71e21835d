"""Drop-in ``nn.Module`` layers with Hugging Face-compatible constructor arguments and state dicts."""

from latentmoe.nn.norm import RMSNorm

__all__ = ["RMSNorm"]
from latentmoe.nn.mla import LatentKVCache, MultiHeadLatentAttention  # noqa: E402,F401
