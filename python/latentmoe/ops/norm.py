"""RMSNorm ops (HF ``DeepseekV3RMSNorm`` numerics), with fake kernels (autograd: C++)."""

from __future__ import annotations

import torch

from latentmoe.ops._checks import (
    check_add_rms_norm,
    check_norm,
    check_norm_eps,
    check_rms_norm_backward,
)

_lib = torch.ops.latentmoe


def rms_norm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: ``weight * to_dtype(x * rsqrt(mean(x**2) + eps))``, fp32 math.

    Args:
        input: ``[..., D]``, float32 / bfloat16 / float16, non-empty.
        weight: ``[D]``, same dtype and device as ``input``.
        eps: added to the mean square (finite, >= 0).
    Returns:
        ``[..., D]`` in ``input.dtype``. Differentiable in ``input`` and ``weight``.
    """
    return _lib.rms_norm.default(input, weight, eps)[0]


def add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``h = input + residual`` then ``rms_norm(h)``.

    Args:
        input, residual: ``[..., D]``, same shape, dtype and device.
        weight: ``[D]``.
    Returns:
        ``(out, h)``: the normalised ``[..., D]`` and the new residual stream ``h`` ``[..., D]``,
        both in ``input.dtype``. Differentiable in all three tensors.
    """
    out, h, _ = _lib.add_rms_norm.default(input, residual, weight, eps)
    return out, h


@torch.library.register_fake("latentmoe::rms_norm")
def _rms_norm_fake(input, weight, eps):
    check_norm("rms_norm", input, weight)
    check_norm_eps("rms_norm", eps)
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    return out, input.new_empty(input.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("latentmoe::add_rms_norm")
def _add_rms_norm_fake(input, residual, weight, eps):
    check_add_rms_norm(input, residual, weight)
    check_norm_eps("add_rms_norm", eps)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(input, memory_format=torch.contiguous_format),
        input.new_empty(input.shape[:-1], dtype=torch.float32),
    )


@torch.library.register_fake("latentmoe::rms_norm_backward")
def _rms_norm_backward_fake(grad_out, input, weight, rstd):
    check_rms_norm_backward(grad_out, input, weight, rstd)
    contiguous = torch.contiguous_format
    return torch.empty_like(input, memory_format=contiguous), torch.empty_like(weight, memory_format=contiguous)


# The autograd of rms_norm and add_rms_norm (their backward: rms_norm_backward) is C++:
# csrc/autograd_functions.cpp.
