"""Reference multi-head latent attention (MLA, DeepSeek-V2/V3), pure PyTorch, written for clarity.

Notation (per token): ``C`` = kv_lora_rank, ``R`` = qk_rope_head_dim, ``N`` = qk_nope_head_dim,
``V`` = v_head_dim, ``H`` = heads. The latent cache row of a token is ``[c_kv (C) | k_pe (R)]``:
``c_kv`` is ``kv_a_layernorm`` of the compressed latent and ``k_pe`` the rotated shared rope key.

``kv_b_proj.weight`` ``[H*(N+V), C]`` viewed as ``[H, N+V, C]`` splits into ``w_uk [H, N, C]`` and
``w_uv [H, V, C]``. Two equivalent ways to attend:

* naive: decompress every cached token to per-head ``k = [w_uk c | k_pe]`` and ``v = w_uv c``;
* absorbed: ``q_latent_h = w_uk_h^T q_nope_h`` (``C`` dims), score ``(q_latent_h . c + q_pe_h . k_pe)
  * scale``, ``out_latent_h = sum_j p_j c_j`` and finally ``o_h = w_uv_h out_latent_h``.

Conventions follow Hugging Face ``DeepseekV3Attention`` (transformers 5.x): RoPE with or without
``rope_interleave``, the YaRN ``mscale_all_dim`` correction of the softmax scale, RMSNorm numerics.
This module is ground truth for tests and docs; the library never calls it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# Scale and RoPE
# --------------------------------------------------------------------------------------------


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config) -> float:
    """Softmax scale of MLA as HF computes it.

    ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, times ``mscale**2`` with
    ``mscale = yarn_get_mscale(factor, mscale_all_dim)`` when the rope type is not ``default`` and
    ``mscale_all_dim`` is set (non-zero) in ``config.rope_parameters`` (legacy: ``rope_scaling``).
    """
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = yarn_get_mscale(params["factor"], mscale_all_dim)
            scale = scale * m * m
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the rope part of queries or keys, HF's convention, computed in ``x``'s dtype.

    Args:
        x: ``[B, S, H, R]`` (any number of heads, including 1 for the shared ``k_pe``).
        cos, sin: ``[B, S, R]`` as HF's rotary embedding returns them: ``cat(freqs, freqs)``
            (already multiplied by the YaRN attention factor), in ``x``'s dtype.
        interleave: ``config.rope_interleave``. True: pairs are ``(x[2i], x[2i+1])`` rotated by
            angle ``i`` and the result is laid out de-interleaved, ``[rot_even | rot_odd]`` (this is
            what HF writes into its cache). False: ``rotate_half``, pairs ``(x[i], x[i + R/2])``.
    Returns:
        ``[B, S, H, R]`` in ``x.dtype``; same op order as HF, so bit-identical to it.
    """
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    r = x.shape[-1]
    if interleave:
        c, s = cos[..., : r // 2], sin[..., : r // 2]
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.cat([even * c - odd * s, odd * c + even * s], dim=-1)
    first, second = x[..., : r // 2], x[..., r // 2 :]
    return (x * cos) + (torch.cat((-second, first), dim=-1) * sin)


def split_kv_b(kv_b_weight: torch.Tensor, num_heads: int, nope_dim: int, v_dim: int):
    """``kv_b_proj.weight [H*(N+V), C]`` -> ``(w_uk [H, N, C], w_uv [H, V, C])`` (views)."""
    w = kv_b_weight.view(num_heads, nope_dim + v_dim, kv_b_weight.shape[-1])
    return w[:, :nope_dim], w[:, nope_dim:]


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def visible_keys(
    seqlen: int, num_queries: int, n_keys: int, causal: bool, window: int, device=None
) -> torch.Tensor:
    """Boolean ``[Sq, n_keys]`` mask of which cache positions each query sees.

    The ``Sq`` queries are the last ``Sq`` tokens of a sequence of ``seqlen`` tokens (all already
    in the cache), so query ``i`` sits at position ``p = seqlen - Sq + i``. Key ``j`` is visible iff
    ``j < seqlen``, and ``j <= p`` when ``causal``, and ``j >= p - window`` when ``window >= 0``
    (FlashAttention's left window; ``-1`` = unbounded).
    """
    j = torch.arange(n_keys, device=device)[None, :]
    p = (seqlen - num_queries + torch.arange(num_queries, device=device))[:, None]
    ok = j < seqlen
    if causal:
        ok = ok & (j <= p)
    if window >= 0:
        ok = ok & (j >= p - window)
    return ok


# --------------------------------------------------------------------------------------------
# Attention on the latent cache
# --------------------------------------------------------------------------------------------


def gather_paged(kv_cache: torch.Tensor, block_table: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Paged cache ``[num_pages, page_size, D]`` + ``block_table [B, max_pages]`` -> contiguous
    ``[B, n_tokens, D]``: token ``t`` of row ``b`` lives at page ``block_table[b, t // page_size]``,
    slot ``t % page_size``. ``n_tokens <= max_pages * page_size``.
    """
    page_size = kv_cache.shape[1]
    t = torch.arange(n_tokens, device=kv_cache.device)
    pages = block_table[:, t // page_size].long()  # [B, n_tokens]
    return kv_cache[pages, (t % page_size)[None, :]]


def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    window: int = -1,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA attention on the latent cache.

    Args:
        q_latent: ``[B, Sq, H, C]`` absorbed queries ``w_uk^T q_nope``.
        q_pe: ``[B, Sq, H, R]`` rotated rope queries.
        kv_cache: contiguous ``[B, Lmax, C+R]``, or paged ``[num_pages, page_size, C+R]`` when
            ``block_table [B, max_pages]`` (int) is given.
        cache_seqlens: ``[B]`` int, tokens in the cache per row (they include the ``Sq`` new ones).
        softmax_scale: multiplies the raw scores.
        causal, window: see :func:`visible_keys` (``causal`` only matters for ``Sq > 1``).
        upcast: compute in fp32 (ground truth). False computes the scores and the weighted sum in
            the input dtype with an fp32 softmax, like HF eager (the "reference in low precision").
    Returns:
        ``out_latent [B, Sq, H, C]`` in ``q_latent.dtype`` and ``lse [B, Sq, H]`` fp32 (natural
        log). Rows with no visible key give 0 and ``-inf``.
    """
    B, Sq, H, C = q_latent.shape
    R = q_pe.shape[-1]
    lengths = [int(v) for v in cache_seqlens.tolist()]
    acc = torch.promote_types(q_latent.dtype, torch.float32)
    out = torch.zeros(B, Sq, H, C, dtype=acc, device=q_latent.device)
    lse = torch.full((B, Sq, H), -math.inf, dtype=torch.float32, device=q_latent.device)
    cdt = torch.promote_types(q_latent.dtype, torch.float32) if upcast else q_latent.dtype
    for b in range(B):
        L = lengths[b]
        if L == 0:
            continue
        if block_table is None:
            rows = kv_cache[b, :L]
        else:
            rows = gather_paged(kv_cache, block_table[b : b + 1], L)[0]
        c_kv, k_pe = rows[:, :C].to(cdt), rows[:, C : C + R].to(cdt)
        ql, qp = q_latent[b].to(cdt), q_pe[b].to(cdt)  # [Sq, H, C], [Sq, H, R]
        scores = torch.einsum("shc,lc->shl", ql, c_kv) + torch.einsum("shr,lr->shl", qp, k_pe)
        scores = scores.to(acc)
        scores = scores * softmax_scale
        ok = visible_keys(L, Sq, L, causal, window, device=q_latent.device)  # [Sq, L]
        scores = scores.masked_fill(~ok[:, None, :], -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)  # [Sq, H]
        has_keys = ok.any(-1)[:, None].expand(Sq, H)
        p = torch.where(has_keys[..., None], torch.exp(scores - row_lse[..., None]), 0.0)
        out[b] = torch.einsum("shl,lc->shc", p.to(cdt), c_kv).to(acc)
        lse[b] = torch.where(has_keys, row_lse, -math.inf).float()
    return out.to(q_latent.dtype), lse


def mla_naive(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    softmax_scale: float,
    cache_seqlens: torch.Tensor | None = None,
    causal: bool = True,
    window: int = -1,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive MLA: decompress the latents to per-head K/V and attend (fp32 math).

    Args:
        q_nope: ``[B, Sq, H, N]``; q_pe: ``[B, Sq, H, R]`` (rotated).
        c_kv: ``[B, L, C]`` normalised latents; k_pe: ``[B, L, R]`` rotated shared rope keys.
        w_uk: ``[H, N, C]``; w_uv: ``[H, V, C]``.
        cache_seqlens: ``[B]`` valid tokens per row (default ``L``); masking as :func:`mla_decode`.
        attention_mask: optional HF-style mask ``[B, 1, Sq, L]`` (bool: True = keep, or additive
            float). When given, it replaces ``causal``/``window``/``cache_seqlens`` masking.
    Returns:
        ``out [B, Sq, H, V]`` in ``q_nope.dtype`` and ``lse [B, Sq, H]`` fp32.
    """
    B, Sq, H, _ = q_nope.shape
    L = c_kv.shape[1]
    f = torch.promote_types(q_nope.dtype, torch.float32)
    k_nope = torch.einsum("blc,hnc->bhln", c_kv.to(f), w_uk.to(f))
    v = torch.einsum("blc,hvc->bhlv", c_kv.to(f), w_uv.to(f))
    k = torch.cat([k_nope, k_pe.to(f)[:, None].expand(B, H, L, -1)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).to(f).transpose(1, 2)  # [B, H, Sq, N+R]
    scores = torch.einsum("bhsd,bhld->bhsl", q, k) * softmax_scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            keep = attention_mask.expand(B, H, Sq, L)
        else:
            scores = scores + attention_mask.to(f)
            keep = torch.isfinite(scores)
    else:
        if cache_seqlens is None:
            cache_seqlens = torch.full((B,), L, dtype=torch.int32)
        keep = torch.stack(
            [visible_keys(int(n), Sq, L, causal, window, device=q.device) for n in cache_seqlens.tolist()]
        )[:, None].expand(B, H, Sq, L)
    scores = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
    any_key = keep.any(-1)
    p = torch.where(any_key[..., None], torch.exp(scores - lse[..., None]), 0.0)
    out = torch.einsum("bhsl,bhlv->bshv", p, v)
    lse = torch.where(any_key, lse, -math.inf).transpose(1, 2)
    return out.to(q_nope.dtype), lse.float().contiguous()


# --------------------------------------------------------------------------------------------
# Reference layer
# --------------------------------------------------------------------------------------------


class _RMSNorm(nn.Module):
    """HF ``DeepseekV3RMSNorm`` numerics: ``weight * to_dtype(x * rsqrt(mean(x^2) + eps))``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)


class ReferenceLatentCache:
    """Minimal latent cache for the reference layer: a growing ``[B, L, C+R]`` tensor."""

    def __init__(self):
        self.kv: torch.Tensor | None = None

    def append(self, rows: torch.Tensor) -> torch.Tensor:
        """Append ``[B, S, C+R]`` rows; returns the whole ``[B, L, C+R]`` cache."""
        self.kv = rows if self.kv is None else torch.cat([self.kv, rows], dim=1)
        return self.kv


class ReferenceMLA(nn.Module):
    """MLA layer with the same parameters (names and shapes) as HF ``DeepseekV3Attention``.

    ``forward(hidden_states [B, S, hidden], position_embeddings=(cos, sin) [B, S, R],
    attention_mask=None, latent_cache=None, mode="naive")`` -> ``[B, S, hidden]``.
    With a :class:`ReferenceLatentCache`, the new tokens are appended (as HF caches them:
    normalised latent and rotated ``k_pe``) and attention runs over the whole cache, causal by
    position. ``mode`` is ``"naive"`` (decompressed per-head K/V) or ``"absorbed"`` (on the latent
    cache via :func:`mla_decode`). ``attention_mask`` (HF 4-D) is honoured in naive mode.
    """

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            # HF builds both attention norms with the default eps (1e-6), not rms_norm_eps.
            self.q_a_layernorm = _RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = _RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, hidden, bias=bias)
        self.scaling = softmax_scale(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        latent_cache: ReferenceLatentCache | None = None,
        mode: str = "naive",
    ) -> torch.Tensor:
        B, S, _ = hidden_states.shape
        H, N, R, C = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(B, S, H, N + R)
        q_nope, q_pe = q[..., :N], q[..., N:]
        kv = self.kv_a_proj_with_mqa(hidden_states)
        c_kv = self.kv_a_layernorm(kv[..., :C])
        k_pe = kv[..., C:].view(B, S, 1, R)
        cos, sin = position_embeddings
        interleave = bool(getattr(self.config, "rope_interleave", True))
        q_pe = apply_rope(q_pe, cos, sin, interleave)
        k_pe = apply_rope(k_pe, cos, sin, interleave)[:, :, 0]
        rows = torch.cat([c_kv, k_pe], dim=-1)
        if latent_cache is not None:
            rows = latent_cache.append(rows)
        L = rows.shape[1]
        w_uk, w_uv = split_kv_b(self.kv_b_proj.weight, H, N, self.v_head_dim)
        if mode == "naive":
            out, _ = mla_naive(
                q_nope, q_pe, rows[..., :C], rows[..., C:], w_uk, w_uv, self.scaling,
                cache_seqlens=torch.full((B,), L), causal=True, attention_mask=attention_mask,
            )
        elif mode == "absorbed":
            acc = torch.promote_types(q_nope.dtype, torch.float32)  # fp64 stays fp64
            q_latent = torch.einsum("bshn,hnc->bshc", q_nope.to(acc), w_uk.to(acc))
            out_latent, _ = mla_decode(
                q_latent, q_pe.to(acc), rows.to(acc), torch.full((B,), L), self.scaling, causal=True
            )
            out = torch.einsum("bshc,hvc->bshv", out_latent, w_uv.to(acc)).to(hidden_states.dtype)
        else:
            raise ValueError(f"ReferenceMLA: unknown mode {mode!r} (naive or absorbed)")
        return self.o_proj(out.reshape(B, S, H * self.v_head_dim))
