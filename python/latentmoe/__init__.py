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

__all__ = ["ops", "nn", "reference", "__version__"]
