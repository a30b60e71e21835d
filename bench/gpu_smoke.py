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


SMOKES = [smoke_norm]


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device")
        return 2
    for fn in SMOKES:
        fn("cuda")
        torch.cuda.synchronize()
        print(f"gpu_smoke: {fn.__name__} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
