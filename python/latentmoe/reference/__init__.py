"""Pure-PyTorch ground truth for every latentmoe kernel, written for clarity, not speed.

Tests and docs use these; the library never falls back to them. One submodule per family:
``norm``, ``mla``, ``moe``, ``tome`` (token merging), ``hybrid`` (windowed/global attention).
"""

from latentmoe.reference import hybrid, mla, moe, tome  # noqa: F401
from latentmoe.reference.norm import rms_norm

__all__ = ["rms_norm", "hybrid", "mla", "moe", "norm", "tome"]
