"""Argument checks of the fake (meta) kernels, and other helpers shared by the ops' Python side.

The fake kernels (``torch.library.register_fake``; they run for meta tensors and under
``torch.compile``'s FakeTensor tracing) repeat the real kernels' C++ checks of **metadata**, in the
C++ order, with the same exception types and messages (``latentmoe.<op>: argument '<name>' ...``):
ranks, sizes and shapes, dtypes, non-empty inputs, devices (``RuntimeError``; everything else is
``ValueError``) and the scalar arguments (``moe_route``'s ``top_k`` / ``n_group`` / ``topk_group`` /
``score_func`` and finite ``routed_scaling_factor``, ``window >= -1``, finite ``softmax_scale``,
``max_seqlen`` in ``[-1, capacity]``, the norms' and ``mla_append_cache``'s ``eps``,
``linear_small``'s and ``bmm_small``'s row limits). So a call the real kernel rejects for
its metadata fails the same way at trace time, before any kernel runs.

They do NOT repeat:

* checks of tensor **values**, which need the data: ``cache_seqlens`` entries, ``block_table``
  entries, ``moe_experts`` / ``moe_route_backward`` indices in ``[0, E)``, ``mla_decode``'s
  ``max_seqlen`` against the longest row. The real kernel checks them when it runs (a call with
  both a bad value and a later metadata error, e.g. ``mla_prefill``'s ``window``, raises the
  metadata error under tracing and the value error eagerly);
* **contiguity** and other stride checks (``bmm_small``'s weight layout): fake tensors' strides
  under ``torch.compile`` may legitimately differ from the eager ones; the real kernel checks them.

The C++ helpers they mirror are in csrc/common/checks.h; the op checks in csrc/common/*_checks.h
and csrc/cpu/moe.cpp (``moe_host::check_*``). Sizes may be SymInts under dynamic shapes: they are
only compared (a guard), and messages are formatted only when a check fails.
"""

from __future__ import annotations

import contextlib

import math
from collections.abc import Callable

import torch

# c10::toString(ScalarType), as the C++ messages print dtypes.
_DTYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int32: "Int", torch.int64: "Long", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool",
}
_FLOATING = (torch.float32, torch.bfloat16, torch.float16)


def _dt(d: torch.dtype) -> str:
    return _DTYPE_NAMES.get(d, str(d).removeprefix("torch."))


def _shape(t_or_sizes) -> str:
    sizes = t_or_sizes.shape if isinstance(t_or_sizes, torch.Tensor) else t_or_sizes
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def _num(x: float) -> str:
    """A double as C++'s ``operator<<`` prints it (6 significant digits, ``-1`` not ``-1.0``)."""
    return f"{x:g}"


# ---- mirrors of csrc/common/checks.h -------------------------------------------------------------


def require(ok, op: str, name: str, rest: Callable[[], str]) -> None:
    """``TORCH_CHECK_VALUE(ok, "latentmoe.<op>: argument '<name>' " + rest())``; ``rest`` is only
    called when the check fails (no formatting of symbolic sizes on the good path)."""
    if not ok:
        raise ValueError(f"latentmoe.{op}: argument '{name}' {rest()}")


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or a null context on devices without
    autocast (``meta``: ``torch.autocast("meta")`` raises "unsupported scalarType")."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def defined(op: str, name: str, t) -> None:
    """A required tensor given as None: named (checks.h's ``defined``)."""
    if t is None:
        raise ValueError(f"latentmoe.{op}: argument '{name}' is None; a tensor is required")


def floating(op: str, name: str, t: torch.Tensor) -> None:
    defined(op, name, t)
    require(t.dtype in _FLOATING, op, name,
            lambda: f"must be float32, bfloat16 or float16, got {_dt(t.dtype)}")


def dtype(op: str, name: str, t: torch.Tensor, want: torch.dtype) -> None:
    defined(op, name, t)
    require(t.dtype == want, op, name, lambda: f"must have dtype {_dt(want)}, got {_dt(t.dtype)}")


