"""Call every CUDA op once on small, odd-sized inputs (for compute-sanitizer in bench/gpu_check.sh).

Exits non-zero if an op raises; memory errors are compute-sanitizer's to report.
"""

from __future__ import annotations

import sys

import os

import torch

import latentmoe

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import bench_mla, bench_moe  # noqa: E402
from bench.common import env_setting  # noqa: E402  (their smoke() call every MLA / MoE op once)


def smoke_norm(dev: str) -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(37, 129, device=dev, dtype=dtype, requires_grad=True)
        r = torch.randn_like(x)
        w = torch.randn(129, device=dev, dtype=dtype, requires_grad=True)
        latentmoe.ops.rms_norm(x, w).sum().backward()
        out, h = latentmoe.ops.add_rms_norm(x, r, w)
        (out.sum() + h.sum()).backward()


def smoke_mla_prefill(dev: str) -> None:
    B, S, H, Dn, Dv, C, R, page = 3, 5, 3, 24, 20, 48, 16, 17
    lens = torch.tensor([0, 5, 40], dtype=torch.int32, device=dev)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for paged in (False, True):
            if paged:
                cache = torch.randn(3 * B + 1, page, C + R, device=dev, dtype=dtype)
                table = torch.randperm(3 * B + 1, device=dev)[: 3 * B].view(B, 3).to(torch.int32)
            else:
                cache = torch.randn(B, 45, C + R, device=dev, dtype=dtype)
                table = None
            cache.requires_grad_()
            q_nope = torch.randn(B, S, H, Dn, device=dev, dtype=dtype, requires_grad=True)
            q_pe = torch.randn(B, S, H, R, device=dev, dtype=dtype, requires_grad=True)
            w = (torch.randn(H, Dn + Dv, C, device=dev) * 0.1).to(dtype).requires_grad_()
            # bf16 / fp16: the default absorbed path (through mla_decode), then the kernel forced.
            for path in ("auto",) if dtype == torch.float32 else ("auto", "kernel"):
                with env_setting("LATENTMOE_MLA_PREFILL_FORWARD", path):
                    out, lse = latentmoe.ops.mla_prefill(q_nope, q_pe, cache, lens, w[:, :Dn], w[:, Dn:], 0.1,
                                                         block_table=table)
                    (out.float().sum() + lse[lse.isfinite()].sum()).backward()


SMOKES = [smoke_norm, bench_mla.smoke, smoke_mla_prefill, bench_moe.smoke]


def main() -> int:
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu" checks the script itself
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device")
        return 2
    for fn in SMOKES:
        fn(dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        print(f"gpu_smoke: {fn.__module__}.{fn.__name__} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
