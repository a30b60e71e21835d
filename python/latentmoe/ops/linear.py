"""``linear_small``: a projection of a few rows (a decode step), bound by reading the weight once;
``bmm_small``: the batched product of a few rows per entry with strided weight views (MLA's absorbed
per-head products), CPU only."""

from __future__ import annotations

import torch

from latentmoe.ops._checks import check_bmm_small, check_linear_f32, check_linear_small, cpu_only

_lib = torch.ops.latentmoe

MAX_ROWS = 16  # csrc/common/linear_checks.h


def linear_small(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``input @ weight.T + bias`` for at most 16 rows.

    Args:
        input: ``[M, K]`` with ``M <= 16``, fp32/bf16/fp16, contiguous.
        weight: ``[N, K]`` (``nn.Linear.weight``), same dtype, contiguous.
        bias: optional ``[N]``, same dtype, contiguous.
    Returns:
        ``[M, N]`` in the input dtype (fp32 accumulation). The CPU kernel streams each weight row
        once (threads split ``N``; bitwise deterministic), where a BLAS GEMM with one row runs
        well below the memory's read rate; bf16 on AVX512_BF16 CPUs runs ``vdpbf16ps`` tiles
        (products exact, as the widening path's). CUDA calls cuBLAS. An inference op with no backward: a
        gradient reaching it raises ``RuntimeError`` (use ``F.linear`` where gradients are needed).
    Raises ``ValueError`` naming the argument on bad shapes, dtypes or more than 16 rows.
    """
    return _lib.linear_small.default(input, weight, bias)


@torch.library.register_fake("latentmoe::linear_small")
def _linear_small_fake(input, weight, bias=None):
    check_linear_small(input, weight, bias, MAX_ROWS)
    return input.new_empty((input.shape[0], weight.shape[0]))


def linear_f32(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``input @ weight.T + bias`` in fp32 for any number of rows, on latentmoe's own CPU GEMM tiles.

    Args:
        input: ``[M, K]`` fp32, contiguous.
        weight: ``[N, K]`` (``nn.Linear.weight``) fp32, contiguous.
        bias: optional ``[N]`` fp32, contiguous.
    Returns:
        ``[M, N]`` fp32. The weight is packed into 64-column panels per call (one pass over it),
        then 6 x 64 register tiles of 16-lane FMAs (8-lane ones without AVX-512) run over row blocks
        and panel ranges across the threads; each output is summed in ``k`` order, the bias first:
        bitwise the same at any thread count. Made for CPUs where ATen's fp32 GEMM runs below the
        FMA rate (PyTorch's MKL sgemm runs AVX2 code on AMD CPUs: 208 GFLOP/s on 2 Zen 5 cores,
        about half of their 16-lane peak); the modules take it for large projections where
        ``latentmoe._C.cpu_f32_gemm()`` says so (``LATENTMOE_CPU_F32_GEMM=auto|latentmoe|aten``).
        An inference op with no backward: a gradient reaching it raises ``RuntimeError`` (use
        ``F.linear`` where gradients are needed). CPU only (``latentmoe.info.CPU_ONLY_OPS``).
    Raises ``ValueError`` naming the argument on bad shapes, dtypes or strides.
    """
    cpu_only("linear_f32", "it is a CPU GEMM (on CUDA use torch.nn.functional.linear: cuBLAS)",
             input=input, weight=weight, bias=bias)
    return _lib.linear_f32.default(input, weight, bias)


@torch.library.register_fake("latentmoe::linear_f32")
def _linear_f32_fake(input, weight, bias=None):
    check_linear_f32(input, weight, bias)
    return input.new_empty((input.shape[0], weight.shape[0]))




def bmm_small(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(input, weight)`` for at most 16 rows per batch entry, on the CPU.

    Args:
        input: ``[G, M, K]`` with ``M <= 16``, fp32/bf16/fp16, contiguous.
        weight: ``[G, K, N]``, same dtype, read in place: rows of ``N`` adjacent (``stride(2) == 1``,
            any row and batch strides, e.g. ``kv_b_proj.weight.view(H, N + V, C)[:, :N]``) or a
            transposed view with rows of ``K`` adjacent (``stride(1) == 1``, e.g.
            ``....view(H, N + V, C)[:, N:].transpose(1, 2)``).
    Returns:
        ``[G, M, N]`` in the input dtype, fp32 accumulation, bitwise deterministic whatever the
        thread count. Each weight row is streamed once in a sequential order (ATen's CPU bmm with
        one row read these views at about half the memory's rate), and bf16 / fp16 weights are
        widened in registers (no fp32 copy of the weight; a bf16 transposed view on AVX512_BF16
        CPUs runs ``linear_small``'s ``vdpbf16ps`` tiles). An inference op with no backward: a
        gradient reaching it raises ``RuntimeError`` (use ``torch.bmm`` where gradients are
        needed). CPU only (``latentmoe.info.CPU_ONLY_OPS``): CUDA tensors raise ``RuntimeError``.
    Raises ``ValueError`` naming the argument on bad shapes, dtypes, strides or more than 16 rows.
    """
    cpu_only("bmm_small", "it is a CPU decode path (on CUDA use torch.bmm: cuBLAS)", input=input, weight=weight)
    return _lib.bmm_small.default(input, weight)


@torch.library.register_fake("latentmoe::bmm_small")
def _bmm_small_fake(input, weight):
    check_bmm_small(input, weight, MAX_ROWS)
    return input.new_empty((input.shape[0], input.shape[1], weight.shape[2]))
