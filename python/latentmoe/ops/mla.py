"""MLA ops (multi-head latent attention on a compressed latent cache), with fake kernels.

Cache rows are ``[c_kv (C) | k_pe (R)]``. A cache is either contiguous ``[B, Lmax, C+R]`` or paged
``[num_pages, page_size, C+R]`` addressed through ``block_table [B, max_pages]`` (int32): token
``t`` of row ``b`` is at page ``block_table[b, t // page_size]``, slot ``t % page_size``.

By default the ops check ``cache_seqlens`` and the used ``block_table`` entries on the host (one
small device-to-host copy on CUDA), so bad values raise ``ValueError``. A caller that already knows
its lengths (e.g. :class:`latentmoe.nn.LatentKVCache`, which keeps a host copy) can skip that copy
and its device sync, which also lets the calls be captured in a CUDA graph: ``mla_decode(...,
max_seqlen=n)`` and ``mla_append_cache(..., check_values=False)``. The CUDA kernels then keep every
access inside the cache whatever the values (rows cut at ``max_seqlen``, slots past the capacity
skipped, pages clamped into the pool): bad values give wrong numbers, never an out-of-bounds read
or write. The CPU kernels check the values either way (there is no sync to save).
``mla_decode`` and ``mla_append_cache`` are inference ops with no backward (a gradient reaching
``mla_decode`` raises ``RuntimeError``; ``mla_append_cache`` raises ``RuntimeError`` under grad mode
when any input requires grad, before writing, and bumps ``kv_cache``'s version counter, so a
backward that saved the cache before the write raises instead of reading the new contents).
Prefill and training use ``latentmoe.ops.mla_prefill`` (in-kernel latent decompression, with a
backward).
"""

from __future__ import annotations

import torch

