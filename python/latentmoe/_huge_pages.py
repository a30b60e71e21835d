"""``latentmoe.use_huge_pages``: move large CPU weights onto 2 MiB transparent huge pages."""

from __future__ import annotations

import errno
from collections.abc import Iterable

import torch

from latentmoe import _C

_HUGE = 2 << 20


def _tensors(obj) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [("tensor", obj)]
    if isinstance(obj, torch.nn.Module):
        named = list(obj.named_parameters()) + list(obj.named_buffers())
        return [(name, t) for name, t in named if t is not None]
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        out = []
        for i, t in enumerate(obj):
            if isinstance(t, torch.Tensor):
                out.append((f"tensor {i}", t))
            elif isinstance(t, torch.nn.Module):
                out += [(f"item {i}: {name}", p) for name, p in _tensors(t)]
            else:
                raise TypeError(f"use_huge_pages: 'obj' item {i} is a {type(t).__name__}, not a tensor or "
                                "an nn.Module")
        return out
    raise TypeError(f"use_huge_pages: 'obj' must be a tensor, an nn.Module or an iterable of them, "
                    f"got {type(obj).__name__}")


def use_huge_pages(obj, *, min_bytes: int = _HUGE, strict: bool = True) -> int:
    """Back the large CPU tensors of ``obj`` with 2 MiB transparent huge pages, in place.

    ``obj``: a tensor, an ``nn.Module`` (its parameters and buffers) or an iterable of them.
    Every CPU tensor whose storage holds at least ``min_bytes`` bytes (default 2 MiB) gets
    ``madvise(MADV_COLLAPSE)`` on the 2 MiB-aligned part of its storage: Linux copies those pages
    into huge pages. Values, addresses, strides and ``requires_grad`` stay as they are (nothing is
    written through the tensor; autograd and optimizers are unaffected). Other devices and smaller
    tensors are left alone; a storage shared by several tensors is collapsed once.

    Why: a single token's decode streams each weight once from memory, and on 4 KiB pages every
    page costs a TLB miss and restarts the hardware prefetcher. With the experts' weights on huge
    pages, ``moe_experts`` at T = 1 (HF layout, top-6 of 64, h1024 / i704, 2-core Zen 4) took
    0.80-0.99x the time in fp32 and 0.92-0.99x in bf16 (timed in alternation; the gain grows with
    the memory's free bandwidth; bench_moe's ``hugepages_speedup_vs_default`` row), and a 4K-context
    fp32 ``MultiHeadLatentAttention`` decode step (52 MiB of weights) 0.95-0.97x. On a 2-core Zen 1
    (AVX2 only, 8 MiB L3) the same ``moe_experts`` rows gave no reliable gain (0.97-1.12x the time
    in fp32 over three runs, 0.95x in bf16 in one): the gain depends on the CPU; measure before
    relying on it.
    ``moe_pack_experts`` already places its panels on huge pages.
    Weights allocated later (``.to()``, a new ``load_state_dict`` into fresh tensors) need another
    call; ``load_state_dict`` into the existing parameters keeps them.

    Cost: about 1-3 ms per MiB, once. Returns the bytes now on huge pages (the aligned parts).
    Raises ``RuntimeError`` naming the tensor where the kernel refuses (Linux before 6.1 has no
    ``MADV_COLLAPSE``; THP set to ``never``; no huge page free), or with ``strict=False`` skips it
    and counts only the ranges that succeeded. ``ValueError`` for a negative ``min_bytes``.
    """
    if min_bytes < 0:
        raise ValueError(f"use_huge_pages: 'min_bytes' must be >= 0, got {min_bytes}")
    done, total = set(), 0
    for name, t in _tensors(obj):
        if t.device.type != "cpu" or t.is_sparse or t.layout != torch.strided:
            continue
        storage = t.untyped_storage()
        address, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes < max(min_bytes, 1) or address in done:
            continue
        done.add(address)
        try:
            total += _C.collapse_huge_pages(address, nbytes)
        except OSError as e:
            if strict:
                reasons = {errno.EINVAL: "this kernel has no MADV_COLLAPSE (Linux >= 6.1) or THP is off "
                                         "(/sys/kernel/mm/transparent_hugepage/enabled)",
                           errno.ENOMEM: "no huge page could be allocated",
                           errno.EAGAIN: "the pages could not be collapsed now (try again)"}
                why = reasons.get(e.errno, e.strerror)
                raise RuntimeError(f"use_huge_pages: {name} ({nbytes} bytes): madvise(MADV_COLLAPSE) failed: "
                                   f"{why} (errno {e.errno}); strict=False skips such tensors") from e
    return total
