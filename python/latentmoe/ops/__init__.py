"""Typed wrappers over ``torch.ops.latentmoe.*``; importing this registers fake kernels and autograd."""

from latentmoe.ops.norm import add_rms_norm, rms_norm

__all__ = ["rms_norm", "add_rms_norm"]
from latentmoe.ops.mla_prefill_fused import mla_prefill_fused  # noqa: E402,F401
