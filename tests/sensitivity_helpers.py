"""A layer of a tiny UNet made deliberately sensitive to 4-bit weights, for tests of sensitivity rankings."""

from __future__ import annotations

import torch

SENSITIVE = "down_blocks.1.resnets.0.conv1"


def make_sensitive(unet: torch.nn.Module, name: str = SENSITIVE, factor: float = 40.0) -> None:
    """One outlier weight per output channel: its 4-bit grid becomes so coarse that the rest round to zero.

    The rest are made positive, so what rounding removes is a systematic shift (bias), not only noise.
    Per-channel weight scales make the outlier coarsen the whole row (group scales: one group of it).
    """
    with torch.no_grad():
        weight = unet.get_submodule(name).weight
        flat = weight.view(weight.shape[0], -1)
        flat.abs_()
        flat[:, 0] = flat.amax(dim=1) * factor
