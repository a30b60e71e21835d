"""MoE ops: DeepSeek-V3 routing and routed SwiGLU experts, with fake kernels and autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentmoe.ops._checks import (
    autocast_off,
    defined,
    check_moe_experts,
    check_moe_experts_backward,
    check_moe_experts_packed,
    check_moe_pack_experts,
    check_moe_pack_weight,
    check_moe_route,
    check_moe_route_backward,
    cpu_only,
    packed_shape,
)

_lib = torch.ops.latentmoe


def moe_route(
    logits: torch.Tensor,
    top_k: int,
    *,
    n_group: int = 1,
    topk_group: int = 1,
    e_score_correction_bias: torch.Tensor | None = None,
    score_func: str = "sigmoid",
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    router_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused DeepSeek-V3 top-k routing (HF ``DeepseekV3TopkRouter`` semantics).

    Args:
        logits: ``[T, E]`` float32 router logits (``hidden.float() @ W_gate.float().T``); or, when
            ``router_weight`` is given, the hidden states ``[T, hidden]`` (float32 / bfloat16 /
            float16), from which the logits are computed that way (an fp32 GEMM, as HF's router).
        top_k: experts per token, ``1 <= top_k <= topk_group * E // n_group``.
        n_group, topk_group: group-limited selection (``n_group <= 64``, dividing E); a group's score
            is the sum of its top-2 biased scores; experts of the other groups are excluded (HF masks
            them with -inf). A token with a NaN score gets NaN weights (as HF, whose topk picks the
            NaN expert), its picks staying among the finite scores.
        e_score_correction_bias: ``[E]`` float32, added for selection only, or None. A NaN entry
            counts as a NaN score of every token (all weights NaN), where HF would silently send
            every token to that expert.
        score_func: ``"sigmoid"`` (V3) or ``"softmax"``.
        norm_topk_prob: divide the chosen weights by their sum + 1e-20.
        routed_scaling_factor: final multiplier.
        router_weight: ``[E, hidden]`` router weight (HF ``gate.weight``), or None (``logits``
            are logits). Differentiable: gradients reach it and the hidden states.
    Returns:
        ``weights [T, top_k]`` float32, ``indices [T, top_k]`` int64 (descending biased score,
        ties -> lower index), ``scores [T, E]`` float32 (unbiased). ``weights`` and ``scores``
        are differentiable w.r.t. ``logits``.
    """
    defined("moe_route", "logits", logits)  # (the dispatcher can't place a call without a tensor)
    if router_weight is not None:
        logits = _router_logits(logits, router_weight)
    return _lib.moe_route.default(
        logits, e_score_correction_bias, top_k, n_group, topk_group, score_func,
        norm_topk_prob, routed_scaling_factor,
    )