def same_dtype(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    defined(op, name, t)
    defined(op, ref_name, ref)
    require(t.dtype == ref.dtype, op, name,
            lambda: f"has dtype {_dt(t.dtype)} but '{ref_name}' has dtype {_dt(ref.dtype)}; they must match")


def same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    defined(op, name, t)
    defined(op, ref_name, ref)
    if t.device != ref.device:
        raise RuntimeError(
            f"latentmoe.{op}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; "
            "all tensors must be on one device"
        )


def dim(op: str, name: str, t: torch.Tensor, want: int) -> None:
    defined(op, name, t)
    require(t.dim() == want, op, name, lambda: f"must be {want}-D, got shape {_shape(t)}")


def size(op: str, name: str, t: torch.Tensor, d: int, want, what: str) -> None:
    defined(op, name, t)
    require(t.shape[d] == want, op, name, lambda: f"dim {d} must be {want} ({what}), got shape {_shape(t)}")


def nonempty(op: str, name: str, t: torch.Tensor) -> None:
    defined(op, name, t)
    require(t.numel() != 0, op, name, lambda: f"is empty (shape {_shape(t)})")


def same_shape(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, dims: int | None = None,
               why: str = "") -> None:
    """The ops' ``"argument 'x' has shape [..] but 'y' has shape [..]<why>"`` check, of the first
    ``dims`` dims (all by default)."""
    defined(op, name, t)
    defined(op, ref_name, ref)
    require(t.shape[:dims] == ref.shape[:dims], op, name,
            lambda: f"has shape {_shape(t)} but '{ref_name}' has shape {_shape(ref)}{why}")


def score_func(op: str, value: str) -> None:
    require(value in ("sigmoid", "softmax"), op, "score_func",
            lambda: f"must be 'sigmoid' or 'softmax', got '{value}'")


# ---- op checks (the C++ functions named in each docstring, minus values and contiguity) --------


def check_norm(op: str, input, weight) -> None:
    """norm::check_args (csrc/common/norm_checks.h)."""
    floating(op, "input", input)
    same_dtype(op, "weight", weight, "input", input)
    same_device(op, "weight", weight, "input", input)
    require(input.dim() >= 1, op, "input", lambda: "must have at least 1 dim")
    dim(op, "weight", weight, 1)
    require(weight.shape[0] == input.shape[-1], op, "weight",
            lambda: f"has {weight.shape[0]} elements but 'input' has last dim {input.shape[-1]}")
    nonempty(op, "input", input)


def check_norm_eps(op: str, eps: float) -> None:
    """norm::check_eps."""
    require(math.isfinite(eps) and eps >= 0, op, "eps", lambda: f"must be finite and >= 0, got {_num(eps)}")


def check_add_rms_norm(input, residual, weight) -> None:
    """norm::check_args + norm::check_residual."""
    op = "add_rms_norm"
    check_norm(op, input, weight)
    same_dtype(op, "residual", residual, "input", input)
    same_device(op, "residual", residual, "input", input)
    same_shape(op, "residual", residual, "input", input)


def check_rms_norm_backward(grad_out, input, weight, rstd) -> None:
    """norm::check_backward_args."""
    op = "rms_norm_backward"
    check_norm(op, input, weight)
    same_dtype(op, "grad_out", grad_out, "input", input)
    same_device(op, "grad_out", grad_out, "input", input)
    same_device(op, "rstd", rstd, "input", input)
    same_shape(op, "grad_out", grad_out, "input", input)
    dtype(op, "rstd", rstd, torch.float32)
    require(tuple(rstd.shape) == tuple(input.shape[:-1]), op, "rstd",
            lambda: f"must have one value per row of 'input' (shape {_shape(input.shape[:-1])}), got shape "
                    f"{_shape(rstd)}")


def _check_small_operands(op, input, weight, rank: int, max_rows: int, rows: str, instead: str) -> None:
    """linear::check_operands (csrc/common/linear_checks.h)."""
    floating(op, "input", input)
    same_dtype(op, "weight", weight, "input", input)
    same_device(op, "weight", weight, "input", input)
    dim(op, "input", input, rank)
    dim(op, "weight", weight, rank)
    require(input.shape[rank - 2] <= max_rows, op, "input", lambda: (
        f"has {input.shape[rank - 2]} {rows}; the op takes at most {max_rows} (use {instead} for more)"))


def check_linear_small(input, weight, bias, max_rows: int) -> None:
    """linear::check_args (csrc/common/linear_checks.h)."""
    op = "linear_small"
    _check_small_operands(op, input, weight, 2, max_rows, "rows", "torch.nn.functional.linear")
    _check_weight_bias(op, input, weight, bias)


def _check_weight_bias(op, input, weight, bias) -> None:
    """linear::check_weight_bias (csrc/common/linear_checks.h) less its contiguity checks, which
    the fake kernels leave to the real ones (as for the other ops)."""
    size(op, "weight", weight, 1, input.shape[1], "in_features = input.size(1)")
    if bias is not None:
        same_dtype(op, "bias", bias, "input", input)
        same_device(op, "bias", bias, "input", input)
        dim(op, "bias", bias, 1)
        size(op, "bias", bias, 0, weight.shape[0], "out_features = weight.size(0)")


def check_linear_f32(input, weight, bias) -> None:
    """csrc/cpu/linear_f32.cpp's checks."""
    op = "linear_f32"
    dtype(op, "input", input, torch.float32)
    same_dtype(op, "weight", weight, "input", input)
    same_device(op, "weight", weight, "input", input)
    dim(op, "input", input, 2)
    dim(op, "weight", weight, 2)
    _check_weight_bias(op, input, weight, bias)


def check_bmm_small(input, weight, max_rows: int) -> None:
    """linear::check_bmm_args (csrc/common/linear_checks.h)."""
    op = "bmm_small"
    _check_small_operands(op, input, weight, 3, max_rows, "rows per batch entry", "torch.bmm")
    size(op, "weight", weight, 0, input.shape[0], "the batch size input.size(0)")
    size(op, "weight", weight, 1, input.shape[2], "K = input.size(2)")


def cpu_only(op: str, why: str, **tensors) -> None:
    """RuntimeError naming the first tensor argument that is on another device than the CPU (or
    meta): ``op`` has CPU kernels only (latentmoe.info.CPU_ONLY_OPS); ``why`` says what to use there."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta"):
            raise RuntimeError(f"latentmoe.{op}: argument '{name}' is on {t.device}; {why}")


def check_cache(op, kv_cache, cache_seqlens, block_table, B, C, R, ref, ref_name, pe_cache=None):
    """mla::check_cache (csrc/common/mla_checks.h); returns the capacity (tokens per batch row)."""
    same_dtype(op, "kv_cache", kv_cache, ref_name, ref)
    same_device(op, "kv_cache", kv_cache, ref_name, ref)
    dim(op, "kv_cache", kv_cache, 3)
    if pe_cache is not None:
        size(op, "kv_cache", kv_cache, 2, C, "kv_lora_rank (k_pe rows are in pe_cache)")
        same_dtype(op, "pe_cache", pe_cache, ref_name, ref)
        same_device(op, "pe_cache", pe_cache, ref_name, ref)
        dim(op, "pe_cache", pe_cache, 3)
        size(op, "pe_cache", pe_cache, 0, kv_cache.shape[0], "same leading dims as kv_cache")
        size(op, "pe_cache", pe_cache, 1, kv_cache.shape[1], "same leading dims as kv_cache")
        size(op, "pe_cache", pe_cache, 2, R, "rope dim")
    else:
        size(op, "kv_cache", kv_cache, 2, C + R, f"kv_lora_rank C={C} + rope dim R={R}, as the other arguments give them")
    dtype(op, "cache_seqlens", cache_seqlens, torch.int32)
    same_device(op, "cache_seqlens", cache_seqlens, ref_name, ref)
    dim(op, "cache_seqlens", cache_seqlens, 1)
    size(op, "cache_seqlens", cache_seqlens, 0, B, "batch")
    if block_table is None:
        size(op, "kv_cache", kv_cache, 0, B, "batch (contiguous cache [B, Lmax, C+R])")
        return kv_cache.shape[1]
    dtype(op, "block_table", block_table, torch.int32)
    same_device(op, "block_table", block_table, ref_name, ref)
    dim(op, "block_table", block_table, 2)
    size(op, "block_table", block_table, 0, B, "batch")
    require(kv_cache.shape[1] >= 1, op, "kv_cache", lambda: "has page_size 0")
    require(kv_cache.shape[0] >= 1, op, "kv_cache", lambda: "(paged) has no pages")
    return block_table.shape[1] * kv_cache.shape[1]


def check_mla_decode(q_latent, q_pe, kv_cache, cache_seqlens, block_table, softmax_scale, window, pe_cache,
                     max_seqlen) -> None:
    """mla::check_decode_queries, check_cache, check_decode_scalars, check_max_seqlen."""
    op = "mla_decode"
    floating(op, "q_latent", q_latent)
    dim(op, "q_latent", q_latent, 4)
    same_dtype(op, "q_pe", q_pe, "q_latent", q_latent)
    same_device(op, "q_pe", q_pe, "q_latent", q_latent)
    dim(op, "q_pe", q_pe, 4)
    same_shape(op, "q_pe", q_pe, "q_latent", q_latent, 3, "; dims B, Sq, H must match")
    nonempty(op, "q_latent", q_latent)
    capacity = check_cache(op, kv_cache, cache_seqlens, block_table, q_latent.shape[0], q_latent.shape[3],
                           q_pe.shape[3], q_latent, "q_latent", pe_cache)
    require(window >= -1, op, "window", lambda: f"must be >= -1 (-1 = no window), got {window}")
    require(math.isfinite(softmax_scale), op, "softmax_scale", lambda: "must be finite")
    require(max_seqlen >= -1 and max_seqlen <= capacity, op, "max_seqlen", lambda: (
        f"must be -1 (check lengths on the host) or in [0, capacity = {capacity}], got {max_seqlen}"))


def check_mla_decode_absorbed(q, cos, sin, kv_b_weight, kv_cache, cache_seqlens, block_table, softmax_scale,
                              nope_dim, window, pe_cache, max_seqlen, max_rows: int) -> tuple:
    """mla::check_absorbed_args, then check_cache, check_decode_scalars, check_max_seqlen (as the
    kernel, without its contiguity checks); returns (B, S, H, V)."""
    op = "mla_decode_absorbed"
    floating(op, "q", q)
    dim(op, "q", q, 4)
    nonempty(op, "q", q)
    B, S, H, D = q.shape
    require(B * S <= max_rows, op, "q", lambda: (
        f"has {B * S} query rows (batch * tokens); the op takes at most {max_rows} (a decode step; use "
        "mla_decode with torch.bmm for more)"))
    require(0 <= nope_dim <= D, op, "nope_dim", lambda: f"({nope_dim}) must be in [0, q.size(3) = {D}]")
    R = D - nope_dim
    require(R % 2 == 0, op, "q", lambda: (
        f"gives the rope dim q.size(3) - nope_dim = {R}, which must be even (shape {_shape(q)}, nope_dim "
        f"{nope_dim})"))
    for name, t in (("cos", cos), ("sin", sin)):
        same_dtype(op, name, t, "q", q)
        same_device(op, name, t, "q", q)
        dim(op, name, t, 3)
        require(t.shape[0] in (B, 1) and t.shape[1] == S and t.shape[2] == R, op, name, lambda t=t: (
            f"has shape {_shape(t)} but must be [B or 1, S, R] = [{B} or 1, {S}, {R}] for 'q' of shape "
            f"{_shape(q)} and nope_dim {nope_dim}"))
    same_dtype(op, "kv_b_weight", kv_b_weight, "q", q)
    same_device(op, "kv_b_weight", kv_b_weight, "q", q)
    dim(op, "kv_b_weight", kv_b_weight, 2)
    rows, C = kv_b_weight.shape
    require(rows % H == 0 and rows // H >= nope_dim and C >= 1, op, "kv_b_weight", lambda: (
        f"has shape {_shape(kv_b_weight)} but must be [H * (nope_dim + V), C] with H = {H} heads (q.size(2)), "
        f"nope_dim = {nope_dim}, some V >= 0 and C >= 1"))
    capacity = check_cache(op, kv_cache, cache_seqlens, block_table, B, C, R, q, "q", pe_cache)
    require(window >= -1, op, "window", lambda: f"must be >= -1 (-1 = no window), got {window}")
    require(math.isfinite(softmax_scale), op, "softmax_scale", lambda: "must be finite")
    require(max_seqlen >= -1 and max_seqlen <= capacity, op, "max_seqlen", lambda: (
        f"must be -1 (check lengths on the host) or in [0, capacity = {capacity}], got {max_seqlen}"))
    return B, S, H, rows // H - nope_dim


def check_mla_append_cache(kv_cache, kv_latent, k_pe, norm_weight, eps, cos, sin, cache_seqlens, block_table):
    """mla::check_append_args (its eps check last), then mla::check_cache."""
    op = "mla_append_cache"
    floating(op, "kv_latent", kv_latent)
    dim(op, "kv_latent", kv_latent, 3)
    for name, t in (("k_pe", k_pe), ("cos", cos), ("sin", sin)):
        same_dtype(op, name, t, "kv_latent", kv_latent)
        same_device(op, name, t, "kv_latent", kv_latent)
        dim(op, name, t, 3)
        same_shape(op, name, t, "kv_latent", kv_latent, 2, "; dims B, S must match")
    R = k_pe.shape[2]
    require(R % 2 == 0, op, "k_pe", lambda: f"rope dim must be even, got {R}")
    size(op, "cos", cos, 2, R, "rope dim of k_pe")
    size(op, "sin", sin, 2, R, "rope dim of k_pe")
    same_dtype(op, "norm_weight", norm_weight, "kv_latent", kv_latent)
    same_device(op, "norm_weight", norm_weight, "kv_latent", kv_latent)
    dim(op, "norm_weight", norm_weight, 1)
    size(op, "norm_weight", norm_weight, 0, kv_latent.shape[2], "kv_lora_rank")
    nonempty(op, "kv_latent", kv_latent)
    require(math.isfinite(eps) and eps >= 0, op, "eps", lambda: f"must be finite and >= 0, got {_num(eps)}")
    check_cache(op, kv_cache, cache_seqlens, block_table, kv_latent.shape[0], kv_latent.shape[2], R,
                kv_latent, "kv_latent")


def check_mla_prefill(op, q_nope, q_pe, latent_cache, cache_seqlens, w_uk, w_uv, softmax_scale, block_table,
                      window):
    """mla_prefill::check_args (csrc/common/mla_prefill_checks.h); returns (B, S, H, Dv)."""
    floating(op, "q_nope", q_nope)
    for name, t, n in (("q_nope", q_nope, 4), ("q_pe", q_pe, 4), ("latent_cache", latent_cache, 3),
                       ("cache_seqlens", cache_seqlens, 1), ("w_uk", w_uk, 3), ("w_uv", w_uv, 3)):
        dim(op, name, t, n)
    for name, t in (("q_pe", q_pe), ("latent_cache", latent_cache), ("w_uk", w_uk), ("w_uv", w_uv)):
        same_dtype(op, name, t, "q_nope", q_nope)
    dtype(op, "cache_seqlens", cache_seqlens, torch.int32)
    for name, t in (("q_pe", q_pe), ("latent_cache", latent_cache), ("cache_seqlens", cache_seqlens),
                    ("w_uk", w_uk), ("w_uv", w_uv)):
        same_device(op, name, t, "q_nope", q_nope)
    B, S, H, Dn = q_nope.shape
    R, C, Dv = q_pe.shape[3], w_uk.shape[2], w_uv.shape[1]
    if block_table is not None:
        dim(op, "block_table", block_table, 2)
        dtype(op, "block_table", block_table, torch.int32)
        same_device(op, "block_table", block_table, "q_nope", q_nope)
        size(op, "block_table", block_table, 0, B, "batch size B of q_nope")
        require(latent_cache.shape[1] >= 1, op, "latent_cache",
                lambda: f"(paged) needs page_size >= 1, got shape {_shape(latent_cache)}")
    require(H >= 1 and Dn >= 1, op, "q_nope",
            lambda: f"needs at least one head and one dim, got shape {_shape(q_nope)}")
    same_shape(op, "q_pe", q_pe, "q_nope", q_nope, 3, "; the first three dims [B, S, H] must match")
    if block_table is None:
        size(op, "latent_cache", latent_cache, 0, B, "batch size B of q_nope")
    require(C >= 1, op, "w_uk", lambda: f"needs C >= 1, got shape {_shape(w_uk)}")
    size(op, "latent_cache", latent_cache, 2, C + R, "C + R: kv_lora_rank of w_uk plus rope dim of q_pe")
    size(op, "w_uk", w_uk, 0, H, "heads H of q_nope")
    size(op, "w_uk", w_uk, 1, Dn, "qk_nope_head_dim of q_nope")
    size(op, "w_uv", w_uv, 0, H, "heads H of q_nope")
    size(op, "w_uv", w_uv, 2, C, "kv_lora_rank C of w_uk")
    require(Dv >= 1, op, "w_uv", lambda: f"needs v_head_dim >= 1, got shape {_shape(w_uv)}")
    size(op, "cache_seqlens", cache_seqlens, 0, B, "batch size B of q_nope")
    require(math.isfinite(softmax_scale), op, "softmax_scale",
            lambda: f"must be finite, got {_num(softmax_scale)}")
    require(window >= -1, op, "window", lambda: f"must be >= -1 (-1: no window), got {window}")
    return B, S, H, Dv


def check_mla_prefill_backward(B, S, H, Dv, q_nope, grad_out, grad_lse, out, lse) -> None:
    """mla_prefill::check_backward_args (after check_mla_prefill)."""
    op = "mla_prefill_backward"
    same_dtype(op, "grad_out", grad_out, "q_nope", q_nope)
    same_dtype(op, "out", out, "q_nope", q_nope)
    dtype(op, "grad_lse", grad_lse, torch.float32)
    dtype(op, "lse", lse, torch.float32)
    for name, t in (("grad_out", grad_out), ("grad_lse", grad_lse), ("out", out), ("lse", lse)):
        same_device(op, name, t, "q_nope", q_nope)
    for name, t, want, dims in (("grad_out", grad_out, (B, S, H, Dv), "[B, S, H, Dv]"),
                                ("out", out, (B, S, H, Dv), "[B, S, H, Dv]"),
                                ("grad_lse", grad_lse, (B, S, H), "[B, S, H]"),
                                ("lse", lse, (B, S, H), "[B, S, H]")):
        require(tuple(t.shape) == want, op, name,
                lambda: f"must have shape {dims} = {_shape(want)}, got {_shape(t)}")


def check_moe_route(logits, bias, top_k, n_group, topk_group, score_func_, scale) -> None:
    """moe_host::check_route_args (csrc/cpu/moe.cpp)."""
    op = "moe_route"
    dim(op, "logits", logits, 2)
    dtype(op, "logits", logits, torch.float32)
    E = logits.shape[1]
    require(E > 0, op, "logits", lambda: f"has no experts (shape {_shape(logits)})")
    if bias is not None:
        name = "e_score_correction_bias"
        dim(op, name, bias, 1)
        dtype(op, name, bias, torch.float32)
        size(op, name, bias, 0, E, "number of experts")
        same_device(op, name, bias, "logits", logits)
    score_func(op, score_func_)
    require(1 <= n_group <= 64 and E % n_group == 0, op, "n_group",
            lambda: f"({n_group}) must be in [1, 64] and divide the number of experts E={E}")
    require(1 <= topk_group <= n_group, op, "topk_group",
            lambda: f"({topk_group}) must be in [1, n_group={n_group}]")
    kept = topk_group * (E // n_group)
    require(1 <= top_k and top_k <= kept, op, "top_k",
            lambda: f"({top_k}) must be in [1, topk_group * E / n_group = {kept}] (E={E})")
    require(math.isfinite(scale), op, "routed_scaling_factor", lambda: f"must be finite, got {_num(scale)}")


def check_moe_route_backward(grad_weights, grad_scores, scores, indices, score_func_) -> None:
    """moe_host::check_route_backward_args."""
    op = "moe_route_backward"
    score_func(op, score_func_)
    dim(op, "scores", scores, 2)
    dtype(op, "scores", scores, torch.float32)
    dim(op, "indices", indices, 2)
    dtype(op, "indices", indices, torch.int64)
    size(op, "indices", indices, 0, scores.shape[0], "tokens")
    dim(op, "grad_weights", grad_weights, 2)
    dtype(op, "grad_weights", grad_weights, torch.float32)
    same_shape(op, "grad_weights", grad_weights, "indices", indices)
    same_device(op, "indices", indices, "scores", scores)
    same_device(op, "grad_weights", grad_weights, "scores", scores)
    if grad_scores is not None:
        dtype(op, "grad_scores", grad_scores, torch.float32)
        same_shape(op, "grad_scores", grad_scores, "scores", scores)
        same_device(op, "grad_scores", grad_scores, "scores", scores)


def check_moe_experts(op, hidden, gate_up_proj, down_proj, weights, indices) -> None:
    """moe_host::check_experts_args."""
    dim(op, "hidden", hidden, 2)
    floating(op, "hidden", hidden)
    dim(op, "gate_up_proj", gate_up_proj, 3)
    dim(op, "down_proj", down_proj, 3)
    same_dtype(op, "gate_up_proj", gate_up_proj, "hidden", hidden)
    same_dtype(op, "down_proj", down_proj, "hidden", hidden)
    H, E, I2 = hidden.shape[1], gate_up_proj.shape[0], gate_up_proj.shape[1]
    size(op, "gate_up_proj", gate_up_proj, 2, H, "hidden size")
    require(I2 % 2 == 0 and I2 > 0, op, "gate_up_proj",
            lambda: f"dim 1 must be 2 * intermediate size, got shape {_shape(gate_up_proj)}")
    require(E > 0, op, "gate_up_proj", lambda: "holds no experts (dim 0 is 0)")
    size(op, "down_proj", down_proj, 0, E, "number of experts")
    size(op, "down_proj", down_proj, 1, H, "hidden size")
    size(op, "down_proj", down_proj, 2, I2 // 2, "intermediate size")
    dim(op, "indices", indices, 2)
    dtype(op, "indices", indices, torch.int64)
    size(op, "indices", indices, 0, hidden.shape[0], "tokens")
    dim(op, "weights", weights, 2)
    same_shape(op, "weights", weights, "indices", indices)
    require(weights.dtype in (torch.float32, hidden.dtype), op, "weights",
            lambda: f"must be float32 or hidden's dtype ({_dt(hidden.dtype)}), got {_dt(weights.dtype)}")
    for name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj), ("weights", weights),
                    ("indices", indices)):
        same_device(op, name, t, "hidden", hidden)


def check_moe_experts_backward(grad_out, hidden, gate_up_proj, down_proj, weights, sorted_pairs,
                               expert_offsets, gate_up_out) -> None:
    """moe_host::check_experts_backward_args, then check_experts_backward_tensors."""
    op = "moe_experts_backward"
    # As C++: ranks first, then int64 indices of shape [T, k] on hidden's device stand in for the
    # forward's.
    dim(op, "hidden", hidden, 2)
    dim(op, "weights", weights, 2)
    stand_in = hidden.new_empty((hidden.shape[0], weights.shape[1]), dtype=torch.int64)
    check_moe_experts(op, hidden, gate_up_proj, down_proj, weights, stand_in)
    E, I2 = gate_up_proj.shape[0], gate_up_proj.shape[1]
    n_pairs = hidden.shape[0] * weights.shape[1]
    same_dtype(op, "grad_out", grad_out, "hidden", hidden)
    same_shape(op, "grad_out", grad_out, "hidden", hidden)
    same_device(op, "grad_out", grad_out, "hidden", hidden)
    dtype(op, "sorted_pairs", sorted_pairs, torch.int64)
    same_device(op, "sorted_pairs", sorted_pairs, "hidden", hidden)
    require(sorted_pairs.dim() == 1 and sorted_pairs.shape[0] == n_pairs, op, "sorted_pairs",
            lambda: "must be [T*k]")
    dtype(op, "expert_offsets", expert_offsets, torch.int64)
    same_device(op, "expert_offsets", expert_offsets, "hidden", hidden)
    require(expert_offsets.dim() == 1 and expert_offsets.shape[0] == E + 1, op, "expert_offsets",
            lambda: "must be [E+1]")
    same_dtype(op, "gate_up_out", gate_up_out, "hidden", hidden)
    same_device(op, "gate_up_out", gate_up_out, "hidden", hidden)
    require(gate_up_out.dim() == 2 and gate_up_out.shape[0] == n_pairs and gate_up_out.shape[1] == I2,
            op, "gate_up_out", lambda: "must be [T*k, 2I]")


def check_moe_pack_weight(weight, gate_up) -> None:
    """moe_pack_weight_cpu's checks (csrc/cpu/moe_packed.cpp)."""
    op = "moe_pack_weight"
    dim(op, "weight", weight, 3)
    require(weight.dtype in (torch.bfloat16, torch.float32), op, "weight",
            lambda: f"must be bfloat16 or float32, got {_dt(weight.dtype)}")
    require(weight.numel() != 0, op, "weight", lambda: f"is empty (shape {_shape(weight)})")
    require(not gate_up or weight.shape[1] % 2 == 0, op, "weight",
            lambda: "must be gate_up_proj [E, 2 * intermediate, hidden] (dim 1 even) when gate_up is true, "
                    f"got shape {_shape(weight)}")


def packed_shape(E, N, K, gate_up: bool, dtype: torch.dtype) -> tuple:
    """moe_pack_weight's output shape for a weight ``[E, N, K]`` of ``dtype``."""
    P = -(-(N // 2) // 32) if gate_up else -(-N // 64)
    return (E, P, -(-K // 2), 64, 2) if dtype == torch.bfloat16 else (E, P, K, 64)


def check_moe_pack_experts(gate_up_proj, down_proj) -> None:
    """moe_pack_experts' checks of the pair (each packed by moe_pack_weight, whose own checks name
    its one argument 'weight'): gate_up_proj [E, 2I, H] and down_proj [E, H, I] of one set of
    experts, in one dtype (bfloat16 or float32) on one device."""
    op = "moe_pack_experts"
    dim(op, "gate_up_proj", gate_up_proj, 3)
    dim(op, "down_proj", down_proj, 3)
    require(gate_up_proj.dtype in (torch.bfloat16, torch.float32), op, "gate_up_proj",
            lambda: f"must be bfloat16 or float32, got {_dt(gate_up_proj.dtype)}")
    same_dtype(op, "down_proj", down_proj, "gate_up_proj", gate_up_proj)
    same_device(op, "down_proj", down_proj, "gate_up_proj", gate_up_proj)
    E, two_i, H = gate_up_proj.shape
    require(E > 0 and two_i > 0 and H > 0 and two_i % 2 == 0, op, "gate_up_proj",
            lambda: f"must be [E, 2I, H] with E, I, H >= 1, got shape {_shape(gate_up_proj)}")
    want = (E, H, two_i // 2)
    require(tuple(down_proj.shape) == want, op, "down_proj",
            lambda: f"must be [E, H, I] = {_shape(want)} to match 'gate_up_proj' [E, 2I, H] = "
                    f"{_shape(gate_up_proj)}, got shape {_shape(down_proj)}")


def check_moe_experts_packed(hidden, gate_up_packed, down_packed, weights, indices, intermediate_size) -> None:
    """moe_experts_packed_cpu's checks (csrc/cpu/moe_packed.cpp)."""
    op = "moe_experts_packed"
    dim(op, "hidden", hidden, 2)
    dt = hidden.dtype
    require(dt in (torch.bfloat16, torch.float32), op, "hidden", lambda: f"must be bfloat16 or float32, got {_dt(dt)}")
    bf16 = dt == torch.bfloat16
    T, H, I = hidden.shape[0], hidden.shape[1], intermediate_size
    require(H > 0, op, "hidden", lambda: f"has no columns (shape {_shape(hidden)})")
    require(I > 0, op, "intermediate_size", lambda: f"must be >= 1, got {I}")
    same_dtype(op, "gate_up_packed", gate_up_packed, "hidden", hidden)  # (first: the layout depends on it)
    same_dtype(op, "down_packed", down_packed, "hidden", hidden)
    rank = 5 if bf16 else 4
    require(gate_up_packed.dim() == rank and gate_up_packed.shape[0] > 0, op, "gate_up_packed",
            lambda: f"must be {rank}-D with E >= 1 ("
                    + ("[E, ceil(I/32), ceil(H/2), 64, 2] for bfloat16" if bf16 else "[E, ceil(I/32), H, 64] for float32")
                    + f"), got shape {_shape(gate_up_packed)}")
    E = gate_up_packed.shape[0]
    gu_layout, d_layout = (("[E, ceil(I/32), ceil(H/2), 64, 2]", "[E, ceil(H/64), ceil(I/2), 64, 2]") if bf16
                           else ("[E, ceil(I/32), H, 64]", "[E, ceil(H/64), I, 64]"))
    for name, t, want, layout, source in (
        ("gate_up_packed", gate_up_packed, packed_shape(E, 2 * I, H, True, dt), gu_layout, "gate_up_proj [E, 2I, H]"),
        ("down_packed", down_packed, packed_shape(E, H, I, False, dt), d_layout, "down_proj [E, H, I]"),
    ):
        same_dtype(op, name, t, "hidden", hidden)
        require(tuple(t.shape) == want, op, name,
                lambda: f"must have shape {layout} = {_shape(want)} ({source} packed by moe_pack_weight; H from 'hidden', I the argument 'intermediate_size'), "
                        f"got shape {_shape(t)}")
        # (The kernel's contiguity check is not repeated here, as for every op: see the top.)
    dim(op, "indices", indices, 2)
    dtype(op, "indices", indices, torch.int64)
    size(op, "indices", indices, 0, T, "tokens")
    dim(op, "weights", weights, 2)
    same_shape(op, "weights", weights, "indices", indices)
    require(weights.dtype in (torch.float32, dt), op, "weights",
            lambda: f"must be float32 or hidden's dtype ({_dt(dt)}), got {_dt(weights.dtype)}")
    for name, t in (("gate_up_packed", gate_up_packed), ("down_packed", down_packed), ("weights", weights),
                    ("indices", indices)):
        same_device(op, name, t, "hidden", hidden)
