"""Hugging Face ``transformers`` integration: latentmoe's grouped-expert kernel as an experts
implementation.

Importing this module registers ``"latentmoe"`` in transformers' ``ExpertsInterface`` (next to
``"eager"``, ``"batched_mm"``, ``"grouped_mm"``), so a stock model built with
``experts_implementation="latentmoe"`` (or ``config._experts_implementation = "latentmoe"``) runs
its ``@use_experts_implementation`` experts (e.g. ``DeepseekV3Experts``) through
``latentmoe.ops.moe_experts``.
"""

from __future__ import annotations

import torch

from latentmoe.ops.moe import moe_experts

EXPERTS_IMPLEMENTATION = "latentmoe"


def _default_gate(experts: torch.nn.Module) -> bool:
    """Whether the module gates with transformers' default ``act_fn(gate) * up`` (a class may
    override ``_apply_gate``, e.g. with a clamped or scaled SwiGLU, which the kernel does not
    compute)."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # transformers without per-class gates
        return not hasattr(type(experts), "_apply_gate")
    return getattr(type(experts), "_apply_gate", _default_apply_gate) is _default_apply_gate


def _silu_activation(experts: torch.nn.Module) -> bool:
    """Whether the module's activation is SiLU: its ``act_fn`` where it has one (what HF's eager
    path calls), else ``config.hidden_act``."""
    act = getattr(experts, "act_fn", None)
    if act is not None:
        return (act is torch.nn.functional.silu or isinstance(act, torch.nn.SiLU)
                or type(act).__name__ == "SiLUActivation")
    return getattr(getattr(experts, "config", None), "hidden_act", "silu") in ("silu", "swish")


def latentmoe_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward with HF's signature.

    Args:
        self: an HF experts module with ``gate_up_proj [E, 2I, hidden]`` (concatenated gate|up,
            not transposed, no bias) and ``down_proj [E, hidden, I]``, SwiGLU activation.
        hidden_states: ``[T, hidden]``; top_k_index: ``[T, k]``; top_k_weights: ``[T, k]``.
    Returns:
        ``[T, hidden]`` in ``hidden_states.dtype``.
    Raises:
        NotImplementedError: for what the kernel does not implement (biases, transposed or
            interleaved weights, no gate, a post-expert norm, expert parallelism, an activation
            other than SiLU, a class's own ``_apply_gate``).
    """
    unsupported = [
        name
        for name, bad in (
            ("a custom _apply_gate", not _default_gate(self)),
            ("has_bias", getattr(self, "has_bias", False)),
            ("is_transposed", getattr(self, "is_transposed", False)),
            ("not is_concatenated", not getattr(self, "is_concatenated", True)),
            ("not has_gate", not getattr(self, "has_gate", True)),
            ("has_post_expert_norm", getattr(self, "has_post_expert_norm", False)),
            ("expert parallel", getattr(self, "_is_expert_parallel", False)),
            ("an activation other than SiLU", not _silu_activation(self)),
        )
        if bad
    ]
    if unsupported:
        raise NotImplementedError(
            f"latentmoe experts implementation does not support {type(self).__name__} with "
            f"{', '.join(unsupported)}; use another experts_implementation"
        )
    # Activations in another dtype than the weights (bf16 under autocast, fp32 weights): computed
    # in the weights' dtype and returned in the activations', as transformers' grouped_mm does.
    # The routing weights too (bf16 from HF's router under autocast): the kernel takes fp32 ones
    # or ones in the compute dtype.
    x = hidden_states.to(self.gate_up_proj.dtype)
    w = top_k_weights if top_k_weights.dtype in (torch.float32, x.dtype) else top_k_weights.float()
    out = moe_experts(x, self.gate_up_proj, self.down_proj, w, top_k_index.long())
    return out.to(hidden_states.dtype)


def register() -> None:
    """Register ``"latentmoe"`` in transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, latentmoe_experts_forward)


register()
