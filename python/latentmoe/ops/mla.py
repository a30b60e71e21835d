"""MLA ops (multi-head latent attention on a compressed latent cache), with fake kernels.

Cache rows are ``[c_kv (C) | k_pe (R)]``. A cache is either contiguous ``[B, Lmax, C+R]`` or paged
``[num_pages, page_size, C+R]`` addressed through ``block_table [B, max_pages]`` (int32): token
``t`` of row ``b`` is at page ``block_table[b, t // page_size]``, slot ``t % page_size``.

The ops validate ``cache_seqlens`` and the used ``block_table`` entries on the host (one small
device-to-host copy on CUDA), so bad values raise ``ValueError`` instead of reading out of bounds.
``mla_decode`` and ``mla_append_cache`` are inference ops (no autograd); ``mla_prefill`` has a
backward.
"""

from __future__ import annotations

import torch

_lib = torch.ops.latentmoe


def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    window: int = -1,
    pe_cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA attention directly on the latent cache.

    Args:
        q_latent: ``[B, Sq, H, C]`` absorbed queries (``w_uk^T q_nope``), fp32/bf16/fp16, contiguous.
        q_pe: ``[B, Sq, H, R]`` rotated rope queries, same dtype.
        kv_cache: ``[B, Lmax, C+R]`` or paged ``[num_pages, page_size, C+R]``, same dtype.
        cache_seqlens: ``[B]`` int32, tokens cached per row including the ``Sq`` new ones; query
            ``i`` sits at position ``cache_seqlens - Sq + i``.
        softmax_scale: score multiplier (see ``latentmoe.reference.mla.softmax_scale``).
        block_table: ``[B, max_pages]`` int32 for a paged cache, else None.
        causal: query ``i`` sees only keys at positions ``<=`` its own (matters for ``Sq > 1``).
        window: ``>= 0`` also hides keys before ``position - window``; ``-1`` = unbounded.
        pe_cache: optional separate ``k_pe`` rows (same leading dims as ``kv_cache``, last dim R);
            ``kv_cache`` then holds only ``c_kv`` (last dim C). Lets HF's cache (latents as keys,
            ``k_pe`` as values) be read without concatenating it.
    Returns:
        ``(out_latent [B, Sq, H, C] in q dtype, lse [B, Sq, H] fp32)``; rows without a visible key
        give 0 and ``-inf``. Multiply ``out_latent`` by ``w_uv`` per head for the value output.
    """
    return _lib.mla_decode.default(
        q_latent, q_pe, kv_cache, cache_seqlens, block_table, float(softmax_scale), causal, window, pe_cache
    )


def mla_append_cache(
    kv_cache: torch.Tensor,
    kv_latent: torch.Tensor,
    k_pe: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    rope_interleave: bool = True,
) -> None:
    """Fused ``kv_a_layernorm`` + RoPE of ``k_pe`` + write of new tokens into the cache (in place).

    Args:
        kv_cache: contiguous or paged cache (see module doc); **mutated** at the target slots only.
        kv_latent: ``[B, S, C]`` un-normalised latents (first C outputs of ``kv_a_proj_with_mqa``).
        k_pe: ``[B, S, R]`` un-rotated rope keys (the last R outputs).
        norm_weight: ``[C]`` ``kv_a_layernorm.weight``; ``eps`` its epsilon (HF RMSNorm numerics).
        cos, sin: ``[B, S, R]`` HF rotary embeddings at the new tokens' positions.
        cache_seqlens: ``[B]`` int32 tokens already cached; token ``s`` goes to slot
            ``cache_seqlens[b] + s``. Not updated here.
        block_table: ``[B, max_pages]`` int32 for a paged cache.
        rope_interleave: HF ``config.rope_interleave``.
    """
    _lib.mla_append_cache.default(
        kv_cache, kv_latent, k_pe, norm_weight, float(eps), cos, sin, cache_seqlens, block_table,
        rope_interleave,
    )


def mla_prefill(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    kv_b_weight: torch.Tensor,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    window: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA prefill with in-kernel latent decompression (CPU kernel; no CUDA kernel yet).

    Attention of the ``S`` new tokens (the last ``S`` of each row's ``cache_seqlens`` cached
    tokens) over the latent cache; each tile of latents is expanded to one head's K/V through
    ``kv_b_weight`` inside the kernel, so per-head K/V of the whole sequence never exist.

    Args:
        q_nope: ``[B, S, H, N]``; q_pe: ``[B, S, H, R]`` (rotated). fp32/bf16/fp16, contiguous.
        kv_cache: contiguous ``[B, Lmax, C+R]`` or paged (see module doc), rows ``[c_kv | k_pe]``.
        cache_seqlens: ``[B]`` int32, tokens cached per row (the ``S`` new ones included).
        kv_b_weight: ``[H*(N+V), C]``, HF ``kv_b_proj.weight``.
        causal, window: as :func:`mla_decode`.
    Returns:
        ``(out [B, S, H, V] in q dtype, lse [B, S, H] fp32)``.
    Autograd: gradients for ``q_nope``, ``q_pe``, a contiguous ``kv_cache`` (latents and k_pe)
    and ``kv_b_weight``, computed in fp32 by a backward chunked over keys (memory
    O(B*H*S*chunk + B*chunk*H*(N+V)), never all of ``B*L*H*(N+V)`` at once).
    """
    return _lib.mla_prefill.default(
        q_nope, q_pe, kv_cache, cache_seqlens, block_table, kv_b_weight, float(softmax_scale), causal, window
    )


