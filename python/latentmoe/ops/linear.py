"""``linear_small``: a projection of a few rows (a decode step), bound by reading the weight once."""

from __future__ import annotations

import torch

from latentmoe.ops._checks import check_linear_small, forbid_backward

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
        well below the memory's read rate; CUDA calls cuBLAS. An inference op with no backward: a
        gradient reaching it raises ``RuntimeError`` (use ``F.linear`` where gradients are needed).
    Raises ``ValueError`` naming the argument on bad shapes, dtypes or more than 16 rows.
    """
    return _lib.linear_small.default(input, weight, bias)


@torch.library.register_fake("latentmoe::linear_small")
def _linear_small_fake(input, weight, bias=None):
    check_linear_small(input, weight, bias, MAX_ROWS)
    return input.new_empty((input.shape[0], weight.shape[0]))


forbid_backward("linear_small", "has no backward (an inference op): use torch.nn.functional.linear where gradients "
                "are needed, or call it under torch.no_grad()")
