"""Checks shared by the ops' Python side (fake kernels repeat the real kernels' checks)."""

from __future__ import annotations

import torch


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise the kernels' RuntimeError if the given tensors (None skipped) are on different devices,
    so mixed-device calls fail the same way under torch.compile / meta tensors."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.device != ref.device:
            raise RuntimeError(
                f"latentmoe.{op}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; "
                "all tensors must be on one device"
            )


def forbid_double_backward(op: str) -> None:
    """Register autograd for ``latentmoe::<op>`` (a backward op) that raises instead of letting
    torch silently treat it as non-differentiable: second derivatives are not implemented."""

    def _raise(ctx, *grads):
        raise RuntimeError(f"latentmoe.{op}: double backward (second derivatives) is not supported")

    torch.library.register_autograd(f"latentmoe::{op}", _raise)