@torch.library.register_fake("latentmoe::mla_prefill")
def _mla_prefill_fake(
    q_nope, q_pe, kv_cache, cache_seqlens, block_table, kv_b_weight, softmax_scale, causal=True, window=-1
):
    B, S, H, N = q_nope.shape
    V = kv_b_weight.shape[0] // H - N
    return q_nope.new_empty((B, S, H, V)), q_nope.new_empty((B, S, H), dtype=torch.float32)


_BWD_CHUNK_ELEMS = 1 << 24  # score-sized elements (B*H*S*chunk) per backward chunk


def _prefill_setup(ctx, inputs, output):
    q_nope, q_pe, kv_cache, cache_seqlens, block_table, kv_b_weight, scale, causal, window = inputs
    out, lse = output
    ctx.meta = (scale, causal, window, block_table is not None)
    ctx.save_for_backward(q_nope, q_pe, kv_cache, cache_seqlens, kv_b_weight, out, lse)


def _prefill_bwd(ctx, grad_out, _grad_lse):
    """Chunked flash-style backward in fp32: per key chunk, re-decompress K/V, rebuild the
    probabilities from the saved LSE, and accumulate every gradient."""
    q_nope, q_pe, kv, seqlens, w, out, lse = ctx.saved_tensors
    scale, causal, window, paged = ctx.meta
    if paged:
        raise NotImplementedError(
            "latentmoe.mla_prefill: backward needs a contiguous kv_cache, not a paged one"
        )
    B, S, H, N = q_nope.shape
    R = q_pe.shape[-1]
    C = w.shape[1]
    V = w.shape[0] // H - N
    f = torch.float32
    wv = w.float().view(H, N + V, C)
    qh = torch.cat([q_nope, q_pe], dim=-1).float().transpose(1, 2)  # [B, H, S, N+R]
    do_h = grad_out.float().transpose(1, 2)  # [B, H, S, V]
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2)[..., None]  # [B, H, S, 1]
    lse_b = lse.transpose(1, 2)[..., None]  # [B, H, S, 1]
    lse_b = torch.where(torch.isinf(lse_b), torch.zeros_like(lse_b), lse_b)
    d_qh = torch.zeros_like(qh)
    d_kv = torch.zeros(kv.shape, dtype=f, device=kv.device)
    d_w = torch.zeros(H, N + V, C, dtype=f, device=w.device)
    L = kv.shape[1]  # static (no data-dependent sync); slots past a row's length are masked
    chunk = max(1, _BWD_CHUNK_ELEMS // max(1, B * H * S))
    lens = seqlens.to(torch.long)
    q_pos = lens[:, None] - S + torch.arange(S, device=kv.device)[None]  # [B, S]
    for j0 in range(0, L, chunk):
        j1 = min(L, j0 + chunk)
        j = torch.arange(j0, j1, device=kv.device)
        vis = j[None, None, :] < lens[:, None, None]  # [B, 1, Lc]
        if causal:
            vis = vis & (j[None, None, :] <= q_pos[:, :, None])
        if window >= 0:
            vis = vis & (j[None, None, :] >= q_pos[:, :, None] - window)
        vis = vis.expand(B, S, j1 - j0)[:, None]  # [B, 1, S, Lc]
        c = kv[:, j0:j1, :C].float().nan_to_num()  # [B, Lc, C]
        k_pe = kv[:, j0:j1, C:].float().nan_to_num()  # [B, Lc, R]
        up = torch.matmul(c[:, None], wv.transpose(1, 2)[None])  # [B, H, Lc, N+V] (this chunk only)
        k = torch.cat([up[..., :N], k_pe[:, None].expand(B, H, j1 - j0, R)], dim=-1)
        v = up[..., N:]
        s = torch.matmul(qh, k.transpose(-1, -2)) * scale  # [B, H, S, Lc]
        p = torch.where(vis, torch.exp(s - lse_b), 0.0)
        d_v = torch.matmul(p.transpose(-1, -2), do_h)  # [B, H, Lc, V]
        d_s = p * (torch.matmul(do_h, v.transpose(-1, -2)) - delta) * scale
        d_qh += torch.matmul(d_s, k)
        d_k = torch.matmul(d_s.transpose(-1, -2), qh)  # [B, H, Lc, N+R]
        d_up = torch.cat([d_k[..., :N], d_v], dim=-1)  # [B, H, Lc, N+V]
        d_kv[:, j0:j1, C:] = d_k[..., N:].sum(1)
        d_kv[:, j0:j1, :C] = torch.einsum("bhlk,hkc->blc", d_up, wv)
        d_w += torch.einsum("bhlk,blc->hkc", d_up, c)
    d_q = d_qh.transpose(1, 2)
    d_qn, d_qp = d_q[..., :N], d_q[..., N:]
    return (
        d_qn.to(q_nope.dtype), d_qp.to(q_pe.dtype), d_kv.to(kv.dtype), None, None,
        d_w.view_as(w).to(w.dtype), None, None, None,
    )


torch.library.register_autograd("latentmoe::mla_prefill", _prefill_bwd, setup_context=_prefill_setup)


@torch.library.register_fake("latentmoe::mla_decode")
def _mla_decode_fake(
    q_latent, q_pe, kv_cache, cache_seqlens, block_table, softmax_scale, causal=True, window=-1, pe_cache=None
):
    B, Sq, H, _ = q_latent.shape
    return torch.empty_like(q_latent), q_latent.new_empty((B, Sq, H), dtype=torch.float32)


@torch.library.register_fake("latentmoe::mla_append_cache")
def _mla_append_cache_fake(
    kv_cache, kv_latent, k_pe, norm_weight, eps, cos, sin, cache_seqlens, block_table, rope_interleave
):
    return None
