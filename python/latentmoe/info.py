"""``python -m latentmoe.info``: what was built, for which torch and CUDA, and which ops have
kernels for which dispatch keys."""

from __future__ import annotations

import torch

_KEYS = ("CPU", "CUDA", "Meta", "Autograd")


# Ops with CPU kernels only, by design: the prepacked experts' panels are laid out for the CPU's
# register tiles (vdpbf16ps for bf16, 16-lane FMAs for fp32; on CUDA, moe_experts reads HF's
# layout on tensor cores), and bmm_small streams strided weight views where a CPU BLAS bmm with one
# row runs well below the memory's rate (on CUDA the module calls torch.bmm: cuBLAS), and
# mla_decode_absorbed fuses mla_decode with two bmm_small products to save the CPU's per-op dispatch
# in a decode step (on CUDA the module calls mla_decode between two torch.bmm), and linear_f32 is
# the CPU's own fp32 GEMM where ATen's runs below the FMA rate (on CUDA: cuBLAS). Their
# wrappers reject CUDA tensors with a clear error.
CPU_ONLY_OPS = frozenset({"moe_pack_weight", "moe_experts_packed", "bmm_small", "linear_f32"})


def ops() -> list[str]:
    """Names of all ops in the ``latentmoe`` namespace, sorted."""
    names = [s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("latentmoe::")]
    return sorted({n.split("::", 1)[1] for n in names})


def kernels(op: str) -> list[str]:
    """Dispatch keys with a kernel registered for ``latentmoe::<op>``."""
    name = f"latentmoe::{op}"
    return [k for k in _KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]


def report() -> str:
    import latentmoe

    C = latentmoe._C
    lines = [
        f"latentmoe {latentmoe.__version__}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}); built against torch {C.torch_version}",
        f"CUDA kernels compiled: {'yes' if C.with_cuda else 'no'}"
        + (f" (archs {C.cuda_archs}, nvcc {C.cuda_version})" if C.with_cuda else ""),
        f"GPU visible: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        "ops:",
    ]
    width = max((len(o) for o in ops()), default=0)
    for op in ops():
        lines.append(f"  {op:<{width}}  {' '.join(kernels(op))}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
