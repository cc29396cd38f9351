"""APQ-DM (Wang et al., CVPR 2024): distribution-aware timestep groups, group search, active selection.

- Groups: G = 8 per-tensor (scale, zero-point) sets per activation quantizer (the paper's form; the released
  code mixes per-channel sets on ResNet convs only, which integer kernels cannot run).
- Group search (Eq. 6-7): softmax-mixed candidates, loss ||eps - eps_q(x_t, t)||^2 on forward-diffused
  images from the float pipeline (text-to-image: float-UNet targets on captured x_t) + lambda * entropy,
  lambda = 0.8 (code: 1.0); 10 epochs, batch 64, lr 5e-3 (8-bit) / 3e-3 (6-bit) cosine-decayed to 1e-5,
  1,024 images; afterwards g(t) = argmax.
- Active selection (Eq. 12): rounds of 16 samples at t* = argmax H(sigma_t) + eta / (N_t + 1), eta = 1.5.
  Released-code form: `selection={"active_score": "code", "active_eta": 2.0, "active_exclude_noisiest": 30}`.
- Not stated by the paper, chosen here: 1,024 calibration samples (as its image count), asymmetric
  activations (a zero-point per group), per-channel weights with the lp (p = 2.4) search, first/last
  layers at 8 bits, group search starting from k-means of the per-step activation ranges.
"""

from diffusers_ptq.config import (
    ActivationQuantConfig,
    CalibrationConfig,
    GroupSearchConfig,
    LayerSelectionConfig,
    MixedPrecisionConfig,
    PTQConfig,
    SelectionConfig,
    WeightQuantConfig,
)
from diffusers_ptq.methods.registry import register_preset


@register_preset("apq-dm")
def apq_dm() -> PTQConfig:
    return PTQConfig(
        method="apq-dm",
        # Published recipes: nearest rounding, no bias correction, no mixed precision (not the default's).
        bias_correction="off",
        weights=WeightQuantConfig(
            bits=8,
            granularity="per_channel",
            symmetric=False,
            scale_search="mse",
            lp_norm=2.4,
            rounding="nearest",
        ),
        activations=ActivationQuantConfig(bits=8, symmetric=False, scale_search="mse", timestep_groups=8),
        calibration=CalibrationConfig(selector="active", num_samples=1024),
        selection=SelectionConfig(
            active_round_size=16, active_score="paper", active_eta=1.5, active_exclude_noisiest=0
        ),
        group_search=GroupSearchConfig(
            enabled=True,
            init="ranges",
            init_logit=1.0,
            target="auto",
            num_images=1024,
            epochs=10,
            batch_size=64,
            lr=None,
            lr_min=1e-5,
            entropy_weight=0.8,
        ),
        layers=LayerSelectionConfig(special_layers="8bit", mixed_precision=MixedPrecisionConfig(mode="off")),
    )
