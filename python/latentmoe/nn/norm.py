"""``RMSNorm``: drop-in for HF ``DeepseekV3RMSNorm`` (same ``weight`` parameter and numerics)."""

from __future__ import annotations

import torch
from torch import nn

from latentmoe.nn._linear import check_float_dtype
from latentmoe.ops.norm import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, backed by ``latentmoe.ops.rms_norm``.

    Args:
        hidden_size: D, the normalised dim.
        eps: added to the mean square (HF's ``variance_epsilon``).
    Forward:
        ``hidden_states [..., D]`` (float32 / bfloat16 / float16) -> ``[..., D]`` in the input dtype,
        or the weight's where that is wider (as HF: ``weight * normed.to(input dtype)``). With
        ``residual`` given, returns ``(normed, hidden_states + residual)`` from one fused kernel.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        check_float_dtype("RMSNorm", "hidden_states", hidden_states)
        weight = self.weight
        wider = torch.promote_types(weight.dtype, hidden_states.dtype) != hidden_states.dtype
        if wider:
            # As HF: weight * normed.to(input dtype), in the weight's wider dtype (e.g. an fp32
            # weight on bf16 activations under autocast gives fp32).
            ones = torch.ones_like(weight, dtype=hidden_states.dtype)
            if residual is None:
                return self.weight * rms_norm(hidden_states, ones, self.variance_epsilon)
            normed, summed = add_rms_norm(hidden_states, residual, ones, self.variance_epsilon)
            return self.weight * normed, summed
        if weight.dtype != hidden_states.dtype:
            weight = weight.to(hidden_states.dtype)
        if residual is None:
            return rms_norm(hidden_states, weight, self.variance_epsilon)
        return add_rms_norm(hidden_states, residual, weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
