"""Reference RMSNorm (HF ``DeepseekV3RMSNorm`` numerics)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * to_dtype(x * rsqrt(mean(x**2, -1) + eps))`` with the statistics in fp32.

    x: ``[..., D]``; weight: ``[D]``. Returns ``[..., D]`` in the promoted dtype of
    ``weight`` and ``x`` (as HF does).
    """
    dtype = x.dtype
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(var + eps)).to(dtype)