def _router_logits(hidden: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """``hidden.float() @ router_weight.float().T`` after moe_route's checks of both."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if router_weight.dim() != 2 or router_weight.dtype not in floats:
        raise ValueError(
            f"latentmoe.moe_route: 'router_weight' must be [E, hidden] float32/bfloat16/float16, "
            f"got {tuple(router_weight.shape)} {router_weight.dtype}"
        )
    if hidden.dim() != 2 or hidden.dtype not in floats or hidden.shape[1] != router_weight.shape[1]:
        raise ValueError(
            f"latentmoe.moe_route: with 'router_weight' [E, hidden] = {tuple(router_weight.shape)}, "
            f"'logits' must be the hidden states [T, {router_weight.shape[1]}] "
            f"(float32/bfloat16/float16), got {tuple(hidden.shape)} {hidden.dtype}"
        )
    if hidden.device != router_weight.device:
        raise RuntimeError(
            f"latentmoe.moe_route: argument 'router_weight' is on {router_weight.device} but the "
            f"hidden states ('logits') are on {hidden.device}; all tensors must be on one device"
        )
    with autocast_off(hidden.device.type):  # fp32 logits under autocast too
        return F.linear(hidden.float(), router_weight.float())


def moe_experts(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    check_values: bool = True,
) -> torch.Tensor:
    """Routed SwiGLU experts in HF's 3-D layout, grouped by expert.

    Args:
        hidden: ``[T, H]`` float32 / bfloat16 / float16.
        gate_up_proj: ``[E, 2I, H]`` (gate rows, then up rows), hidden's dtype.
        down_proj: ``[E, H, I]``, hidden's dtype.
        weights: ``[T, k]`` float32 (or hidden's dtype).
        indices: ``[T, k]`` int64 in ``[0, E)`` (ValueError otherwise).
        check_values: ``False`` skips the index range check on CUDA, which copies the range to
            the host (one device sync per call; a CUDA graph cannot capture it). For indices that
            come from a router. A pair whose index lies outside ``[0, E)`` then contributes
            nothing and is never read out of bounds; the backward needs valid indices. The CPU
            checks either way.
    Returns:
        ``[T, H]`` in hidden's dtype: ``sum_k weights[t,k] * expert_{indices[t,k]}(hidden[t])``,
        bitwise the same from run to run at a given thread count (on the CPU, an expert with more
        rows than the threads share goes to a BLAS GEMM when several threads run, so 1 and 2
        threads may differ in the last bits; the CPU backward with AVX2 is the same at any thread
        count). Differentiable in hidden, both weights and ``weights``.
    """
    return _lib.moe_experts.default(hidden, gate_up_proj, down_proj, weights, indices, check_values)[0]


def moe_pack_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack expert weights once for :func:`moe_experts_packed` (CPU inference).

    Args:
        gate_up_proj: ``[E, 2I, H]`` bfloat16 or float32 (HF layout: gate rows, then up rows), on
            the CPU.
        down_proj: ``[E, H, I]``, the same dtype, on the CPU.
    Returns:
        ``(gate_up_packed, down_packed)``, copies in the weights' dtype (the inputs are not changed;
        together about the weights' size again): panels of 64 output columns, a gate_up panel
        holding 32 gate columns then the 32 matching up columns, zero padded. bfloat16:
        ``[E, ceil(I/32), ceil(H/2), 64, 2]`` and ``[E, ceil(H/64), ceil(I/2), 64, 2]`` with the k
        pairs interleaved (``packed[e, p, q, c, j] = w[e, row(p, c), 2q + j]``), the layout the
        CPU's ``vdpbf16ps`` multiplies without lane sums; float32: ``[E, ceil(I/32), H, 64]`` and
        ``[E, ceil(H/64), I, 64]`` (``packed[e, p, k, c] = w[e, row(p, c), k]``). The packed
        experts skip the per-call weight transposes of :func:`moe_experts` (speed:
        bench/bench_moe.py's ``latentmoe_packed`` rows). A snapshot: pack again after the weights
        change.
    """
    _cpu_only("moe_pack_experts", gate_up_proj=gate_up_proj, down_proj=down_proj)
    check_moe_pack_experts(gate_up_proj, down_proj)
    return (_lib.moe_pack_weight.default(gate_up_proj, True), _lib.moe_pack_weight.default(down_proj, False))


def moe_experts_packed(
    hidden: torch.Tensor,
    gate_up_packed: torch.Tensor,
    down_packed: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    intermediate_size: int,
) -> torch.Tensor:
    """:func:`moe_experts` on weights packed by :func:`moe_pack_experts` (CPU inference).

    Args:
        hidden: ``[T, H]`` bfloat16 or float32 (the packed weights' dtype).
        gate_up_packed, down_packed: :func:`moe_pack_experts`'s output for ``gate_up_proj`` /
            ``down_proj`` of intermediate size ``intermediate_size`` (contiguous, as returned).
        weights: ``[T, k]`` float32 or hidden's dtype.
        indices: ``[T, k]`` int64 in ``[0, E)`` (ValueError otherwise).
        intermediate_size: ``I``.
    Returns:
        ``[T, H]`` in hidden's dtype, the same function as :func:`moe_experts` (in bf16: gate and
        up rounded to bf16, ``act = bf16(silu(g) * u)``, each expert's output rounded to bf16; the
        k-sum in fp32 in k order), its sums taken in another order. Bitwise the same from run to run and at
        any thread count. No backward: a gradient reaching it raises; train through
        :func:`moe_experts`.
    """
    _cpu_only("moe_experts_packed", hidden=hidden, gate_up_packed=gate_up_packed, down_packed=down_packed,
              weights=weights, indices=indices)
    return _lib.moe_experts_packed.default(hidden, gate_up_packed, down_packed, weights, indices, intermediate_size)


def _cpu_only(op: str, **tensors: torch.Tensor) -> None:
    """The prepacked experts have CPU kernels only (latentmoe.info.CPU_ONLY_OPS)."""
    cpu_only(op, "the prepacked experts are a CPU inference path (on CUDA, moe_experts runs HF's layout on "
             "tensor cores)", **tensors)


@torch.library.register_fake("latentmoe::moe_route")
def _moe_route_fake(logits, bias, top_k, n_group, topk_group, score_func, norm, scale):
    check_moe_route(logits, bias, top_k, n_group, topk_group, score_func, scale)
    T = logits.shape[0]
    return (
        logits.new_empty(T, top_k),
        logits.new_empty(T, top_k, dtype=torch.int64),
        torch.empty_like(logits, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("latentmoe::moe_route_backward")
def _moe_route_backward_fake(grad_weights, grad_scores, scores, indices, score_func, norm, scale):
    check_moe_route_backward(grad_weights, grad_scores, scores, indices, score_func)
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("latentmoe::moe_experts")
def _moe_experts_fake(hidden, gate_up_proj, down_proj, weights, indices, check_values=True):
    check_moe_experts("moe_experts", hidden, gate_up_proj, down_proj, weights, indices)
    S = indices.shape[0] * indices.shape[1]
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        indices.new_empty(S),
        indices.new_empty(gate_up_proj.shape[0] + 1),
        hidden.new_empty(S, gate_up_proj.shape[1]),
    )


@torch.library.register_fake("latentmoe::moe_experts_backward")
def _moe_experts_backward_fake(
    grad_out, hidden, gate_up_proj, down_proj, weights, sorted_pairs, expert_offsets, gate_up_out
):
    check_moe_experts_backward(
        grad_out, hidden, gate_up_proj, down_proj, weights, sorted_pairs, expert_offsets, gate_up_out
    )
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        torch.empty_like(gate_up_proj, memory_format=torch.contiguous_format),
        torch.empty_like(down_proj, memory_format=torch.contiguous_format),
        torch.empty_like(weights, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("latentmoe::moe_pack_weight")
def _moe_pack_weight_fake(weight, gate_up):
    check_moe_pack_weight(weight, gate_up)
    E, N, K = weight.shape
    return weight.new_empty(packed_shape(E, N, K, gate_up, weight.dtype))


@torch.library.register_fake("latentmoe::moe_experts_packed")
def _moe_experts_packed_fake(hidden, gate_up_packed, down_packed, weights, indices, intermediate_size):
    check_moe_experts_packed(hidden, gate_up_packed, down_packed, weights, indices, intermediate_size)
    return hidden.new_empty(hidden.shape)


# The autograd of moe_route and moe_experts (their backwards: moe_route_backward, moe_experts_backward)
# is C++: csrc/autograd_functions.cpp.

