"""``MultiHeadLatentAttention``: drop-in for HF ``DeepseekV3Attention``, and ``LatentKVCache``.

Paths of :meth:`MultiHeadLatentAttention.forward`:

* **decode on the latent cache** (no autograd, ``S <= decode_max_tokens`` new tokens): the queries
  are absorbed through ``w_uk`` and attention runs on the cached ``[c_kv | k_pe]`` rows with the
  ``mla_decode`` kernel; the latent output goes through ``w_uv`` and ``o_proj``. With a
  :class:`LatentKVCache` the new tokens are written by the fused ``mla_append_cache`` kernel
  (kv_a_layernorm + RoPE + write). With an HF ``Cache`` the layer stores exactly what HF stores
  (normalised latents as keys, rotated ``k_pe`` as values), so HF and this module can share one
  cache; the kernel reads HF's key and value tensors in place (``pe_cache``), no concatenation.
* **prefill / training** (autograd, or more new tokens): the prefill op (CPU and CUDA kernels)
  decompresses latents tile by tile inside the kernel; its backward (gradients for queries,
  latents, k_pe and kv_b_proj) recomputes K/V per tile from the latents. This is the CPU
  default; on CUDA the default is the SDPA path below (SDPA's flash / memory-efficient attention
  was 6x faster forward and 50x faster in training on an H200; a :class:`LatentKVCache` step
  gathers its rows' cached latents and decompresses them too),
  ``LATENTMOE_MLA_MODULE_PREFILL=kernel|sdpa`` chooses either everywhere.
* **SDPA path** for masks other than plain causal (e.g. left padding) and attention dropout in
  training (and devices without latentmoe kernels): differentiable, built from
  ``latentmoe.ops.rms_norm`` and PyTorch ops: latents decompressed through ``kv_b_proj`` into
  per-head K/V for ``scaled_dot_product_attention``. Limit: K/V of all heads for the attended
  tokens are materialised (O(L * H * head_dim) memory).

An HF ``attention_mask`` that is anything but the plain causal mask (e.g. left padding) sends the
step through the SDPA path with that mask, so results stay correct. With a :class:`LatentKVCache`
visibility is causal over each row's own cached tokens: the mask must be None, plain causal, or
causal with padding keys hidden (what HF ``generate`` builds for a left-padded batch, or for a new
turn padded on its left after earlier turns), for which the layer stores only each row's real
tokens, so the kernels' causal rule is still HF's masked attention (anything else raises
ValueError rather than being ignored). A :class:`LatentKVCache` implements
what transformers' ``generate`` needs from a cache: ``model.generate(..., cache=LatentKVCache(...))``
on a model whose attention modules are this class.
"""

from __future__ import annotations

import contextlib
import math
import operator
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from latentmoe import _settings
from latentmoe.nn._linear import bmm_small_applies, check_float_dtype, is_plain, is_plain_linear, linear_params, project
from latentmoe.nn.norm import RMSNorm
from latentmoe.ops.linear import bmm_small
from latentmoe.ops.linear import MAX_ROWS
from latentmoe.ops.mla import mla_append_cache, mla_decode, mla_decode_absorbed
from latentmoe.ops._checks import autocast_off
from latentmoe.ops.mla_prefill import mla_prefill
from latentmoe.ops.norm import rms_norm


def _softmax_scale(config) -> float:
    """HF's MLA softmax scale: ``qk_head_dim**-0.5``, times ``mscale(factor, mscale_all_dim)**2``
    for non-default rope types with ``mscale_all_dim`` set."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        factor = params.get("factor", 1.0)
        if mscale_all_dim and factor > 1:
            m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale = scale * m * m
    return scale


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """HF RoPE on ``x [B, S, H, R]`` with ``cos/sin [B, S, R]`` (same op order as HF)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    if interleave:
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


_PREFILL_OP = "mla_prefill"


def _dense(t: torch.Tensor, dtype: torch.dtype, shape=None) -> torch.Tensor:
    """``t`` in ``dtype``, expanded to ``shape`` if given, contiguous: ``t`` itself when it already is
    (the conversions' calls cost a few microseconds of a small decode step)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if shape is not None and t.shape != shape:
        t = t.expand(shape)
    return t if t.is_contiguous() else t.contiguous()


def _has_kernel(op: str, device: torch.device) -> bool:
    """Whether ``latentmoe::<op>`` has a kernel registered for ``device``'s dispatch key."""
    return _has_kernel_for(op, device.type)


_HAS_KERNEL: dict[tuple[str, str], bool] = {}


@torch.compiler.assume_constant_result  # registrations are fixed once the extension is loaded
def _has_kernel_for(op: str, device_type: str) -> bool:
    # (Remembered: the dispatcher's lookup took ~4 us of a decode step's ~0.1 ms of Python.)
    has = _HAS_KERNEL.get((op, device_type))
    if has is None:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        has = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"latentmoe::{op}", key)
        _HAS_KERNEL[(op, device_type)] = has
    return has


def _prefill_kernel_chosen(device: torch.device) -> bool:
    """Whether the module's prefill / training attention (more new tokens than decode_max_tokens,
    or a gradient; any cache) runs the ``mla_prefill`` kernel (else SDPA on per-head K/V
    decompressed through ``kv_b_proj``, as HF does): ``LATENTMOE_MLA_MODULE_PREFILL``. ``auto``:
    the kernel where it is registered, except on CUDA, where SDPA (flash / memory-efficient
    attention) was measured faster on an H200 (2026-12-04, bench shapes, 4K tokens): a training
    step 17.7 ms against the kernel's 911 ms (fp32), a bf16 forward 0.74 ms against 4.4 ms.
    ``kernel`` on a device without one raises ``ValueError``."""
    choice = _settings.mla_module_prefill()
    if choice == "sdpa":
        return False
    has = _has_kernel(_PREFILL_OP, device)
    if choice == "kernel":
        if not has:
            raise ValueError(
                f"MultiHeadLatentAttention: LATENTMOE_MLA_MODULE_PREFILL=kernel, but mla_prefill has no kernel "
                f"for {device.type} tensors"
            )
        return True
    return has and device.type != "cuda"


