"""``RMSNorm``: drop-in for HF ``DeepseekV3RMSNorm`` (same ``weight`` parameter and numerics)."""

from __future__ import annotations

import torch
from torch import nn

from latentmoe.ops.norm import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, backed by ``latentmoe.ops.rms_norm``.

    Args:
        hidden_size: D, the normalised dim.
        eps: added to the mean square (HF's ``variance_epsilon``).
    Forward:
        ``hidden_states [..., D]`` -> ``[..., D]`` in the input dtype. With ``residual`` given,
        returns ``(normed, hidden_states + residual)`` from one fused kernel.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        weight = self.weight
        if weight.dtype != hidden_states.dtype:
            weight = weight.to(hidden_states.dtype)
        if residual is None:
            return rms_norm(hidden_states, weight, self.variance_epsilon)
        return add_rms_norm(hidden_states, residual, weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
