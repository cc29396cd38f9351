"""PTQ4DM (Shang et al., CVPR 2023): normally distributed timestep calibration, no reconstruction.

Paper form (default): calibration timesteps from a skew-normal whose mass lies below T/2 (mean 0.4 T,
skewness -2 toward the image end). The std is 0.4 T like the released code: read literally, the paper's
std of sqrt(T/2) timesteps (22 at T = 1000) would put every sample within a few steps of t = 0.4 T; set
`calibration.std` to reproduce that reading.
Released-code form: `calibration.sampler="normal"`, mean 0.4, std 0.4 (fractions of T).
QDrop-style quantizers: symmetric per-channel weights, symmetric per-tensor activations, 100-point
lp search with p = 2.4, first and last layers at 8 bits.
"""

from diffusers_ptq.config import (
    ActivationQuantConfig,
    CalibrationConfig,
    LayerSelectionConfig,
    MixedPrecisionConfig,
    PTQConfig,
    WeightQuantConfig,
)
from diffusers_ptq.methods.registry import register_preset


@register_preset("ptq4dm")
def ptq4dm() -> PTQConfig:
    return PTQConfig(
        method="ptq4dm",
        # Published recipes: nearest rounding, no bias correction, no mixed precision (not the default's).
        bias_correction="off",
        weights=WeightQuantConfig(
            bits=8,
            granularity="per_channel",
            symmetric=True,
            scale_search="mse",
            lp_norm=2.4,
            num_candidates=100,
            rounding="nearest",
        ),
        activations=ActivationQuantConfig(
            bits=8, symmetric=True, scale_search="mse", lp_norm=2.4, num_candidates=100, timestep_groups=1
        ),
        # Paper: N = 1,024 samples; mean below T/2 with the tail toward the image end (t -> 0).
        calibration=CalibrationConfig(
            sampler="skew_normal", num_samples=1024, mean=0.4, std=0.4, skewness=-2.0
        ),
        layers=LayerSelectionConfig(
            special_layers="8bit", shortcut_split=False, mixed_precision=MixedPrecisionConfig(mode="off")
        ),
    )
