"""EDA-DM (Liu et al.): Temporal Distribution Alignment Calibration (TDAC) only.

Calibration samples are allocated to sampling steps by the density and diversity of the mid-block
attention's input over one float pass (`calibration.selector="density_diversity"`). EDA-DM's
fine-grained block reconstruction (FBR) is NOT applied by this preset yet: it is a separate part, so
results of this preset measure the sample selection alone.

TDAC parameters per dataset (paper): `EDA_DM_DATASETS`; the registered preset uses CIFAR/ImageNet's.
`eda_dm_config("sd")` gives the Stable Diffusion values (r = 0.3, lambda = 5.0, N = 256, features from a
batch of 8 prompts). Quantizers as in the QDrop-based release: symmetric per-channel weights and
per-tensor activations with one static scale for all timesteps, lp (p = 2.4) search, first/last layers
and the softmax at 8 bits.
"""

from __future__ import annotations

from diffusers_ptq.config import (
    ActivationQuantConfig,
    CalibrationConfig,
    LayerSelectionConfig,
    PTQConfig,
    SelectionConfig,
    WeightQuantConfig,
)
from diffusers_ptq.methods.registry import register_preset

# dataset -> (density radius r, diversity weight lambda, calibration samples N, feature-pass trajectories)
EDA_DM_DATASETS: dict[str, tuple[float, float, int, int]] = {
    "cifar": (3.0, 1.2, 1024, 1024),
    "imagenet": (3.0, 1.2, 1024, 1024),
    "lsun": (0.3, 1.0, 1024, 1024),
    "sd": (0.3, 5.0, 256, 8),
}


def eda_dm_config(dataset: str = "cifar") -> PTQConfig:
    """The EDA-DM calibration recipe with the paper's TDAC parameters for `dataset`."""
    if dataset not in EDA_DM_DATASETS:
        raise ValueError(f"dataset={dataset!r} is invalid; expected one of {sorted(EDA_DM_DATASETS)}")
    radius, weight, num_samples, feature_samples = EDA_DM_DATASETS[dataset]
    return PTQConfig(
        method="eda-dm",
        weights=WeightQuantConfig(
            bits=8, granularity="per_channel", symmetric=True, scale_search="mse", lp_norm=2.4
        ),
        activations=ActivationQuantConfig(
            bits=8, symmetric=True, scale_search="mse", timestep_groups=1, softmax_bits=8
        ),
        calibration=CalibrationConfig(selector="density_diversity", num_samples=num_samples),
        selection=SelectionConfig(
            feature_module="mid_block.attentions.0",
            feature_samples=feature_samples,
            density_radius=radius,
            diversity_weight=weight,
        ),
        layers=LayerSelectionConfig(special_layers="8bit", shortcut_split=False),
    )


@register_preset("eda-dm")
def eda_dm() -> PTQConfig:
    return eda_dm_config("cifar")
