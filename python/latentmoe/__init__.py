"""latentmoe: fused C++/CUDA kernels for DeepSeek-V3-style models.

* ``latentmoe.ops``       typed wrappers over ``torch.ops.latentmoe.*`` (with fake kernels and autograd)
* ``latentmoe.nn``        drop-in ``nn.Module`` layers
* ``latentmoe.reference`` pure-PyTorch ground truth (tests and docs; never used as a fallback)

Importing latentmoe loads the compiled kernels; if they are missing or were built for another
torch, the import fails with instructions instead of falling back to slow code.
"""

from latentmoe import _build

_C = _build.load()

from latentmoe import ops  # noqa: E402  (registers fake kernels and autograd)
from latentmoe import nn, reference  # noqa: E402

__version__ = "0.1.0"


def reload_settings() -> None:
    """Re-read the ``LATENTMOE_*`` environment variables (README, "Settings").

    The kernels read them once, at the first op call, and never call ``getenv`` again (it is not
    safe against another thread assigning ``os.environ`` while ops run): after changing one later,
    call this. Ops already running finish with the values they started with."""
    _C.reload_settings()


__all__ = ["ops", "nn", "reference", "reload_settings", "__version__"]
