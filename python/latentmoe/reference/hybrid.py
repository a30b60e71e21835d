"""Reference hybrid (sliding-window + global) attention with FlashAttention's window semantics.

Layout follows FlashAttention: ``q [B, Sq, Hq, D]``, ``k [B, Sk, Hkv, D]``, ``v [B, Sk, Hkv, Dv]``,
output ``[B, Sq, Hq, Dv]`` and log-sum-exp ``[B, Hq, Sq]``. ``Hq`` must be a multiple of ``Hkv``
(grouped-query attention: query head ``h`` reads key/value head ``h // (Hq // Hkv)``).

Which keys a query sees (True = attend):

* Queries are aligned to the *end* of the keys, as FlashAttention does when ``Sq != Sk``: query
  ``i`` sits at key position ``p(i) = i + Sk - Sq``.
* ``window_size=(left, right)``: key ``j`` is in the band iff ``p(i) - left <= j <= p(i) + right``;
  ``-1`` leaves that side unbounded, so ``(-1, -1)`` is full attention.
* ``causal=True`` additionally requires ``j <= p(i)`` for every key, including global ones (so a
  causal window is ``(left, 0)``; a larger ``right`` is cut to 0, as FlashAttention does).
* ``global_tokens`` (bool over key positions, Longformer-style): a global key is seen by every
  query, and a query whose position ``p(i)`` is global sees every key (both still subject to
  ``causal``). Queries with ``p(i) < 0`` (only when ``Sq > Sk``) are never global.
* A query that sees no key at all gets output 0 and log-sum-exp ``-inf`` (the empty log-sum-exp),
  never NaN. FlashAttention also gives output 0 there, but its non-split forward writes LSE
  ``+inf`` for such rows (``-inf`` only in split-KV partials): a kernel ported from it must map
  that to ``-inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

LayerType = Literal["sliding_attention", "full_attention"]
WindowSpec = tuple[int, int] | Sequence[tuple[int, int]] | torch.Tensor


def _window_table(window_size: WindowSpec, device: torch.device | str | None) -> torch.Tensor:
    """Normalise a window spec to an int64 ``[Hw, 2]`` table of ``(left, right)``, ``Hw`` = 1 or heads."""
    if isinstance(window_size, torch.Tensor):
        table = window_size.to(device=device, dtype=torch.int64)
    elif len(window_size) == 2 and all(isinstance(w, int) for w in window_size):
        table = torch.tensor([list(window_size)], dtype=torch.int64, device=device)
    else:
        table = torch.tensor([list(w) for w in window_size], dtype=torch.int64, device=device)
    if table.dim() != 2 or table.shape[1] != 2 or table.shape[0] == 0:
        raise ValueError(
            f"window_size must be (left, right), a list of them, or an int tensor [H, 2]; got {window_size!r}"
        )
    if bool((table < -1).any()):
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {table.tolist()}")
    return table


def window_mask(
    sq: int,
    sk: int,
    window_size: WindowSpec = (-1, -1),
    *,
    causal: bool = False,
    global_tokens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean attention mask (True = query may attend to key) under the module's rules.

    Args:
        sq, sk: query and key lengths (``sq != sk`` allowed, bottom-right aligned).
        window_size: ``(left, right)`` for all heads, a list of ``H`` such pairs, or an int tensor
            ``[H, 2]`` (per-head windows); ``-1`` means unbounded.
        causal: forbid keys after the query's position (also for global tokens).
        global_tokens: optional bool ``[sk]`` or ``[B, sk]`` marking global key positions.
        device: where to build the mask (defaults to ``global_tokens``' device).

    Returns:
        bool ``[Bm, Hm, sq, sk]`` with ``Bm`` = B if ``global_tokens`` is per batch else 1 and
        ``Hm`` = H for per-head windows else 1; it broadcasts against ``[B, H, sq, sk]`` scores.
    """
    if global_tokens is not None and device is None:
        device = global_tokens.device
    table = _window_table(window_size, device)
    left, right = table[:, 0, None, None], table[:, 1, None, None]  # [Hm, 1, 1]
    qpos = torch.arange(sq, device=device)[:, None] + (sk - sq)  # [sq, 1]
    kpos = torch.arange(sk, device=device)[None, :]  # [1, sk]
    offset = kpos - qpos  # key minus query position, [sq, sk]
    band = ((left < 0) | (offset >= -left)) & ((right < 0) | (offset <= right))  # [Hm, sq, sk]
    mask = band[None]  # [1, Hm, sq, sk]

    if global_tokens is not None:
        if global_tokens.dtype != torch.bool or global_tokens.shape[-1] != sk or global_tokens.dim() > 2:
            raise ValueError(
                f"global_tokens must be a bool tensor [sk={sk}] or [B, sk], "
                f"got {global_tokens.dtype} {tuple(global_tokens.shape)}"
            )
        is_global = global_tokens.to(device)
        is_global = is_global.reshape(1 if is_global.dim() == 1 else is_global.shape[0], sk)  # [Bm, sk]
        key_global = is_global[:, None, None, :]  # [Bm, 1, 1, sk]
        qpos_flat = qpos[:, 0]
        valid = qpos_flat >= 0
        query_global = torch.zeros(is_global.shape[0], sq, dtype=torch.bool, device=device)
        query_global[:, valid] = is_global[:, qpos_flat[valid]]
        mask = mask | key_global | query_global[:, None, :, None]
    if causal:
        mask = mask & (offset <= 0)
    return mask


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: WindowSpec = (-1, -1),
    *,
    causal: bool = False,
    global_tokens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted by :func:`window_mask`; returns output and log-sum-exp.

    Args:
        q: ``[B, Sq, Hq, D]``; k: ``[B, Sk, Hkv, D]``; v: ``[B, Sk, Hkv, Dv]``; one float dtype.
        window_size, causal, global_tokens: see :func:`window_mask` (per-head windows are indexed
            by query head, so a per-head table has ``Hq`` rows).
        softmax_scale: logits scale, default ``D ** -0.5``.
        upcast: compute in fp32 (fp64 stays fp64). ``False`` computes in the input dtype, to
            measure how much error plain low-precision attention makes.

    Returns:
        ``(out [B, Sq, Hq, Dv] in q.dtype, lse [B, Hq, Sq])`` where
        ``lse = log(sum_j exp(scale * q.k_j))`` over visible keys, fp32 (fp64 for fp64 input).
        Fully masked rows give ``out = 0`` and ``lse = -inf``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"windowed_attention: q, k, v must be 4-D [B, S, H, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    batch, sq, hq, dim = q.shape
    _, sk, hkv, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != dim or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"windowed_attention: k must be [B={batch}, Sk, Hkv, D={dim}] and v [B, Sk, Hkv, Dv] "
            f"matching k; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"windowed_attention: q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"windowed_attention: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    table = _window_table(window_size, q.device)
    if table.shape[0] not in (1, hq):
        raise ValueError(f"windowed_attention: window_size has {table.shape[0]} rows, need 1 or Hq={hq}")

    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    if q.dtype == torch.float64:
        compute = torch.float64
    else:
        compute = torch.float32 if upcast else q.dtype
    group = hq // hkv
    qc = q.to(compute).transpose(1, 2)  # [B, Hq, Sq, D]
    kc = k.to(compute).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, Sk, D]
    vc = v.to(compute).transpose(1, 2).repeat_interleave(group, dim=1)

    mask = window_mask(sq, sk, table, causal=causal, global_tokens=global_tokens, device=q.device)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if sk == 0:  # nothing to attend to: every row is fully masked
        out = q.new_zeros(batch, sq, hq, v.shape[-1])
        return out, torch.full((batch, hq, sq), -math.inf, dtype=lse_dtype, device=q.device)
    scores = (qc @ kc.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    probs = torch.exp(scores - row_max)  # exactly 0 at masked keys
    denom = probs.sum(dim=-1, keepdim=True)
    out = (probs @ vc) / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (denom.to(lse_dtype).log() + row_max.to(lse_dtype)).squeeze(-1)  # log(0) = -inf
    return out.transpose(1, 2).to(q.dtype), lse


def layer_types(num_layers: int, full_attention_every: int) -> list[LayerType]:
    """Gemma-style schedule: every ``full_attention_every``-th layer (1-based) is full attention.

    ``full_attention_every=2`` gives Gemma 2 (sliding, full, sliding, ...); 6 gives Gemma 3's
    five sliding layers per full one; 1 makes every layer full.
    """
    if num_layers < 0 or full_attention_every < 1:
        raise ValueError(
            f"layer_types: need num_layers >= 0 and full_attention_every >= 1, "
            f"got {num_layers}, {full_attention_every}"
        )
    return [
        "full_attention" if (i + 1) % full_attention_every == 0 else "sliding_attention"
        for i in range(num_layers)
    ]


def layer_window(
    layer_type: LayerType, sliding_window: int | None, *, causal: bool = True
) -> tuple[int, int]:
    """FlashAttention ``window_size`` for one layer of a Hugging Face-style schedule.

    HF's ``sliding_window=W`` lets a causal query see the ``W`` most recent keys including itself,
    i.e. ``(W - 1, 0)``. Non-causal gives ``(W - 1, W - 1)``, the window HF passes to
    FlashAttention (HF's own bidirectional mask function allows ``|q - k| <= W``, one wider).
    Full layers get ``(-1, 0)`` causal and ``(-1, -1)`` otherwise.
    """
    if layer_type == "full_attention":
        return (-1, 0) if causal else (-1, -1)
    if layer_type != "sliding_attention":
        raise ValueError(
            f"layer_window: layer_type must be 'sliding_attention' or 'full_attention', got {layer_type!r}"
        )
    if sliding_window is None or sliding_window < 1:
        raise ValueError(
            f"layer_window: sliding_window must be >= 1 for a sliding layer, got {sliding_window}"
        )
    return (sliding_window - 1, 0) if causal else (sliding_window - 1, sliding_window - 1)
