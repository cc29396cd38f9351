"""Searches over an installed quantized UNet that optimise end to end, through the whole network.

APQ-DM's timestep-group search lives here rather than in reconstruction/: it optimises the noise-prediction
loss of the whole UNet (not a block's output), it runs interleaved with calibration capture (active
selection reads its entropies between rounds), and it changes quantizer assignments, not weights.
"""

from diffusers_ptq.search.group_search import GroupSearch, default_lr
from diffusers_ptq.search.soft_groups import SoftGroupMixer
from diffusers_ptq.search.targets import FloatTargets, NoiseTargets, resolve_target, sample_clean_images

__all__ = [
    "FloatTargets",
    "GroupSearch",
    "NoiseTargets",
    "SoftGroupMixer",
    "default_lr",
    "resolve_target",
    "sample_clean_images",
]
