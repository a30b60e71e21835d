"""``project(layer, x)``: an ``nn.Linear`` applied the fastest correct way for the call at hand."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as _module

from latentmoe import _C
from latentmoe.ops.linear import MAX_ROWS, linear_f32, linear_small


def is_plain(module: nn.Module, cls: type) -> bool:
    """Whether ``module`` is exactly a ``cls`` whose call is its class's forward, so its parameters
    may be read directly instead of calling it: not a subclass or a wrapper (a peft LoRA layer),
    no forward or backward hooks of its own or global ones (a backward hook fires only when the
    module is called), and no forward replaced on the instance (how accelerate's offload hooks
    bring weights in from the meta device for the call)."""
    return (
        type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks
        and not module._backward_hooks and not module._backward_pre_hooks
        and "forward" not in module.__dict__
        and not _module._global_forward_hooks and not _module._global_forward_pre_hooks
        and not _module._global_backward_hooks and not _module._global_backward_pre_hooks
    )


def is_plain_linear(layer: nn.Module) -> bool:
    """Whether ``layer(x)`` is exactly ``F.linear(x, layer.weight, layer.bias)`` (see is_plain)."""
    return is_plain(layer, nn.Linear)


def linear_params(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(layer.weight, layer.bias)`` of a plain ``nn.Linear``, read from its parameter dict (each
    ``layer.weight`` goes through ``nn.Module.__getattr__``: about 1 us apiece on a 2-core Zen 4,
    a few percent of a small decode step). Where the dict does not hold them (a weight deleted and
    set as a plain attribute), the attributes."""
    params = layer._parameters
    if "weight" in params and "bias" in params:
        return params["weight"], params["bias"]
    return layer.weight, layer.bias


def check_float_dtype(module: str, name: str, x: torch.Tensor) -> None:
    """ValueError unless ``x`` is float32 / bfloat16 / float16 (the dtypes the kernels run)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"latentmoe.nn.{module}: '{name}' must be float32, bfloat16 or float16 (the dtypes of "
            f"latentmoe's kernels), got {x.dtype}"
        )


def project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``. On the CPU without a gradient: a decode step's few rows (at most 16) go through
    ``linear_small``, which streams the weight once (a BLAS GEMM with one to sixteen rows reads it
    at a fraction of the memory's rate), and more fp32 rows through ``linear_f32`` where
    ``latentmoe._C.cpu_f32_gemm()`` says ATen's fp32 GEMM runs below the CPU's FMA rate (MKL on
    AMD CPUs with AVX-512). A layer that is not a plain ``nn.Linear`` (LoRA wrappers, hooks) is
    called. Everything else (other devices, anything needing autograd, every call under
    ``torch.autocast``, which casts the inputs, or ``torch.export``, and ``linear_f32`` under
    ``torch.compile``, where the compiler picks its own GEMM) is ``F.linear`` on the layer's
    parameters: what its call runs, without ``nn.Module``'s call machinery. Same result up to
    fp32 summation order."""
    if not is_plain_linear(layer):
        return layer(x)
    w, b = linear_params(layer)
    if x.device.type != "cpu":
        # (What the layer's call runs, without nn.Module's call machinery: a plain layer has no
        # hooks; ~10% of an eager CUDA decode step's host time went to these layers' calls.)
        return F.linear(x, w, b)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        x.dtype != w.dtype or torch.is_autocast_enabled("cpu")
        or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)))
        or torch.compiler.is_exporting()  # no branch on the row count: a dynamic one may span MAX_ROWS
        or rows == 0
    ):
        return F.linear(x, w, b)
    if rows <= MAX_ROWS:
        out = linear_small(x.reshape(rows, x.shape[-1]).contiguous(), w.contiguous(), b)
    elif x.dtype == torch.float32 and not torch.compiler.is_compiling() and _C.cpu_f32_gemm():
        out = linear_f32(x.reshape(rows, x.shape[-1]).contiguous(), w.contiguous(), b)
    else:
        return F.linear(x, w, b)
    return out.view(*x.shape[:-1], w.shape[0])


def bmm_small_applies(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    """Whether per-entry products ``x @ w`` with ``rows`` rows per entry go through ``bmm_small``:
    on the CPU, for 1 to 16 rows, when no gradient is needed and not under ``torch.export`` (no
    branch on a row count that may be dynamic there)."""
    return (
        x.device.type == "cpu" and w.device.type == "cpu" and 0 < rows <= MAX_ROWS
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and not torch.compiler.is_exporting()
    )