class LatentKVCache:
    """Latent KV cache for MLA layers: rows ``[c_kv (C) | k_pe (R)]`` per token.

    Args:
        num_layers: layers sharing this cache (indexed by the module's ``layer_idx``).
        batch_size: B.
        capacity: tokens each batch row can hold (explicit; appending beyond it raises ValueError).
        kv_lora_rank, rope_dim: C and R.
        page_size: None for a contiguous ``[B, capacity, C+R]`` tensor per layer; else a paged
            ``[num_pages, page_size, C+R]`` pool per layer with ``block_table [B, ceil(capacity /
            page_size)]`` (int32). By default row ``b`` owns pages ``b*max_pages ...``; pass
            ``block_table`` (and ``num_pages``) to share a pool in any order.
    Per layer it tracks ``seqlens [B]`` (int32, on ``device``; rows may differ: :meth:`trim`
    cuts each row to its own length, :meth:`lengths` reads them) and a host copy used for the
    overflow check; with the table checked here once, the module's decode and append calls skip
    the ops' per-call host check (no device sync per layer and step), so a decode step can be
    captured in a CUDA graph and replayed step after step (copy each step's hidden states and
    rotary embeddings into the captured input tensors). Replays advance the device lengths but not
    the host copy: keep the number of replays within the capacity (tokens past it are dropped,
    never written out of bounds).

    Positions and padding: each layer also counts the token positions it was given
    (:meth:`get_seq_length`, HF's "past length", padding included). Padding is never kept: when
    the attention mask hides some of a step's new tokens (HF's left padding, also between a
    continued batch's previous turn and its new, left-padded one), each row keeps only its real
    tokens, in order, so row ``b`` holds ``lengths()[b]`` tokens, at most that count, and the
    kernels' causal rule over each row's own tokens is HF's masked attention; later steps must
    keep passing that padding mask (a plain causal mask or None then raises ValueError, until
    :meth:`trim` or :meth:`reset`). Without padding every row holds every position. A step still
    writes all of its S slots per row (the padding lands past the row's new length, to be
    overwritten by later tokens), so a paged row needs its own pages up to its length + S, as
    without padding: pages shared between rows are overwritten.

    Hugging Face ``generate``: the cache implements the part of transformers' ``Cache`` interface
    that ``generate`` and the mask builders of transformers 5.x call (:meth:`get_seq_length`,
    :meth:`get_query_offset`, :meth:`get_mask_sizes`, :meth:`crop`, :meth:`reorder_cache`, the
    ``is_*`` flags; transformers is not imported), so a model whose attention modules are
    :class:`MultiHeadLatentAttention` generates with ``model.generate(..., cache=c)``
    (``past_key_values=c`` in older releases): greedy or sampled, left-padded batches, assisted
    decoding (:meth:`crop`) and beam search (:meth:`reorder_cache`). Size it for the run:
    ``batch_size`` = batch * num_beams (* num_return_sequences when sampling several), ``capacity``
    >= padded prompt length + max_new_tokens - 1, plus the draft length with assisted decoding
    (``prompt_lookup_num_tokens`` / the assistant's tokens: a verify step writes the whole draft
    before the rejected part is cropped); a step that would not fit raises ValueError before
    anything is written. HF's own attention classes cannot use it (:meth:`update` raises). As with
    HF's own caches, ``generate`` continues from whatever the cache holds (it feeds only the prompt
    tokens past the cached positions): call :meth:`reset` before generating for a new batch.
    """

    # transformers' Cache flags: lengths live on the host (a compiled step would recompile at every
    # length; the module refuses torch.compile with this cache), and crop() can roll back.
    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        capacity: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        page_size: int | None = None,
        num_pages: int | None = None,
        block_table: torch.Tensor | None = None,
    ):
        if capacity < 1 or batch_size < 1 or num_layers < 1:
            raise ValueError("LatentKVCache: num_layers, batch_size and capacity must be >= 1")
        self.batch_size, self.capacity = batch_size, capacity
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        if page_size is not None and page_size < 1:
            raise ValueError(f"LatentKVCache: 'page_size' must be None or >= 1, got {page_size}")
        self.page_size = page_size
        D = kv_lora_rank + rope_dim
        if page_size is None:
            self.block_table = None
            shape = (batch_size, capacity, D)
        else:
            max_pages = (capacity + page_size - 1) // page_size
            if block_table is None:
                block_table = torch.arange(batch_size * max_pages, dtype=torch.int32)
                block_table = block_table.view(batch_size, max_pages)
            if tuple(block_table.shape) != (batch_size, max_pages):
                raise ValueError(
                    f"LatentKVCache: block_table must have shape {(batch_size, max_pages)}, "
                    f"got {tuple(block_table.shape)}"
                )
            num_pages = num_pages or int(block_table.max()) + 1
            lo, hi = int(block_table.min()), int(block_table.max())
            if lo < 0 or hi >= num_pages:
                raise ValueError(
                    f"LatentKVCache: block_table entries must be in [0, num_pages={num_pages}), "
                    f"got [{lo}, {hi}]"
                )
            self.block_table = block_table.to(device=device, dtype=torch.int32).contiguous()
            shape = (num_pages, page_size, D)
        # Normal tensors even when made under torch.inference_mode(): they are written in place,
        # which inference tensors refuse outside that mode (e.g. in generate, under no_grad).
        with torch.inference_mode(False):
            self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.seqlens = [torch.zeros(batch_size, dtype=torch.int32, device=device) for _ in range(num_layers)]
        self._host_lens = [[0] * batch_size for _ in range(num_layers)]
        self._row_max = [0] * num_layers  # max(_host_lens[layer]), kept by _set_lens
        self._seen = [0] * num_layers  # positions given per layer (padding included)
        # Per layer, the first position from which every row holds every token (no padding, no
        # trim since): crop() may remove positions back to it, not further.
        self._dense_from = [0] * num_layers
        # Per layer: padding was left out (a per-row advance) since the last trim / reset, so rows
        # hold fewer tokens than positions and a mask must keep saying which were padding.
        self._skipped = [False] * num_layers
        # The last mask analysis (MultiHeadLatentAttention): reused by the later layers of a step.
        self._mask_memo = None

    def __getstate__(self):
        # Copies (deepcopy, pickle) start without the mask memo (it holds a weak reference).
        return dict(self.__dict__, _mask_memo=None)

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "_row_max" not in state:  # pickled before the running maximum existed
            self._row_max = [max(lens) for lens in self._host_lens]

    def _layer(self, layer_idx: int) -> int:
        if not 0 <= layer_idx < len(self.kv):
            raise ValueError(
                f"LatentKVCache: layer_idx {layer_idx} is out of range: the cache was made for "
                f"num_layers={len(self.kv)}"
            )
        return layer_idx

    def _set_lens(self, layer: int, lens: list[int]) -> None:
        """The host copy of ``layer``'s row lengths (the device ``seqlens`` are the caller's) and its
        running maximum, which the per-step checks read instead of scanning every row."""
        self._host_lens[layer] = lens
        self._row_max[layer] = max(lens)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Token positions ``layer_idx`` was given so far, padding included (HF's past length); rows
        hold at most this many tokens, each exactly this many without padding (see :meth:`lengths`)."""
        return self._seen[self._layer(layer_idx)]

    def lengths(self, layer_idx: int = 0) -> list[int]:
        """Tokens cached in each batch row of ``layer_idx``."""
        return list(self._host_lens[self._layer(layer_idx)])

    def trim(self, lengths, layer_idx: int | None = None) -> None:
        """Cut each batch row back to ``lengths[b]`` tokens (at most what it holds), in every layer
        or in ``layer_idx``: e.g. after a right-padded prefill, each row keeps its own prompt and
        the next tokens are appended (and attend) from there. ``lengths``: B ints or a tensor.
        The positions count (:meth:`get_seq_length`) becomes the longest row."""
        self._mask_memo = None
        lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        layers = range(len(self.kv)) if layer_idx is None else [self._layer(layer_idx)]
        if len(lengths) != self.batch_size:
            raise ValueError(f"LatentKVCache.trim: 'lengths' needs {self.batch_size} entries, got {len(lengths)}")
        for layer in layers:
            held = self._host_lens[layer]
            if any(n < 0 or n > h for n, h in zip(lengths, held)):
                raise ValueError(
                    f"LatentKVCache.trim: 'lengths' {lengths} must be in [0, tokens held {held}] "
                    f"(layer {layer}): trimming cannot add tokens"
                )
        for layer in layers:
            self._set_lens(layer, list(lengths))
            self.seqlens[layer].copy_(torch.tensor(lengths, dtype=torch.int32))
            self._seen[layer] = self._dense_from[layer] = max(lengths)
            self._skipped[layer] = False

    def reserve(self, layer_idx: int, n_new: int) -> None:
        """Raise ValueError if ``n_new`` more tokens per row would not fit in ``layer_idx``. A model
        steps its layers in order with the same tokens, so layer 0 checks every layer: a step that
        would overflow any layer (layers :meth:`trim`-med apart) raises before layer 0 is written."""
        self._layer(layer_idx)
        most = max(self._row_max) if layer_idx == 0 else self._row_max[layer_idx]
        if most + n_new <= self.capacity:
            return
        for layer in range(len(self.kv)) if layer_idx == 0 else (layer_idx,):
            need = self._row_max[layer] + n_new
            if need > self.capacity:
                raise ValueError(
                    f"LatentKVCache: layer {layer} would hold {need} tokens but capacity is {self.capacity} "
                    "(for generate: at least the padded prompt length + max_new_tokens - 1, plus the draft "
                    "length with assisted decoding)"
                )

    def advance(self, layer_idx: int, n_new, positions: int | None = None,
                last_padding: int | None = None) -> None:
        """Count appended tokens in ``layer_idx``: ``n_new`` (an int) in every row, the device lengths
        grown in place, so a decode step captured in a CUDA graph advances them on every replay; or
        ``n_new[b]`` in row ``b`` (B ints) for a step of ``positions`` new tokens whose others were
        padding (each row's real tokens first in its slots, its padding after). ``last_padding``:
        the step's last position (0-based) that is padding in some row; by default each row's
        padding is taken to come before its tokens (``positions - min(n_new) - 1``). Only the
        positions after it, real in every row, may be given back by :meth:`crop`."""
        seen = self._seen[layer_idx]
        try:
            n = operator.index(n_new)  # an int, a numpy integer, a 0-d integer tensor
        except TypeError:
            n = None
        if n is not None:
            self.seqlens[layer_idx].add_(n)
            self._set_lens(layer_idx, [m + n for m in self._host_lens[layer_idx]])
            self._seen[layer_idx] = seen + (n if positions is None else positions)
            return
        counts = [int(n) for n in n_new]
        fits = positions is not None and all(0 <= n <= positions for n in counts)
        if len(counts) != self.batch_size or not fits:
            raise ValueError(
                f"LatentKVCache.advance: per-row 'n_new' needs {self.batch_size} entries in [0, positions], "
                f"got {counts} with positions={positions}"
            )
        if last_padding is None:
            last_padding = positions - min(counts) - 1  # each row's padding before its tokens
        elif not -1 <= last_padding < positions or positions - 1 - last_padding > min(counts):
            raise ValueError(
                f"LatentKVCache.advance: 'last_padding' must be in [-1, positions) with at most min(n_new) "
                f"positions after it, got {last_padding} with positions={positions}, n_new={counts}"
            )
        lens = self.seqlens[layer_idx]
        lens.add_(torch.tensor(counts, dtype=torch.int32).to(lens.device))
        self._set_lens(layer_idx, [n + c for n, c in zip(self._host_lens[layer_idx], counts)])
        if last_padding >= 0:
            self._dense_from[layer_idx] = seen + last_padding + 1
            self._skipped[layer_idx] = True
        self._seen[layer_idx] = seen + positions

    def rows(self, layer_idx: int, length: int) -> torch.Tensor:
        """The first ``length`` cached rows of every batch row as ``[B, length, C+R]``."""
        kv = self.kv[layer_idx]
        if self.block_table is None:
            return kv[:, :length]
        t = torch.arange(length, device=kv.device)
        pages = self.block_table[:, t // self.page_size].long()
        return kv[pages, (t % self.page_size)[None, :]]

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs per layer."""
        return (self.kv_lora_rank + self.rope_dim) * self.kv[0].element_size()

    # ---- transformers' Cache interface (what generate() and the mask builders call) ------------
    @property
    def is_sliding(self) -> list[bool]:
        """Per layer: no sliding window."""
        return [False] * len(self.kv)

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: attention layers (no recurrent state)."""
        return [False] * len(self.kv)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Position of the next new token in HF's padded coordinates: :meth:`get_seq_length`."""
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` HF's mask builders size the mask with: every position so far
        and the ``query_length`` new ones, from position 0."""
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """Tokens a row can hold: the capacity."""
        return self.capacity

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        """HF generate asks caches to keep what :meth:`crop` may roll back (transformers >= 5.25
        passes ``recurrent_states_to_keep`` for recurrent layers): this one keeps every token and
        has no recurrent state, so there is nothing to do."""

    def is_recording_past(self, layer_idx: int = 0) -> bool:
        """HF's question for sliding / recurrent layers: none here keeps a bounded past (False)."""
        self._layer(layer_idx)
        return False

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        """Recurrent states HF generate must keep for a rollback: none (attention layers only)."""
        if layer_idx is not None:
            self._layer(layer_idx)
        return 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` positions from every row of every layer (HF's
        convention: a count <= 0, 0 does nothing; assisted decoding drops rejected draft tokens
        so). Only positions that every row holds can go: not back into a padded prompt, nor to
        before a :meth:`trim`."""
        self._mask_memo = None
        n = operator.index(tokens_to_remove)
        if n > 0:
            raise ValueError(
                f"LatentKVCache.crop: 'tokens_to_remove' must be <= 0 (minus the number of tokens to remove, "
                f"HF's convention), got {n}"
            )
        n = -n
        for layer in range(len(self.kv)):
            removable = self._seen[layer] - self._dense_from[layer]
            if n > removable:
                raise ValueError(
                    f"LatentKVCache.crop: 'tokens_to_remove' = -{n}, but layer {layer} can give back only "
                    f"its last {removable} of {self._seen[layer]} positions (earlier ones hold padding in "
                    "some row, or precede a trim)"
                )
        if n == 0:
            return
        for layer in range(len(self.kv)):
            self._seen[layer] -= n
            self._set_lens(layer, [m - n for m in self._host_lens[layer]])
            self.seqlens[layer].sub_(n)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row ``b`` becomes a copy of row ``beam_idx[b]`` (tokens and length) in every layer: HF beam
        search's step. A paged cache copies pages, so no two rows may share a page of the table."""
        self._mask_memo = None
        src = torch.as_tensor(beam_idx)
        integer = not (src.dtype.is_floating_point or src.dtype.is_complex or src.dtype == torch.bool)
        if src.dim() != 1 or src.numel() != self.batch_size or not integer:
            raise ValueError(
                f"LatentKVCache.reorder_cache: 'beam_idx' must be {self.batch_size} integer row indices, got "
                f"shape {tuple(src.shape)} of {src.dtype}"
            )
        order = [int(i) for i in src.tolist()]
        if any(not 0 <= i < self.batch_size for i in order):
            raise ValueError(
                f"LatentKVCache.reorder_cache: 'beam_idx' entries must be in [0, {self.batch_size}), "
                f"got {order}"
            )
        if order == list(range(self.batch_size)):
            return
        device = self.kv[0].device
        idx = torch.tensor(order, device=device)
        table = None if self.block_table is None else self.block_table.long()
        if table is not None and torch.unique(table).numel() != table.numel():
            raise ValueError(
                "LatentKVCache.reorder_cache: rows of 'block_table' share pages; beam search copies rows "
                "page by page and needs every row to own its pages"
            )
        for layer, kv in enumerate(self.kv):
            lens = self._host_lens[layer]
            n = max(lens)
            if n:
                if table is None:
                    kv[:, :n] = kv[idx, :n]  # the gather copies first: rows may read themselves
                else:
                    p = (n + self.page_size - 1) // self.page_size
                    kv[table[:, :p]] = kv[table[idx, :p]]
            new = [lens[i] for i in order]
            self._set_lens(layer, new)
            self.seqlens[layer].copy_(torch.tensor(new, dtype=torch.int32))

    def reset(self) -> None:
        """Empty every layer (lengths and positions back to 0; stored rows stay but are never read
        past the lengths), e.g. to reuse the cache for another generate call."""
        self._mask_memo = None
        for layer in range(len(self.kv)):
            self.seqlens[layer].zero_()
            self._set_lens(layer, [0] * self.batch_size)
            self._seen[layer] = self._dense_from[layer] = 0
            self._skipped[layer] = False

    def update(self, key_states=None, value_states=None, layer_idx=None, *args, **kwargs):
        """HF's attention classes call ``cache.update(keys, values, layer_idx)``: refused."""
        raise ValueError(
            f"LatentKVCache: an attention layer ({layer_idx=}) called update() with keys and values, as "
            "transformers' attention classes do; a LatentKVCache is written only by "
            "latentmoe.nn.MultiHeadLatentAttention (swap the model's attention modules for it), or use "
            "an HF cache (DynamicCache, StaticCache)"
        )


def _additive_keep(mask: torch.Tensor) -> torch.Tensor:
    """Which entries of an attention mask let their key through: a bool keep-mask as it is; an
    additive float mask where it is above half its dtype's minimum (HF writes finfo.min, or -inf,
    for a hidden key)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _causal_keep(S: int, L: int, valid, device) -> torch.Tensor:
    """``[S, L]`` bool (``[B, 1, S, L]`` for ``valid`` of shape ``[B, 1, 1]``): query i, at
    position valid - S + i, keeps keys 0 .. valid - S + i."""
    if isinstance(valid, torch.Tensor):
        valid = valid.to(device)
    i = torch.arange(S, device=device)[:, None] + (valid - S)
    keep = torch.arange(L, device=device)[None, :] <= i
    return keep[:, None] if keep.dim() == 3 else keep


def _dense_mask(mask, B: int, S: int, L: int, valid):
    """HF's attention masks as the 4-D ones the module applies (None stays None): a flex-attention
    ``BlockMask`` evaluated densely, a 2-D ``[B, keys]`` padding mask (what HF's flash-attention
    path passes) combined with the causal rule. 4-D masks pass through; one covering fewer than the
    ``valid`` written keys raises ValueError."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):  # a flex-attention BlockMask
        from torch.nn.attention.flex_attention import create_mask

        q_len, kv_len = mask.seq_lengths
        if q_len != S:
            raise ValueError(f"MultiHeadLatentAttention: the BlockMask covers {q_len} queries, not the {S} new tokens")
        mask = create_mask(mask.mask_mod, B, 1, S, kv_len, device=mask.kv_num_blocks.device)
    elif mask.dim() == 2:
        keep = mask.bool()
        if keep.shape[-1] < L:  # keys past the mask: slots not written yet (never written keys)
            _check_mask_covers(keep.shape[-1], valid, S)
            keep = F.pad(keep, (0, L - keep.shape[-1]), value=False)
        mask = keep[:, None, None, :L] & _causal_keep(S, L, valid, mask.device)
    elif mask.dim() != 4:
        raise ValueError(
            "MultiHeadLatentAttention: 'attention_mask' must be None, HF's 4-D mask, a 2-D [batch, keys] "
            f"padding mask or a flex-attention BlockMask, got shape {tuple(mask.shape)}"
        )
    if mask.shape[-1] < L:
        _check_mask_covers(mask.shape[-1], valid, S)
        # Keys past the mask are slots of a pre-allocated cache not written yet: hidden.
        fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        mask = F.pad(mask, (0, L - mask.shape[-1]), value=fill)
    return mask


def _check_mask_covers(keys: int, valid, S: int) -> None:
    """A mask (2-D, 4-D or a BlockMask) must cover every written key, the ``valid`` cached plus new ones:
    hiding the keys it leaves out would drop the last queries' own keys silently (HF raises on the
    shape). A device-tensor ``valid`` (HF's StaticCache) is checked in eager mode only (a host sync,
    on this rare path alone)."""
    if isinstance(valid, torch.Tensor):
        if torch.compiler.is_compiling() or (valid.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        short = bool(torch.any(valid > keys))
        valid = int(valid.max())
    else:
        short = keys < valid
    if short:
        raise ValueError(
            f"MultiHeadLatentAttention: 'attention_mask' covers {keys} keys, but the layer attends over "
            f"{valid} (the cached tokens plus the {S} new ones); the mask must cover all of them"
        )


def _packed_causal_keep(cu_q, cu_k, Q: int, K: int, device) -> torch.Tensor:
    """``[1, 1, Q, K]`` bool: the causal mask of requests packed into one sequence (HF's continuous
    batching), request i's queries ``cu_q[i]:cu_q[i+1]`` the last of its keys ``cu_k[i]:cu_k[i+1]``;
    query j of it sees its request's keys up to ``klen - qlen + j``. Queries past ``cu_q[-1]``
    (padding) see key 0 only: finite, unused outputs. No host sync (CUDA-graph safe)."""
    cu_q = cu_q.to(device=device, dtype=torch.long)
    cu_k = cu_k.to(device=device, dtype=torch.long)
    n = cu_q.numel() - 1
    qi, ki = torch.arange(Q, device=device), torch.arange(K, device=device)
    q_req = torch.searchsorted(cu_q[1:], qi, right=True).clamp_max(n - 1)  # each query's request
    k_req = torch.searchsorted(cu_k[1:], ki, right=True)  # n for keys past the last request's
    last = cu_k[q_req + 1] - (cu_q[q_req + 1] - cu_q[q_req]) + (qi - cu_q[q_req])  # last key each query sees
    keep = (k_req[None, :] == q_req[:, None]) & (ki[None, :] <= last[:, None])
    keep = torch.where((qi >= cu_q[-1])[:, None], ki[None, :] == 0, keep)
    return keep.view(1, 1, Q, K)


def _refuse_latent_cache_mask(why: str):
    raise ValueError(
        "MultiHeadLatentAttention: with a LatentKVCache, 'attention_mask' must be None, the causal mask, "
        "or the causal mask with padding keys hidden (as HF builds it from a 2-D padding mask): the cache "
        "stores each row's real tokens only and attends causally over them; " + why
    )


def _latent_cache_step(module, q, kv, cos, sin, cache, attention_mask, B, S):
    """The LatentKVCache part of MultiHeadLatentAttention.forward: ``(output, None)``."""
    keep = module._latent_cache_new_tokens(attention_mask, B, S, cache)
    return module._forward_latent_cache(q, kv, cos, sin, cache, keep), None


# Under torch.compile the LatentKVCache part runs eagerly, whole (its lengths live on the host: a
# traced step would recompile at every length): a graph break, and nothing it calls is compiled
# frame by frame (that recompiled the projections at every step). fullgraph=True raises
# Unsupported with this reason.
_latent_cache_step_eager = torch.compiler.disable(
    _latent_cache_step,
    reason="latentmoe: a LatentKVCache keeps its lengths on the host (a traced step would recompile at "
    "every length), so its part of MultiHeadLatentAttention runs eagerly after a graph break; with "
    "fullgraph=True decode with it eagerly or in CUDA graphs",
)


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention with HF ``DeepseekV3Attention``'s parameters and interface.

    Args:
        config: a ``transformers.DeepseekV3Config`` or any object with its field names
            (hidden_size, num_attention_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim,
            qk_rope_head_dim, v_head_dim, attention_bias, rope_interleave, rope_parameters).
        layer_idx: index into the cache.
    Forward:
        ``hidden_states [B, S, hidden]``, ``position_embeddings (cos, sin) [B, S, R]`` (HF's rotary
        embedding output at the new tokens' positions), ``attention_mask`` (HF 4-D or None), and the
        cache as ``cache=`` or ``past_key_values=`` (an HF ``Cache``, HF continuous batching's
        ``PagedAttentionCache`` in its index-based mode with HF's 4-D mask, or a
        :class:`LatentKVCache`).
        Returns ``(out [B, S, hidden], None)`` like HF (no attention weights: they are never
        materialised, and HF's ``output_attentions``, which records HF's own attention class by
        hooks, comes back empty with this module swapped in). ``attention_mask`` may also be HF's
        2-D ``[B, keys]`` padding mask (its flash-attention path) or a flex-attention
        ``BlockMask``. Projections that are not plain ``nn.Linear`` layers (peft LoRA wrappers,
        forward hooks) are called as modules; a wrapped ``kv_b_proj`` takes the path that
        decompresses K/V through it instead of the fused kernels.
    torch.compile (``fullgraph=True`` works): with no cache or an HF cache. A 4-D mask cannot be
    inspected while tracing, so there it is applied as given through SDPA on decompressed K/V;
    pass ``attention_mask=None`` for plain causal attention to keep the fused kernels. A
    :class:`LatentKVCache` keeps its lengths on the host (each step would recompile): compiled,
    the cache part runs eagerly after a graph break (nothing it calls is compiled), and
    ``fullgraph=True`` raises ``torch._dynamo.exc.Unsupported`` naming the cache; decode with it
    eagerly or in CUDA graphs.
    """

    decode_max_tokens = 16  # at most this many new tokens take the absorbed decode path

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.rope_interleave = bool(getattr(config, "rope_interleave", True))
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        bias = getattr(config, "attention_bias", False)
        H, hidden = self.num_heads, self.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, H * self.qk_head_dim, bias=False)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)  # HF: default eps 1e-6
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        kv_b_out = H * (self.qk_nope_head_dim + self.v_head_dim)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, kv_b_out, bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, hidden, bias=bias)
        self.scaling = _softmax_scale(config)

    # ---- absorbed weights --------------------------------------------------------------------
    def _kv_b_plain(self) -> bool:
        """Whether the kernels may read ``kv_b_proj.weight`` in place of calling the layer: a plain
        ``nn.Linear`` without a bias (HF's has none; one swapped in with a bias is called, as is a
        wrapped or hooked one, on the decompressing SDPA path)."""
        kv_b = self.kv_b_proj
        return is_plain_linear(kv_b) and linear_params(kv_b)[1] is None

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_uk [H, N, C], w_uv_t [H, C, V])``: views of ``kv_b_proj.weight`` (of a contiguous copy
        of it if it is not contiguous, e.g. loaded with ``assign=True`` from a transposed tensor).

        Never cached: a cache keyed on the weight's version counter went stale after fused
        optimizer steps (``AdamW(fused=True)`` does not bump it) and in-place updates through
        ``.data``, so every call reads the current weight. Views keep gradients flowing to
        kv_b_proj and work under torch.compile and torch.func.
        """
        w = self.kv_b_proj.weight.contiguous()  # (a copy only for a weight loaded non-contiguous)
        H, N, V, C = self.num_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        wv = w.view(H, N + V, C)
        return wv[:, :N], wv[:, N:].transpose(1, 2)

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if cache is None:
            cache = past_key_values
        elif past_key_values is not None and past_key_values is not cache:
            raise ValueError(
                "MultiHeadLatentAttention: got two different caches, 'cache' and 'past_key_values' "
                "(older transformers name the argument past_key_values); pass one"
            )
        check_float_dtype("MultiHeadLatentAttention", "hidden_states", hidden_states)
        B, S, _ = hidden_states.shape
        if S == 0 and isinstance(cache, LatentKVCache):
            raise ValueError(
                f"MultiHeadLatentAttention: no new tokens (hidden_states of shape {tuple(hidden_states.shape)}) "
                f"for a LatentKVCache holding {cache.get_seq_length(self.layer_idx)} positions (with generate: "
                "a cache still holding an earlier batch makes generate slice the whole prompt away; call "
                "cache.reset() before generating for a new batch)"
            )
        H, N, R, C = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if (B == 0 or S == 0) and not isinstance(cache, LatentKVCache):
            # No query (an empty batch, or no new tokens): nothing to attend and nothing to store (HF's
            # own attention fails to reshape these); the output [B, S, hidden] still comes from o_proj.
            if hidden_states.shape[-1] != self.hidden_size:
                raise ValueError(
                    f"MultiHeadLatentAttention: hidden_states of shape {tuple(hidden_states.shape)}; expected "
                    f"[B, S, {self.hidden_size}]"
                )
            # (From hidden_states, so the output requires grad when they do, frozen weights or not.)
            empty = hidden_states.narrow(-1, 0, 1).mul(0).expand(B, S, H * self.v_head_dim)
            return project(self.o_proj, empty), None
        if self.q_lora_rank is None:
            q = project(self.q_proj, hidden_states)
        else:
            q = project(self.q_b_proj, self.q_a_layernorm(project(self.q_a_proj, hidden_states)))
        q = q.view(B, S, H, self.qk_head_dim)
        cos, sin = position_embeddings
        for name, t in (("cos", cos), ("sin", sin)):
            # (Checked here for every path: a wrong width was sliced or broadcast silently before.)
            if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != S or t.shape[2] != R:
                raise ValueError(
                    f"MultiHeadLatentAttention: position_embeddings' {name} has shape {tuple(t.shape)}; expected "
                    f"[{B} or 1, {S}, {R}] ([batch, new tokens, qk_rope_head_dim], as HF's rotary embedding "
                    "returns for these hidden_states)"
                )
        # The projections' dtype: the hidden states', or autocast's (under torch.autocast).
        if cos.dtype != q.dtype or sin.dtype != q.dtype:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        kv = project(self.kv_a_proj_with_mqa, hidden_states)
        # (cos / sin count too: a learned position embedding trains through this layer.)
        grad = torch.is_grad_enabled() and (
            hidden_states.requires_grad or cos.requires_grad or sin.requires_grad
            or any(p.requires_grad for p in self.parameters())
        )

        if isinstance(cache, LatentKVCache):
            if grad:
                raise ValueError(
                    "MultiHeadLatentAttention: LatentKVCache is for inference; run under torch.no_grad() "
                    "(training uses cache=None)"
                )
            if self.training and self.attention_dropout > 0:
                raise ValueError(
                    f"MultiHeadLatentAttention: the module is in training mode with attention_dropout="
                    f"{self.attention_dropout}, which a LatentKVCache's fused kernels do not apply; call "
                    "model.eval() before decoding with it (or use an HF cache, whose path applies dropout)"
                )
            if cache.batch_size != B:
                raise ValueError(
                    f"MultiHeadLatentAttention: cache batch {cache.batch_size} != input batch {B} (generate "
                    "runs batch * num_beams rows in beam search, * num_return_sequences when sampling "
                    "several: size the LatentKVCache for that)"
                )
            step = _latent_cache_step_eager if torch.compiler.is_compiling() else _latent_cache_step
            return step(self, q, kv, cos, sin, cache, attention_mask, B, S)

        c_kv = self._kv_norm(kv[..., :C])
        k_pe = _rotate(kv[..., C:].view(B, S, 1, R), cos, sin, self.rope_interleave)
        past = 0
        if cache is not None and "write_index" in kwargs:
            # HF's continuous batching (generate_batch, cache_implementation="paged"; transformers
            # >= 5.25): a PagedAttentionCache stores the latents and hands back, per call, the
            # packed keys of every request in the batch; HF's 4-D mask keeps each query to its own
            # request's keys.
            keys, values, attention_mask = self._paged_cache_update(cache, c_kv, k_pe, attention_mask, B, S, kwargs)
            c_all, pe_all = keys[:, 0], values[:, 0]
            past = c_all.shape[1] - S
        elif cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            if attention_mask is not None and not isinstance(past, torch.Tensor):  # before the cache is written
                if not isinstance(attention_mask, torch.Tensor):  # a BlockMask
                    _check_mask_covers(attention_mask.seq_lengths[1], past + S, S)
                elif attention_mask.dim() in (2, 4):
                    _check_mask_covers(attention_mask.shape[-1], past + S, S)
            if isinstance(past, torch.Tensor):
                # HF's StaticCache returns its own length tensor, which update() advances in place:
                # the length before this step must be a copy (else the new tokens count twice).
                past = past.clone()
            keys, values = cache.update(c_kv.view(B, 1, S, C), k_pe.view(B, 1, S, R), self.layer_idx)
            c_all, pe_all = keys[:, 0], values[:, 0]
        else:
            c_all, pe_all = c_kv, k_pe[:, :, 0]
        L = c_all.shape[1]
        # Keys holding tokens: all L of a growing cache (HF DynamicCache); a pre-allocated one (HF
        # StaticCache) hands back its whole buffer, of which only the first past + S slots are
        # written. Its length is a device tensor there: used as one (no host copy, compile-safe).
        if isinstance(past, torch.Tensor):
            valid = torch.clamp(past.to(c_all.device) + S, max=L)
        else:
            valid = min(past + S, L)  # (no int(): a traced growing cache keeps its length symbolic)
        attention_mask = _dense_mask(attention_mask, B, S, L, valid)
        plain_causal = self._is_plain_causal(attention_mask, B, S, L, valid)
        dropout = self.training and self.attention_dropout > 0
        # The kernels read kv_b_proj's weight directly: only for a plain nn.Linear (a LoRA wrapper
        # or a hook takes the path that calls the layer).
        # torch.export: no branch on S (a dynamic S may span decode_max_tokens): the prefill kernel.
        # An HF cache's past keys / values may require grad themselves (prefix tuning: learned past
        # keys with a frozen layer): the decode ops have no backward, so that needs the prefill path.
        grad = grad or (torch.is_grad_enabled() and (c_all.requires_grad or pe_all.requires_grad))
        decode = not grad and not torch.compiler.is_exporting() and S <= self.decode_max_tokens
        if plain_causal and not dropout and self._kv_b_plain() and (
            decode or _prefill_kernel_chosen(hidden_states.device)
        ):
            if isinstance(valid, torch.Tensor):
                seqlens = valid.to(torch.int32).expand(B).contiguous()
            else:
                seqlens = torch.full((B,), valid, dtype=torch.int32, device=c_all.device)
            if decode and self._fused_decode_applies(q, c_all.dtype):  # HF's keys/values read in place
                out = self._fused_decode(
                    q, cos, sin, c_all.contiguous(), seqlens, None, pe_cache=pe_all.contiguous(), max_seqlen=L
                )
            elif decode:
                q_nope, q_pe = self._query_parts(q, cos, sin)  # (here: the fused op rotates q_pe itself)
                out = self._absorbed_attention(
                    q_nope, q_pe, c_all.contiguous(), seqlens, None,
                    pe_cache=pe_all.contiguous(), max_seqlen=L,
                )
            else:
                rows = torch.cat([c_all, pe_all], dim=-1)
                out = self._prefill_attention(*self._query_parts(q, cos, sin), rows, seqlens, None)
        else:
            q_nope, q_pe = self._query_parts(q, cos, sin)
            out = self._sdpa_attention(
                q_nope, q_pe, c_all, pe_all, None if plain_causal else attention_mask, valid
            )
        return project(self.o_proj, out.reshape(B, S, H * self.v_head_dim)), None

    # ---- pieces --------------------------------------------------------------------------------
    def _paged_cache_update(self, cache, c_kv, k_pe, attention_mask, B: int, S: int, kwargs):
        """``cache.update`` of HF's continuous-batching cache: its index-based form, which writes
        the new latents and returns every key the step reads (packed, request after request), and
        the step's mask: HF's 4-D one as given, or, where HF passes none (its flash-attention
        path, e.g. ``auto_switch_to_flash``), the block-diagonal causal mask of the packed requests
        built from ``cu_seq_lens_q`` / ``cu_seq_lens_k``. Its block-table form (paged flash kernels:
        the keys are never handed back) cannot be attended here: ValueError."""
        if kwargs.get("block_table") is not None:
            raise ValueError(
                "MultiHeadLatentAttention: HF's paged cache in block-table mode (a paged flash-attention "
                "kernel reads the cache itself) is not supported; use attn_implementation 'sdpa' or 'eager' "
                "for continuous batching (its index-based mode)"
            )
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4):
            raise ValueError(
                "MultiHeadLatentAttention: HF's paged cache packs several requests into one sequence; the "
                "step needs HF's 4-D attention mask or none (then cu_seq_lens_q / cu_seq_lens_k keep them "
                f"apart), got {type(attention_mask).__name__}"
            )
        if attention_mask is None and kwargs.get("cu_seq_lens_q") is None:
            raise ValueError(
                "MultiHeadLatentAttention: HF's paged cache packs several requests into one sequence; with "
                "no attention mask the step needs cu_seq_lens_q / cu_seq_lens_k to keep them apart"
            )
        R = self.qk_rope_head_dim
        keys, values = cache.update(
            c_kv.reshape(B, 1, S, self.kv_lora_rank), k_pe.reshape(B, 1, S, R), self.layer_idx, kwargs=kwargs
        )
        if attention_mask is None:  # (update() left this layer's cu_seq_lens_k in kwargs)
            cu_k = kwargs["cu_seq_lens_k"]
            if not isinstance(cu_k, torch.Tensor):  # (5.25's update() leaves this layer's tensor)
                raise ValueError(
                    "MultiHeadLatentAttention: HF's paged cache left cu_seq_lens_k as "
                    f"{type(cu_k).__name__}, not this layer's tensor, after update(); this transformers "
                    "release is not supported without an attention mask"
                )
            attention_mask = _packed_causal_keep(kwargs["cu_seq_lens_q"], cu_k, S, keys.shape[2], keys.device)
        return keys, values, attention_mask

    def _kv_norm(self, x: torch.Tensor) -> torch.Tensor:
        if not is_plain(self.kv_a_layernorm, RMSNorm):  # hooked / wrapped: called as a module
            return self.kv_a_layernorm(x).to(x.dtype)
        w = self.kv_a_layernorm.weight
        return rms_norm(x.contiguous(), w.to(x.dtype), self.kv_a_layernorm.variance_epsilon)

    def _latent_cache_new_tokens(self, attention_mask, B: int, S: int, cache: LatentKVCache):
        """Which of the ``S`` new tokens a :class:`LatentKVCache` stores: None for all (no mask, or
        the plain causal mask), else ``[B, S]`` bool, False for padding.

        The cache holds no padding: each row keeps its own tokens and the kernels attend causally
        over them, which is HF's masked attention when the mask is the causal mask with some keys
        hidden in every query row (padding), each row's last new token real unless all of them are
        padding (no right padding: HF computes a padding query's output, and generate reads the
        last one), and as many visible earlier keys as the row holds. Rows of padding queries are
        not read (their outputs are set to 0). Any other mask raises ValueError.

        The mask's analysis reads its values (host syncs on a GPU); a model hands every layer the
        same mask tensor in a step, so the later layers of the step reuse the first one's analysis
        (kept on the cache, keyed by the tensor, its storage, shape and the positions seen) and only
        check their own rows' lengths."""
        seen = cache.get_seq_length(self.layer_idx)
        key = None
        if isinstance(attention_mask, torch.Tensor):
            key = (id(attention_mask), attention_mask.data_ptr(), tuple(attention_mask.shape),
                   attention_mask.dtype, attention_mask.device, seen, B, S)
        memo = cache._mask_memo
        # (The weak reference: a mask made per layer and freed can leave the next one at the same
        # id and address, with other values.)
        if (key is not None and memo is not None and memo[0] == key and self.layer_idx > memo[1]
                and memo[3]() is attention_mask):
            plain, held, new = memo[2]
        else:
            plain, held, new = self._analyse_latent_cache_mask(attention_mask, B, S, seen)
            cache._mask_memo = None if key is None else (
                key, self.layer_idx, (plain, held, new), weakref.ref(attention_mask))
        rows = cache.lengths(self.layer_idx)
        if plain:
            if cache._skipped[self.layer_idx] and rows != [seen] * B:
                _refuse_latent_cache_mask(
                    f"this cache left out padding (its rows hold {rows} tokens of {seen} positions), so a "
                    "mask must keep marking it: a plain causal mask (or None) would attend over padding the "
                    "cache never stored (pass the padding mask, as generate does; trim() or reset() "
                    "starts over)"
                )
            return None
        if held != rows:
            _refuse_latent_cache_mask(
                f"this one shows {held} unpadded earlier keys per row but the cache rows hold {rows} tokens "
                "(earlier tokens cannot be hidden afterwards: e.g. the pad tokens generate appends after a "
                "row's EOS are stored, masked 1; keep them at 1 in a continuation's mask, or reset() the "
                "cache and feed the whole conversation)"
            )
        return new

    def _analyse_latent_cache_mask(self, attention_mask, B: int, S: int, seen: int):
        """``(plain, held, new)`` for :meth:`_latent_cache_new_tokens`: whether the mask is the plain
        causal one; else the unpadded earlier keys per row (host ints) and the new tokens kept
        (``[B, S]`` bool, None when all are). Raises ValueError for masks a cache cannot honour."""
        L = seen + S
        mask = _dense_mask(attention_mask, B, S, L, L)
        if self._is_plain_causal(mask, B, S, L, L):
            return True, None, None
        if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] != 1 or mask.shape[2] != S:
            _refuse_latent_cache_mask(f"got a mask of shape {tuple(mask.shape)} for {B} rows of {S} new tokens")
        m = mask[..., :L]
        keep = _additive_keep(m)
        if m.dtype != torch.bool:
            if torch.any(m[keep] != 0):
                _refuse_latent_cache_mask("this one adds biases other than 0 / -inf")
        keep = keep[:, 0].expand(B, S, L)
        keys = keep[:, -1]  # what the last new token sees: every unpadded key
        new = keys[:, seen:]
        if bool(torch.any(new.any(1) & ~new[:, -1])):
            _refuse_latent_cache_mask(
                "in this one a row's last new token is padding after some of its real ones (right "
                "padding): HF computes that padding query's output (and generate reads it), the cache "
                "stores no padding; pad on the left, or anywhere before a row's last token"
            )
        want = keys[:, None, :] & _causal_keep(S, L, L, keys.device)
        if bool(torch.any((keep != want) & new[:, :, None])):
            _refuse_latent_cache_mask("in this one a real token's row is not the causal mask with the padded keys hidden")
        held = keys[:, :seen].sum(1).tolist()
        return False, held, None if bool(new.all()) else new

    def _forward_latent_cache(
        self, q, kv, cos, sin, cache: LatentKVCache, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, S = q.shape[:2]
        C, layer = self.kv_lora_rank, self.layer_idx
        norm = self.kv_a_layernorm
        if not is_plain(norm, RMSNorm):
            raise ValueError(
                "MultiHeadLatentAttention: with a LatentKVCache, kv_a_layernorm's weight feeds the fused "
                "mla_append_cache kernel directly, so it must be a plain RMSNorm (no hooks or wrapper, no "
                "offloading of its weight); use an HF cache for such a module"
            )
        if (cache.kv_lora_rank, cache.rope_dim) != (C, self.qk_rope_head_dim):
            # (The row width alone would pass a cache made with the two swapped.)
            raise ValueError(
                f"MultiHeadLatentAttention: the LatentKVCache was made for kv_lora_rank={cache.kv_lora_rank}, "
                f"rope_dim={cache.rope_dim}; this layer has kv_lora_rank={C}, qk_rope_head_dim="
                f"{self.qk_rope_head_dim}"
            )
        cache.reserve(layer, S)
        # Rows are stored in the cache's dtype (e.g. a bf16 cache for an fp32 model, or an fp32
        # one under autocast); cos / sin may be shared by the batch ([1, S, R]).
        dt = cache.kv[layer].dtype
        plain_kv_b = self._kv_b_plain()
        # A decode step of all new tokens: one mla_decode_absorbed call where it applies (it rotates
        # the queries itself); otherwise the queries' parts here, at their own positions.
        fused = keep is None and S <= self.decode_max_tokens and plain_kv_b and self._fused_decode_applies(q, dt)
        q_nope = q_pe = None
        if not fused:
            q_nope, q_pe = self._query_parts(q, cos, sin)
        w = _dense(norm.weight, dt)  # (a strided weight, e.g. loaded with assign=True)
        cos, sin = _dense(cos, dt, (B, S, cos.shape[-1])), _dense(sin, dt, (B, S, sin.shape[-1]))
        q_src = None
        if keep is not None:
            # Row b keeps its n_b real new tokens: moved (in order) to the front, so they land at the
            # row's next slots; its padding is written past its new length, never read there, and
            # overwritten by later tokens.
            n_keep = keep.sum(1)
            src = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
            kv, cos, sin = (t.gather(1, src[:, :, None].expand_as(t)) for t in (kv, cos, sin))
            if not bool(torch.all(keep[:, :-1] <= keep[:, 1:])):
                # Padding between real tokens (a new turn's left padding behind the previous turn's
                # last token, which is not cached yet): the kernels' causal rule counts each row's
                # queries from the end, so the real queries move (in order) behind the padding ones.
                q_src = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices
                q_nope, q_pe = (t.gather(1, q_src[:, :, None, None].expand_as(t)) for t in (q_nope, q_pe))
        # The cache's host lengths were just checked against its capacity (reserve) and its table
        # at construction: the ops need not copy them to the host again.
        # (The latents and k_pe are read in place, as the two slices of the kv_a output's rows.)
        kv = kv if kv.dtype == dt and kv.stride(-1) == 1 else kv.to(dt).contiguous()
        mla_append_cache(
            cache.kv[layer], kv[..., :C], kv[..., C:], w,
            norm.variance_epsilon, cos, sin, cache.seqlens[layer],
            block_table=cache.block_table, rope_interleave=self.rope_interleave, check_values=False,
        )
        if keep is None:
            cache.advance(layer, S)
        else:
            # The last position that is padding in some row: crop() may give back only those after
            # it (padding may sit between a row's real tokens: a continued batch's new turn).
            padded = (~keep).any(0).nonzero()
            cache.advance(layer, n_keep.tolist(), positions=S,
                          last_padding=int(padded[-1]) if padded.numel() else -1)
        # Eager: the longest row (host-known) sizes the kernel's splits. Under CUDA-graph capture
        # the replays run at later lengths than the host sees now, so the bound is the capacity
        # (splits over the whole cache; correct at every length it can hold).
        capturing = cache.kv[layer].is_cuda and torch.cuda.is_current_stream_capturing()
        if fused:
            out = self._fused_decode(
                q, cos, sin, cache.kv[layer], cache.seqlens[layer], cache.block_table,
                max_seqlen=cache.capacity if capturing else cache._row_max[layer],
            )
        elif S <= self.decode_max_tokens and plain_kv_b:
            out = self._absorbed_attention(
                q_nope, q_pe, cache.kv[layer], cache.seqlens[layer], cache.block_table,
                max_seqlen=cache.capacity if capturing else cache._row_max[layer],
            )
        elif plain_kv_b and _prefill_kernel_chosen(q_nope.device):
            out = self._prefill_attention(
                q_nope, q_pe, cache.kv[layer], cache.seqlens[layer], cache.block_table
            )
        else:  # decompressed K/V through the layer itself; each row up to its own length
            lens = cache._host_lens[layer]
            L = max(lens)
            valid = torch.tensor(lens, device=q_nope.device).view(B, 1, 1)
            # A shorter row's slots past its length hold old contents (a reset() cache, padding
            # written past a row's end): masked, but 0 x NaN in P.V would still reach the output.
            rows = cache.rows(layer, L)
            rows = torch.where(torch.arange(L, device=rows.device).view(1, L, 1) < valid.view(B, 1, 1), rows, 0)
            out = self._sdpa_attention(q_nope, q_pe, rows[..., :C], rows[..., C:], None, valid)
        if q_src is not None:  # back to the step's order
            out = torch.empty_like(out).scatter_(1, q_src[:, :, None, None].expand_as(out), out)
        if keep is not None:
            # Padding queries ran before their row's real new tokens: they see no key (the kernels
            # and SDPA give 0) or, in a row that already holds tokens, those. Nobody reads them: 0.
            out = out.masked_fill(~keep[:, :, None, None], 0)
        return project(self.o_proj, out.reshape(B, S, self.num_heads * self.v_head_dim))

    def _query_parts(self, q, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_nope [B, S, H, N], q_pe [B, S, H, R])`` of the per-head queries, ``q_pe`` rotated."""
        N = self.qk_nope_head_dim
        return q[..., :N], _rotate(q[..., N:], cos, sin, self.rope_interleave)

    def _fused_decode_applies(self, q: torch.Tensor, cache_dtype: torch.dtype) -> bool:
        """Whether a decode step's attention (kv_b_proj plain, checked by the caller) runs as one
        ``mla_decode_absorbed`` call: on a device with its kernel (CPU, CUDA), for at most 16 query
        rows, queries, cache and ``kv_b_proj.weight`` in one dtype, no gradient needed, not under
        ``torch.export``."""
        w = linear_params(self.kv_b_proj)[0]
        return (
            _has_kernel("mla_decode_absorbed", q.device) and w.device == q.device
            and q.dtype == cache_dtype == w.dtype and q.shape[0] * q.shape[1] <= MAX_ROWS
            and not (torch.is_grad_enabled() and (q.requires_grad or w.requires_grad))
            and not torch.compiler.is_exporting()
        )

    def _fused_decode(self, q, cos, sin, kv_cache, seqlens, block_table, pe_cache=None, max_seqlen=-1):
        """``[B, S, H, V]`` via ``mla_decode_absorbed``: the steps of ``_absorbed_attention`` and the
        queries' rotation in one op (on a 2-core Zen 4, the separate ops' dispatch and the Python
        between them took 0.3-0.5 ms of a 2.1-2.7 ms step at 16 heads and 4K keys)."""
        return mla_decode_absorbed(
            q.contiguous(), cos.contiguous(), sin.contiguous(), linear_params(self.kv_b_proj)[0].contiguous(), kv_cache, seqlens,
            self.scaling, self.qk_nope_head_dim, block_table=block_table, rope_interleave=self.rope_interleave,
            causal=True, pe_cache=pe_cache, max_seqlen=max_seqlen,
        )

    def _absorbed_attention(self, q_nope, q_pe, kv_cache, seqlens, block_table, pe_cache=None, max_seqlen=-1):
        """``[B, S, H, V]`` via ``mla_decode`` on the latent rows (no autograd)."""
        B, S, H, N = q_nope.shape
        w_uk, w_uv_t = self.absorbed_weights()
        dt = kv_cache.dtype
        # The two per-head products read kv_b_proj's weight in place. On the CPU without a gradient
        # (a decode step of up to 16 rows), bmm_small streams the weight views in their own dtype
        # (fp32 accumulation): at 16 heads, C = 512, fp32 from memory, 0.11 ms per product against
        # 0.18-0.21 for ATen's bmm, and bf16 weights need no fp32 copy per call (2-core Zen 4).
        # Otherwise ATen's bmm runs in the wider of the weights' and the cache's dtypes (fp32
        # weights with a bf16 cache: no converted copy of the weights per call, only of the
        # activations), on the CPU in fp32: there ATen's bf16 bmm was 12x (1 row) to 85x (64 rows)
        # slower than converting the weights per call and multiplying in fp32 (Zen 3, H = 16,
        # N = V = 128, C = 512), and fp32 on the strided views was as fast as on contiguous copies
        # up to 64 rows. Autocast is off: it would pick the dtype itself.
        # (bmm_small computes in the weights' dtype: only where the cache's is not wider, e.g. not
        # bf16 weights with an fp32 cache, whose products stay in fp32 below.)
        small = bmm_small_applies(q_nope, w_uk, B * S) and torch.promote_types(w_uk.dtype, dt) == w_uk.dtype
        if small:
            mm_dt = w_uk.dtype
        else:
            mm_dt = torch.float32 if kv_cache.device.type == "cpu" else torch.promote_types(w_uk.dtype, dt)
            if mm_dt != w_uk.dtype:
                w_uk, w_uv_t = w_uk.to(mm_dt), w_uv_t.to(mm_dt)
        mm = (lambda a, b: bmm_small(a.contiguous(), b)) if small else torch.bmm
        with autocast_off(kv_cache.device.type):
            q_heads = q_nope.permute(2, 0, 1, 3).reshape(H, B * S, N).to(mm_dt)
            q_latent = mm(q_heads, w_uk)  # [H, B*S, C]
            q_latent = q_latent.view(H, B, S, -1).permute(1, 2, 0, 3).to(dt).contiguous()
            out_latent, _ = mla_decode(
                q_latent, q_pe.to(dt).contiguous(), kv_cache, seqlens, self.scaling,
                block_table=block_table, causal=True, pe_cache=pe_cache, max_seqlen=max_seqlen,
            )
            out = mm(out_latent.permute(2, 0, 1, 3).reshape(H, B * S, -1).to(mm_dt), w_uv_t)  # [H, BS, V]
        return out.view(H, B, S, -1).permute(1, 2, 0, 3).to(q_nope.dtype)

    def _prefill_attention(self, q_nope, q_pe, kv_cache, seqlens, block_table) -> torch.Tensor:
        """``[B, S, H, V]`` via the ``mla_prefill`` kernel (differentiable for contiguous rows)."""
        dt = kv_cache.dtype
        H, N, V = self.num_heads, self.qk_nope_head_dim, self.v_head_dim
        w = self.kv_b_proj.weight.to(dt).contiguous().view(H, N + V, self.kv_lora_rank)
        out, _ = mla_prefill(
            q_nope.to(dt).contiguous(), q_pe.to(dt).contiguous(), kv_cache, seqlens,
            w[:, :N], w[:, N:], self.scaling, block_table=block_table, causal=True,
        )
        return out.to(q_nope.dtype)

    def _sdpa_attention(self, q_nope, q_pe, c_all, pe_all, mask, valid) -> torch.Tensor:
        """Differentiable path: decompress to per-head K/V, SDPA. ``[B, S, H, V]``. With no mask,
        the S queries are the last of the first ``valid`` keys (int or 0-dim tensor) of ``c_all``."""
        B, S, H, N = q_nope.shape
        L = c_all.shape[1]
        kv = self.kv_b_proj(c_all).view(B, L, H, N + self.v_head_dim)
        k = torch.cat([kv[..., :N], pe_all[:, :, None].expand(B, L, H, -1)], dim=-1).transpose(1, 2)
        v = kv[..., N:].transpose(1, 2)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        if mask is None:
            if S == L and not isinstance(valid, torch.Tensor):
                attn_mask, causal = None, True
            else:  # new tokens at positions valid-S .. valid-1 over keys 0 .. L-1
                attn_mask, causal = _causal_keep(S, L, valid, q.device), False
        else:
            attn_mask, causal = mask[..., :L], False
        out_dtype, ctx = q.dtype, contextlib.nullcontext()
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            if attn_mask.dtype == q.dtype == torch.float16:
                # HF eager's fp16 additive mask on fp16 queries: HF adds finfo(fp16).min to fp16
                # scores, where it saturates, so a fully masked (left-padding) query row gets the
                # uniform average over the keys, as in fp32. SDPA adds it in fp32, where -65504 does
                # not swamp the scores (that row would be a softmax over the masked keys; it feeds
                # HF's causal-LM loss: the last padding row predicts the first real token). So the
                # masked entries become finfo(fp32).min and SDPA runs in fp32 (below): HF's fp32
                # result, which fp16 rounds to when the scores are moderate, and no NaN where large
                # negative scores overflow HF's fp16 sum.
                attn_mask = attn_mask.float().masked_fill(
                    ~_additive_keep(attn_mask), torch.finfo(torch.float32).min)
            elif attn_mask.dtype.itemsize <= q.dtype.itemsize:
                attn_mask = attn_mask.to(q.dtype)
            if attn_mask.dtype != q.dtype:
                # A wider additive mask than q (the fp16 case above; autocast: bf16 / fp16 q, HF
                # eager's fp32 mask): HF adds it to the scores in fp32 and takes the softmax in fp32,
                # so do the same (cast to q's dtype, finfo(fp32).min would become -inf, and a fully
                # masked padding query row would give 0 where HF gives the uniform average).
                q, k, v = (t.to(attn_mask.dtype) for t in (q, k, v))
                ctx = autocast_off(q.device.type)  # (autocast would cast them back)
        dropout = self.attention_dropout if self.training else 0.0
        with ctx:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=causal, scale=self.scaling
            )
        return out.to(out_dtype).transpose(1, 2)

    @staticmethod
    def _is_plain_causal(mask: torch.Tensor | None, B: int, S: int, L: int, valid) -> bool:
        """True when ``mask`` (HF 4-D, bool keep-mask or additive float) is None or exactly the
        causal mask of S new tokens at the end of the first ``valid`` of L keys (so the kernels'
        causal rule applies with ``valid`` as each row's length)."""
        if mask is None:
            return True
        if mask.dim() != 4 or mask.shape[-2] != S or mask.shape[-1] < L:
            return False
        if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
            return False  # its values cannot be read while tracing / capturing: applied as given (SDPA)
        keep = _additive_keep(mask[..., :L])
        want = _causal_keep(S, L, valid, mask.device)
        if mask.dtype != torch.bool and torch.any(mask[..., :L][keep] != 0):
            return False  # additive biases other than 0 / -inf
        return bool(torch.equal(keep, want.expand_as(keep)))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
            f"qk_nope={self.qk_nope_head_dim}, qk_rope={self.qk_rope_head_dim}, v={self.v_head_dim}, "
            f"rope_interleave={self.rope_interleave}"
        )
