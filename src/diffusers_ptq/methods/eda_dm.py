"""EDA-DM (Liu et al.): Temporal Distribution Alignment Calibration + Fine-grained Block Reconstruction.

Calibration samples are allocated to sampling steps by the density and diversity of the mid-block
attention's input over one float pass (`calibration.selector="density_diversity"`). FBR then optimises
each block's AdaRound variables and activation step sizes jointly (cosine decay, QDrop p = 0.5) on the
block output error plus gamma = 0.8 times its inner layers' output errors, 5,000 iterations, batch 32, no
rounding regulariser (as the released code). Its learning rates are published per bit width
(`EDA_DM_FBR_LR`): the preset picks them from the final weight bits (<= 6: the W4A8 pair, else W8A8's)
unless `reconstruction.weight_lr` / `act_lr` are given explicitly.

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
    MixedPrecisionConfig,
    PTQConfig,
    SelectionConfig,
    WeightQuantConfig,
)
from diffusers_ptq.methods.registry import register_preset
from diffusers_ptq.reconstruction.config import ReconstructionConfig

# dataset -> (density radius r, diversity weight lambda, calibration samples N, feature-pass trajectories)
EDA_DM_DATASETS: dict[str, tuple[float, float, int, int]] = {
    "cifar": (3.0, 1.2, 1024, 1024),
    "imagenet": (3.0, 1.2, 1024, 1024),
    "lsun": (0.3, 1.0, 1024, 1024),
    "sd": (0.3, 5.0, 256, 8),
}


# dataset -> {weight bits of the published setting: (lr of the AdaRound variables, lr of the step sizes)}
EDA_DM_FBR_LR: dict[str, dict[int, tuple[float, float]]] = {
    "cifar": {4: (0.5, 5e-4), 8: (0.05, 1e-3)},
    "imagenet": {4: (0.5, 5e-4), 8: (0.05, 1e-3)},
    "lsun": {4: (0.5, 5e-4), 8: (0.05, 1e-3)},
    "sd": {4: (0.03, 1e-4)},
}
EDA_DM_LAYER_LOSS_WEIGHT = {"cifar": 0.8, "imagenet": 0.8, "lsun": 1.0, "sd": 0.8}


def fbr_learning_rates(dataset: str, weight_bits: int) -> tuple[float, float]:
    """EDA-DM's published (lr_w, lr_a) for `dataset` at the nearest published weight width."""
    table = EDA_DM_FBR_LR[dataset]
    published = 4 if weight_bits <= 6 and 4 in table else max(table)
    return table[published]


def eda_dm_config(dataset: str = "cifar") -> PTQConfig:
    """The EDA-DM calibration recipe with the paper's TDAC parameters for `dataset`."""
    if dataset not in EDA_DM_DATASETS:
        raise ValueError(f"dataset={dataset!r} is invalid; expected one of {sorted(EDA_DM_DATASETS)}")
    radius, weight, num_samples, feature_samples = EDA_DM_DATASETS[dataset]
    weight_lr, act_lr = fbr_learning_rates(dataset, 8)
    return PTQConfig(
        method="eda-dm",
        # Published recipes: nearest rounding, no bias correction, no mixed precision (not the default's).
        bias_correction="off",
        weights=WeightQuantConfig(
            bits=8,
            granularity="per_channel",
            symmetric=True,
            scale_search="mse",
            lp_norm=2.4,
            rounding="nearest",
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
        layers=LayerSelectionConfig(
            special_layers="8bit", shortcut_split=False, mixed_precision=MixedPrecisionConfig(mode="off")
        ),
        reconstruction=ReconstructionConfig(
            enabled=True,
            optimization="joint",
            weight_rounding="adaround",
            learn_act_scales=True,
            iterations=5000,
            batch_size=32,
            weight_lr=weight_lr,
            act_lr=act_lr,
            weight_lr_schedule="cosine",
            act_lr_schedule="cosine",
            round_weight=0.0,
            layer_loss_weight=EDA_DM_LAYER_LOSS_WEIGHT[dataset],
            qdrop_prob=0.5,
        ),
    )


def _adapt(config: PTQConfig, overrides: dict[str, object]) -> None:
    """Follow the final weight bits with the published FBR learning rates, unless set explicitly."""
    given = overrides.get("reconstruction")
    if isinstance(given, ReconstructionConfig):  # a whole section given: it is used as it is
        return
    explicit = given.keys() if isinstance(given, dict) else ()
    weight_lr, act_lr = fbr_learning_rates("cifar", config.weights.bits)
    if "weight_lr" not in explicit:
        config.reconstruction.weight_lr = weight_lr
    if "act_lr" not in explicit:
        config.reconstruction.act_lr = act_lr


@register_preset("eda-dm", adapt=_adapt)
def eda_dm() -> PTQConfig:
    return eda_dm_config("cifar")
