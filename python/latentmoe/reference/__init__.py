"""Pure-PyTorch ground truth for every latentmoe kernel, written for clarity, not speed.

Tests and docs use these; the library never falls back to them.
"""

from latentmoe.reference.norm import rms_norm

__all__ = ["rms_norm"]
from latentmoe.reference import moe  # noqa: E402
