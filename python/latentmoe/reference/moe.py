"""Pure-PyTorch reference of DeepSeek-V3 mixture-of-experts: routing, SwiGLU experts, balance losses.

Semantics follow Hugging Face ``transformers`` ``DeepseekV3TopkRouter`` / ``DeepseekV3MoE`` (5.x):

* ``logits = hidden.float() @ W_gate.float().T``; ``scores = sigmoid(logits)`` (V3) or
  ``softmax(logits)`` (V2-style).
* Selection uses ``scores + e_score_correction_bias``; the bias never enters the weights.
* Group-limited routing: experts are split into ``n_group`` contiguous groups; a group's score is
  the sum of its two largest biased scores; the best ``topk_group`` groups are kept. Experts of the
  other groups are masked with ``-inf`` before the top-k. This is what HF 5.x ``DeepseekV3TopkRouter``
  does (``masked_fill(..., -inf)``) and what DeepSeek's own inference code does; some earlier HF
  versions fill with ``0.0``, which differs only when a kept biased score is negative. We require
  ``top_k <= topk_group * E / n_group`` so a masked expert can never be chosen. With
  ``score_func="softmax"`` this is V3's group rule on softmax scores, not DeepSeek-V2's
  ``group_limited_greedy``, which scores a group by its single largest score (the two can keep
  different groups).
* ``weights = scores[indices]``; with ``norm_topk_prob`` they are divided by ``sum + 1e-20``; then
  multiplied by ``routed_scaling_factor``.
* Ties (equal biased scores, equal group scores) go to the lower index. HF uses
  ``torch.topk(sorted=False)``, whose order and tie-break are unspecified; we return the experts
  sorted by descending biased score, ties by ascending index.

Experts use HF's 3-D layout: ``gate_up_proj [E, 2I, hidden]`` (gate rows first, then up rows) and
``down_proj [E, hidden, I]``; ``expert_e(x) = down_e @ (silu(gate_e @ x) * (up_e @ x))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-20


def router_logits(hidden: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """Router logits in fp32.

    Args:
        hidden: ``[..., hidden]`` any float dtype.
        gate_weight: ``[E, hidden]``.
    Returns:
        ``[T, E]`` float32 with ``T = hidden.numel() // hidden.shape[-1]``.
    """
    return F.linear(hidden.reshape(-1, hidden.shape[-1]).float(), gate_weight.float())


def _stable_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dim; ties -> lower index first."""
    return torch.sort(x, dim=-1, descending=True, stable=True)[1][..., :k]


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    n_group: int = 1,
    topk_group: int = 1,
    e_score_correction_bias: torch.Tensor | None = None,
    score_func: str = "sigmoid",
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 top-k routing.

    Args:
        logits: ``[T, E]`` router logits (computed in fp32).
        top_k: experts per token, ``1 <= top_k <= topk_group * E // n_group``.
        n_group, topk_group: group-limited selection (``n_group == 1`` disables it).
        e_score_correction_bias: ``[E]`` added to the scores for selection only (or None).
        score_func: ``"sigmoid"`` or ``"softmax"``.
        norm_topk_prob: renormalise the chosen weights to sum to 1 (``+1e-20``).
        routed_scaling_factor: final multiplier of the weights.
    Returns:
        ``weights [T, top_k]`` float32, ``indices [T, top_k]`` int64 (descending biased score,
        ties -> lower index) and ``scores [T, E]`` float32 (unbiased, differentiable).
    """
    T, E = logits.shape
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    if E % n_group != 0:
        raise ValueError(f"E={E} is not divisible by n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if not 1 <= top_k <= topk_group * (E // n_group):
        raise ValueError(f"top_k={top_k} must be in [1, topk_group * E / n_group]")
    logits = logits.float()
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores.detach()
    if e_score_correction_bias is not None:
        choice = choice + e_score_correction_bias.float()
    if n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.sort(dim=-1, descending=True)[0][..., :2].sum(dim=-1)  # [T, G]
        kept = _stable_topk(group_scores, topk_group)
        group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device)
        group_mask.scatter_(1, kept, True)
        expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    indices = _stable_topk(choice, top_k)
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + NORM_EPS)
    weights = weights * routed_scaling_factor
    return weights, indices, scores


def swiglu_experts(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Routed experts: ``out[t] = sum_k weights[t, k] * expert_{indices[t, k]}(hidden[t])``.

    Each expert's GEMMs run in the input dtype (as HF); the weighted sum is accumulated in fp32
    (fp64 for fp64 inputs, so tight fp64 checks stay tight).

    Args:
        hidden: ``[T, hidden]``.
        gate_up_proj: ``[E, 2I, hidden]``, rows ``[0, I)`` gate, ``[I, 2I)`` up.
        down_proj: ``[E, hidden, I]``.
        weights: ``[T, k]`` (float32 usually).
        indices: ``[T, k]`` integer expert ids in ``[0, E)``.
    Returns:
        ``[T, hidden]`` in ``hidden.dtype``.
    """
    T, H = hidden.shape
    E = gate_up_proj.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(T, H, dtype=acc, device=hidden.device)
    for e in range(E):
        token, slot = torch.where(indices == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(hidden[token], gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[e])
        out = out.index_add(0, token, y.to(acc) * weights[token, slot, None].to(acc))
    return out.to(hidden.dtype)


def swiglu_mlp(
    x: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """Dense SwiGLU MLP (the shared experts): ``down(silu(gate(x)) * up(x))``.

    Args:
        x: ``[..., hidden]``; gate_proj, up_proj: ``[I, hidden]``; down_proj: ``[hidden, I]``.
    Returns:
        ``[..., hidden]``.
    """
    return F.linear(F.silu(F.linear(x, gate_proj)) * F.linear(x, up_proj), down_proj)


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: ``[E]`` int64 counts of ``indices`` (any shape)."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts)


def _balance(scores: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` for one set of tokens.

    ``f_i`` = fraction of the ``T * k`` routed slots that went to expert ``i`` (no gradient),
    ``P_i`` = mean over tokens of the normalised affinity ``s_{t,i} / sum_j s_{t,j}`` (for softmax
    scores the normalisation is the identity).
    """
    T, k = indices.shape
    f = expert_load(indices, num_experts).to(scores.dtype) / (T * k)
    p = (scores / (scores.sum(dim=-1, keepdim=True) + NORM_EPS)).mean(dim=0)  # all-zero sigmoid rows: 0, not 0/0
    return num_experts * (f * p).sum()


def aux_loss_expert(
    scores: torch.Tensor, indices: torch.Tensor, num_experts: int, alpha: float
) -> torch.Tensor:
    """Expert-level balance loss ``alpha * E * sum_i f_i * P_i`` over all tokens.

    Args:
        scores: ``[T, E]`` unbiased router scores (differentiable).
        indices: ``[T, k]`` chosen experts.
    Returns:
        0-d float32 tensor; equals ``alpha`` for perfectly uniform routing and scores.
    """
    return alpha * _balance(scores.float(), indices, num_experts)


def aux_loss_sequence(
    scores: torch.Tensor, indices: torch.Tensor, num_experts: int, alpha: float, batch_size: int
) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3): the expert-level loss per sequence, averaged.

    Args:
        scores: ``[B * S, E]`` with tokens of one sequence contiguous.
        indices: ``[B * S, k]``.
        batch_size: ``B``.
    Returns:
        0-d float32 tensor.
    """
    T = scores.shape[0]
    if T % batch_size != 0:
        raise ValueError(f"{T} tokens do not split into {batch_size} sequences")
    S = T // batch_size
    losses = [
        _balance(scores[b * S : (b + 1) * S].float(), indices[b * S : (b + 1) * S], num_experts)
        for b in range(batch_size)
    ]
    return alpha * torch.stack(losses).mean()


def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """Aux-loss-free balancing step: ``bias + gamma * sign(mean(load) - load)``.

    Args:
        bias: ``[E]`` e_score_correction_bias (float32).
        load: ``[E]`` tokens routed to each expert.
    Returns:
        The new ``[E]`` bias (a new tensor).
    """
    load = load.float()
    return bias + gamma * torch.sign(load.mean() - load).to(bias.dtype)


def moe_forward(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    e_score_correction_bias: torch.Tensor | None = None,
    score_func: str = "sigmoid",
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> torch.Tensor:
    """Whole DeepSeek MoE block: route, routed experts, plus the shared experts.

    Args:
        hidden: ``[..., hidden]``; ``shared`` = (gate_proj, up_proj, down_proj) of the shared MLP.
    Returns:
        ``[..., hidden]`` in ``hidden.dtype``.
    """
    x = hidden.reshape(-1, hidden.shape[-1])
    weights, indices, _ = route(
        router_logits(x, gate_weight),
        top_k,
        n_group=n_group,
        topk_group=topk_group,
        e_score_correction_bias=e_score_correction_bias,
        score_func=score_func,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor,
    )
    out = swiglu_experts(x, gate_up_proj, down_proj, weights, indices)
    if shared is not None:
        out = out + swiglu_mlp(x, *shared)
    return out.reshape(hidden.shape)
