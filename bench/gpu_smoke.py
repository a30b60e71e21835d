"""Call every CUDA op once on small, odd-sized inputs (for compute-sanitizer in bench/gpu_check.sh).

Exits non-zero if an op raises; memory errors are compute-sanitizer's to report.
"""

from __future__ import annotations

import sys

import torch

import latentmoe


def smoke_norm(dev: str) -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(37, 129, device=dev, dtype=dtype, requires_grad=True)
        r = torch.randn_like(x)
        w = torch.randn(129, device=dev, dtype=dtype, requires_grad=True)
        latentmoe.ops.rms_norm(x, w).sum().backward()
        out, h = latentmoe.ops.add_rms_norm(x, r, w)
        (out.sum() + h.sum()).backward()


def smoke_mla(dev: str) -> None:
    B, H, C, R, page = 3, 9, 48, 16, 17
    seqlens = torch.tensor([0, 5, 40], dtype=torch.int32, device=dev)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for paged in (False, True):
            if paged:
                n_pages = 3 * 3 + 2
                cache = torch.randn(n_pages, page, C + R, device=dev, dtype=dtype)
                table = torch.randperm(n_pages, device=dev)[:9].view(3, 3).to(torch.int32)
            else:
                cache = torch.randn(B, 48, C + R, device=dev, dtype=dtype)
                table = None
            for Sq in (1, 2):
                q = torch.randn(B, Sq, H, C, device=dev, dtype=dtype)
                qp = torch.randn(B, Sq, H, R, device=dev, dtype=dtype)
                latentmoe.ops.mla_decode(q, qp, cache, seqlens, 0.1, block_table=table, causal=True)
                latentmoe.ops.mla_decode(q, qp, cache, seqlens, 0.1, block_table=table, window=4)
            S = 3
            lat = torch.randn(B, S, C, device=dev, dtype=dtype)
            kpe = torch.randn(B, S, R, device=dev, dtype=dtype)
            cos, sin = torch.randn(B, S, R, device=dev, dtype=dtype), torch.randn(B, S, R, device=dev, dtype=dtype)
            w = torch.randn(C, device=dev, dtype=dtype)
            latentmoe.ops.mla_append_cache(cache, lat, kpe, w, 1e-6, cos, sin, seqlens, table, True)


def smoke_moe(dev: str) -> None:
    T, E, k, hidden, inter = 37, 16, 3, 72, 40
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(T, E, device=dev, requires_grad=True)
        bias = torch.randn(E, device=dev)
        w, idx = latentmoe.ops.moe_route(logits, k, n_group=4, topk_group=2, e_score_correction_bias=bias,
                                         routed_scaling_factor=2.5)[:2]
        w.sum().backward()
        x = torch.randn(T, hidden, device=dev, dtype=dtype, requires_grad=True)
        gu = (torch.randn(E, 2 * inter, hidden, device=dev) * 0.1).to(dtype).requires_grad_()
        dn = (torch.randn(E, hidden, inter, device=dev) * 0.1).to(dtype).requires_grad_()
        out = latentmoe.ops.moe_experts(x, gu, dn, w.detach().requires_grad_(), idx)
        out.float().sum().backward()


SMOKES = [smoke_norm, smoke_mla, smoke_moe]


def main() -> int:
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu" checks the script itself
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device")
        return 2
    for fn in SMOKES:
        fn(dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        print(f"gpu_smoke: {fn.__name__} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
