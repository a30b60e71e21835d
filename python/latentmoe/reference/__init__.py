"""Pure-PyTorch ground truth for every latentmoe kernel, written for clarity, not speed.

Tests and docs use these; the library never falls back to them.
"""

from latentmoe.reference.norm import rms_norm

__all__ = ["rms_norm"]

from latentmoe.reference.tome import (  # noqa: E402
    MergePlan,
    alternate_partition,
    bipartite_soft_matching,
    causal_adjacent_matching,
    merge_tokens,
    proportional_attention_bias,
    random2d_partition,
    random2d_soft_matching,
    unmerge_tokens,
)

__all__ += [
    "MergePlan",
    "alternate_partition",
    "bipartite_soft_matching",
    "causal_adjacent_matching",
    "merge_tokens",
    "proportional_attention_bias",
    "random2d_partition",
    "random2d_soft_matching",
    "unmerge_tokens",
]

from latentmoe.reference.hybrid import (  # noqa: E402
    layer_types,
    layer_window,
    window_mask,
    windowed_attention,
)

__all__ += ["layer_types", "layer_window", "window_mask", "windowed_attention"]