from latentmoe.ops._checks import (
    check_mla_append_cache, check_mla_decode, check_mla_decode_absorbed, cpu_only,
)
from latentmoe.ops.linear import MAX_ROWS

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
    max_seqlen: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA attention directly on the latent cache.

    Args:
        q_latent: ``[B, Sq, H, C]`` absorbed queries (``w_uk^T q_nope``), fp32/bf16/fp16, contiguous.
        q_pe: ``[B, Sq, H, R]`` rotated rope queries, same dtype, contiguous.
        kv_cache: ``[B, Lmax, C+R]`` or paged ``[num_pages, page_size, C+R]``, same dtype, contiguous.
        cache_seqlens: ``[B]`` int32, tokens cached per row including the ``Sq`` new ones; query
            ``i`` sits at position ``cache_seqlens - Sq + i``.
        softmax_scale: score multiplier (see ``latentmoe.reference.mla.softmax_scale``).
        block_table: ``[B, max_pages]`` int32 for a paged cache, else None.
        causal: query ``i`` sees only keys at positions ``<=`` its own (matters for ``Sq > 1``).
        window: ``>= 0`` also hides keys before ``position - window``; ``-1`` = unbounded.
        pe_cache: optional separate ``k_pe`` rows (same leading dims as ``kv_cache``, last dim R);
            ``kv_cache`` then holds only ``c_kv`` (last dim C). Lets HF's cache (latents as keys,
            ``k_pe`` as values) be read without concatenating it.
        max_seqlen: ``-1`` checks ``cache_seqlens`` / ``block_table`` on the host; ``n >= 0`` (at
            most the capacity) promises every ``cache_seqlens`` entry is ``<= n`` and skips that
            check and its sync on CUDA (rows longer than ``n`` are cut at ``n`` there; the CPU
            raises ``ValueError``). It also sizes the CUDA key splits.
    Returns:
        ``(out_latent [B, Sq, H, C] in q dtype, lse [B, Sq, H] fp32)``; rows without a visible key
        give 0 and ``-inf``. Multiply ``out_latent`` by ``w_uv`` per head for the value output.

    Numerics: scores and softmax in fp32 everywhere. On CUDA, bf16 / fp16 calls with C and R
    multiples of 8 (and C <= 512) run on tensor cores, where the softmax weights are rounded to the
    input dtype before the weighted sum (as flash attention does; within about an ulp of the
    output); fp32 and other widths run on CUDA cores in fp32. ``LATENTMOE_MLA_DECODE_KERNEL=
    cuda_cores|tensor_cores`` forces one (``ValueError`` where tensor cores do not apply).
    """
    return _lib.mla_decode.default(
        q_latent, q_pe, kv_cache, cache_seqlens, block_table, float(softmax_scale), causal, window, pe_cache,
        max_seqlen if isinstance(max_seqlen, torch.SymInt) else int(max_seqlen),  # symbolic stays so
    )


def mla_decode_absorbed(
    q: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_b_weight: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    nope_dim: int,
    block_table: torch.Tensor | None = None,
    rope_interleave: bool = True,
    causal: bool = True,
    window: int = -1,
    pe_cache: torch.Tensor | None = None,
    max_seqlen: int = -1,
) -> torch.Tensor:
    """A decode step's MLA attention from the q projection's per-head queries, in one call.

    Does what :class:`latentmoe.nn.MultiHeadLatentAttention` does around :func:`mla_decode` in a
    decode step: rotates the rope part of the queries, absorbs ``W_UK`` into the rest, attends on the
    latent cache and applies ``W_UV``, reading both from ``kv_b_weight`` in place. One op instead of
    the separate ones (on a 2-core CPU their dispatch and the Python between them cost about a tenth
    of a decode step).

    Args:
        q: ``[B, S, H, N + R]`` the q projection's output per head (HF ``q_proj`` / ``q_b_proj``
            viewed as heads): the first ``N = nope_dim`` values are ``q_nope``, the last ``R``
            (even) the un-rotated rope part. fp32 / bf16 / fp16, contiguous; at most 16 query rows
            ``B * S``.
        cos, sin: ``[B, S, R]`` or ``[1, S, R]`` HF rotary embeddings at the new tokens' positions,
            q's dtype, contiguous.
        kv_b_weight: ``[H * (N + V), C]`` ``kv_b_proj.weight`` (per head ``N`` rows of ``W_UK``, then
            ``V`` rows of ``W_UV``), q's dtype, contiguous.
        kv_cache, cache_seqlens, block_table, causal, window, pe_cache, max_seqlen: as
            :func:`mla_decode` (the cache in q's dtype).
        softmax_scale: score multiplier (see ``latentmoe.reference.mla.softmax_scale``).
        nope_dim: ``N`` (``qk_nope_head_dim``).
        rope_interleave: HF ``config.rope_interleave``.
    Returns:
        ``[B, S, H, V]`` in q's dtype: per head ``o_latent @ W_UV^T``, where ``o_latent`` is
        :func:`mla_decode` of ``q_latent = q_nope @ W_UK`` and ``q_pe = RoPE(q[..., N:])``.

    Numerics: the rotated ``q_pe`` is computed in fp32 and rounded once to the dtype; each product
    sums in fp32 and is rounded to the dtype (as :func:`latentmoe.ops.bmm_small` rounds it; cuBLAS on
    CUDA); the attention is :func:`mla_decode`'s. On the CPU bitwise the same from run to run at a
    given thread count (the keys are split by the thread count, as in :func:`mla_decode`). CUDA: one
    RoPE kernel, two cuBLAS products writing the head-interleaved layouts directly, and
    :func:`mla_decode`'s kernels (CUDA-graph capturable with ``max_seqlen`` given). No backward.
    """
    return _lib.mla_decode_absorbed.default(
        q, cos, sin, kv_b_weight, kv_cache, cache_seqlens, block_table, float(softmax_scale), int(nope_dim),
        rope_interleave, causal, window, pe_cache,
        max_seqlen if isinstance(max_seqlen, torch.SymInt) else int(max_seqlen),
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
    check_values: bool = True,
) -> None:
    """Fused ``kv_a_layernorm`` + RoPE of ``k_pe`` + write of new tokens into the cache (in place).

    Args:
        kv_cache: contiguous or paged cache (see module doc); **mutated** at the target slots only
            (its version counter bumped; an inference tensor only under ``torch.inference_mode()``).
        kv_latent: ``[B, S, C]`` un-normalised latents (first C outputs of ``kv_a_proj_with_mqa``).
        k_pe: ``[B, S, R]`` un-rotated rope keys (the last R outputs). ``kv_latent`` and ``k_pe``
            need unit-stride rows only (any other strides: e.g. the two slices of the projection's
            ``[B, S, C + R]`` output, read in place); the other tensors are contiguous.
        norm_weight: ``[C]`` ``kv_a_layernorm.weight``; ``eps`` its epsilon (HF RMSNorm numerics).
        cos, sin: ``[B, S, R]`` HF rotary embeddings at the new tokens' positions.
        cache_seqlens: ``[B]`` int32 tokens already cached; token ``s`` goes to slot
            ``cache_seqlens[b] + s``. Not updated here.
        block_table: ``[B, max_pages]`` int32 for a paged cache.
        rope_interleave: HF ``config.rope_interleave``.
        check_values: ``False`` skips the host check of ``cache_seqlens + S <= capacity`` and of
            the table entries (and its sync on CUDA); see the module doc for what the kernels do
            with bad values then.
    """
    _lib.mla_append_cache.default(
        kv_cache, kv_latent, k_pe, norm_weight, float(eps), cos, sin, cache_seqlens, block_table,
        rope_interleave, check_values,
    )


@torch.library.register_fake("latentmoe::mla_decode")
def _mla_decode_fake(
    q_latent, q_pe, kv_cache, cache_seqlens, block_table, softmax_scale, causal=True, window=-1,
    pe_cache=None, max_seqlen=-1,
):
    check_mla_decode(
        q_latent, q_pe, kv_cache, cache_seqlens, block_table, softmax_scale, window, pe_cache, max_seqlen
    )
    B, Sq, H, _ = q_latent.shape
    out = torch.empty_like(q_latent, memory_format=torch.contiguous_format)
    return out, q_latent.new_empty((B, Sq, H), dtype=torch.float32)


@torch.library.register_fake("latentmoe::mla_decode_absorbed")
def _mla_decode_absorbed_fake(
    q, cos, sin, kv_b_weight, kv_cache, cache_seqlens, block_table, softmax_scale, nope_dim, rope_interleave=True,
    causal=True, window=-1, pe_cache=None, max_seqlen=-1,
):
    B, S, H, V = check_mla_decode_absorbed(
        q, cos, sin, kv_b_weight, kv_cache, cache_seqlens, block_table, softmax_scale, nope_dim, window, pe_cache,
        max_seqlen, MAX_ROWS,
    )
    return q.new_empty((B, S, H, V))


@torch.library.register_fake("latentmoe::mla_append_cache")
def _mla_append_cache_fake(
    kv_cache, kv_latent, k_pe, norm_weight, eps, cos, sin, cache_seqlens, block_table, rope_interleave,
    check_values=True,
):
    check_mla_append_cache(kv_cache, kv_latent, k_pe, norm_weight, eps, cos, sin, cache_seqlens, block_table)
    return None
