"""MLA prefill op ``mla_prefill``: latent attention with in-kernel decompression (causal and
sliding-window masks as ``mla_decode``), fake kernels, autograd.

CPU and CUDA kernels for the forward and for the backward (``mla_prefill_backward``), on a
contiguous or paged latent cache. Weights come as ``w_uk`` / ``w_uv`` views of ``kv_b_proj.weight``.
On CUDA the default paths are in the absorbed form, in chunks of bounded size: bf16 / fp16 forwards
through ``mla_decode``'s tensor-core kernel on absorbed queries (``q_nope @ w_uk``), other forwards
and every backward on batched cuBLAS GEMMs against the latent rows
(LATENTMOE_MLA_PREFILL_FORWARD=auto|kernel|absorbed|gemm, LATENTMOE_MLA_PREFILL_BACKWARD=
auto|kernel|absorbed; see the README). The per-head decompressing kernels run on the CPU.
"""

from __future__ import annotations

import torch

from latentmoe.ops._checks import check_mla_prefill, check_mla_prefill_backward

_lib = torch.ops.latentmoe


def mla_prefill(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    window: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA attention of ``S`` new tokens over the latent cache (prefix + themselves), causal by default.

    The CPU kernel decompresses each tile of latent cache to per-head ``K_nope = c_kv w_uk_h^T`` and
    ``V = c_kv w_uv_h^T`` inside the kernel and consumes it by an online softmax; on CUDA the
    default paths attend in the absorbed form (queries ``[q_nope w_uk_h | q_pe]`` against the
    latent rows, then ``w_uv_h``; module docstring). All heads' K/V are never materialised; extra
    memory is O(tokens) plus chunk-sized temporaries.

    Args:
        q_nope: ``[B, S, H, Dn]`` float32 / bfloat16 / float16.
        q_pe: ``[B, S, H, R]``, RoPE already applied.
        latent_cache: ``[B, Lmax, C + R]``, each token ``[c_kv (normalised) | k_pe (rotated)]``;
            the ``S`` new tokens must already be written as each row's last ``S`` valid tokens.
            Slots beyond ``cache_seqlens`` are never read.
        cache_seqlens: ``[B]`` int32, valid tokens per row, in ``[0, Lmax]``; rows may differ.
        w_uk: ``[H, Dn, C]``; w_uv: ``[H, Dv, C]`` (views of ``kv_b_proj.weight`` are fine, see
            :func:`latentmoe.reference.mla.split_kv_b`).
        softmax_scale: multiplies ``q_nope . k_nope + q_pe . k_pe``.
        block_table: optional ``[B, max_pages]`` int32 for a paged cache: ``latent_cache`` is then
            ``[num_pages, page_size, C + R]`` and token ``t`` of row ``b`` lives in page
            ``block_table[b, t // page_size]``, slot ``t % page_size`` (as
            :func:`latentmoe.reference.mla.gather_paged`); capacity ``max_pages * page_size``.
        causal, window: query ``i`` of row ``b`` sits at position ``p = cache_seqlens[b] - S + i``
            and sees keys ``j < cache_seqlens[b]`` with ``j <= p`` if ``causal`` and
            ``j >= p - window`` if ``window >= 0`` (as :func:`latentmoe.ops.mla_decode`).
    All floating tensors share one dtype and device; their last dims must be contiguous.
    Queries that see no key (causal: rows shorter than ``S``; empty rows) give output 0 and LSE
    ``-inf``.

    Returns:
        ``(out [B, S, H, Dv] in the input dtype, lse [B, S, H] float32)``, LSE in natural log.
        Differentiable in ``q_nope``, ``q_pe``, ``latent_cache``, ``w_uk``, ``w_uv`` (and in
        ``lse``).
    """
    return _lib.mla_prefill.default(
        q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, softmax_scale, block_table, causal, window
    )


@torch.library.register_fake("latentmoe::mla_prefill")
def _mla_prefill_fake(
    q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, softmax_scale, block_table=None, causal=True,
    window=-1,
):
    B, S, H, Dv = check_mla_prefill(
        "mla_prefill", q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, softmax_scale, block_table,
        window,
    )
    return q_nope.new_empty(B, S, H, Dv), q_nope.new_empty(B, S, H, dtype=torch.float32)


@torch.library.register_fake("latentmoe::mla_prefill_backward")
def _mla_prefill_backward_fake(
    grad_out, grad_lse, q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, out, lse, softmax_scale,
    block_table=None, causal=True, window=-1,
):
    B, S, H, Dv = check_mla_prefill(
        "mla_prefill_backward", q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, softmax_scale,
        block_table, window,
    )
    check_mla_prefill_backward(B, S, H, Dv, q_nope, grad_out, grad_lse, out, lse)
    return (
        torch.empty_like(q_nope, memory_format=torch.contiguous_format),
        torch.empty_like(q_pe, memory_format=torch.contiguous_format),
        torch.empty_like(latent_cache, memory_format=torch.contiguous_format),
        torch.empty_like(w_uk, memory_format=torch.contiguous_format),
        torch.empty_like(w_uv, memory_format=torch.contiguous_format),
    )


# mla_prefill's autograd (its backward: mla_prefill_backward) is C++: csrc/autograd_functions.cpp.
