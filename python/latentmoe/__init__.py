"""latentmoe: fused C++/CUDA kernels for DeepSeek-V3-style models.

* ``latentmoe.ops``       typed wrappers over ``torch.ops.latentmoe.*`` (with fake kernels and autograd)
* ``latentmoe.nn``        drop-in ``nn.Module`` layers
* ``latentmoe.reference`` pure-PyTorch ground truth (tests and docs; never used as a fallback)
* ``latentmoe.use_huge_pages`` large CPU weights onto 2 MiB pages (faster weight streaming in decode)

Importing latentmoe loads the compiled kernels; if they are missing or were built for another
torch, the import fails with instructions instead of falling back to slow code.
"""

from latentmoe import _build, _settings

_C = _build.load()

from latentmoe import ops  # noqa: E402  (registers fake kernels and autograd)
from latentmoe import nn, reference  # noqa: E402
from latentmoe._huge_pages import use_huge_pages  # noqa: E402

__version__ = "0.1.0"

# The CPU switches the kernels read without an op to name in an error (the other LATENTMOE_*
# choices raise ValueError from the op that reads them): checked here, at import and on reload.
_CPU_CHOICES = {"LATENTMOE_CPU_ISA": ("auto", "avx2", "generic"), "LATENTMOE_CPU_LOWP_GEMM": ("auto", "native", "fp32")}


def _check_cpu_settings() -> None:
    for name, allowed in _CPU_CHOICES.items():
        _settings.choice(name, allowed)


_check_cpu_settings()


def reload_settings() -> None:
    """Re-read the ``LATENTMOE_*`` environment variables (README, "Runtime knobs").

    The kernels read them once, at import (holding the GIL), and never call ``getenv`` again (it
    is not safe against another thread assigning ``os.environ`` while ops run): after changing one
    later, call this. An op running in another thread meanwhile may see the old values in some of
    its steps and the new ones in later steps (each step computed correctly, but the bits then
    match neither setting's): reload between calls where bits matter. An unknown value of
    ``LATENTMOE_CPU_ISA``, ``LATENTMOE_CPU_LOWP_GEMM`` or ``LATENTMOE_MLA_MODULE_PREFILL`` raises
    ``ValueError`` here (and at import)."""
    _check_cpu_settings()
    _settings.reload()
    _C.reload_settings()


__all__ = ["ops", "nn", "reference", "reload_settings", "use_huge_pages", "__version__"]
