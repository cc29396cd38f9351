"""Q-Diffusion (Li et al., ICCV 2023): evenly spaced calibration steps, shortcut-split, attention quantizers.

Calibration: every 2nd step of the sampling schedule (Stable Diffusion: PLMS-50, 128 prompts; CIFAR-10:
DDIM-100 every 5th step, 256 per step); both classifier-free-guidance halves are kept. Asymmetric
BRECQ-style quantizers with the lp search; softmax kept at 16 bits (effectively float) as the released
Stable Diffusion code does; everything is quantized, conv_in/conv_out/time embedding included.
"""

from diffusers_ptq.config import (
    ActivationQuantConfig,
    CalibrationConfig,
    LayerSelectionConfig,
    PTQConfig,
    WeightQuantConfig,
)
from diffusers_ptq.methods.registry import register_preset


@register_preset("q-diffusion")
def q_diffusion() -> PTQConfig:
    return PTQConfig(
        method="q-diffusion",
        weights=WeightQuantConfig(
            bits=8,
            granularity="per_channel",
            symmetric=False,
            scale_search="mse",
            lp_norm=2.4,
            num_candidates=100,
        ),
        activations=ActivationQuantConfig(
            bits=8,
            symmetric=False,
            scale_search="mse",
            lp_norm=2.4,
            num_candidates=100,
            timestep_groups=1,
            quantize_attention=True,
            softmax_bits=16,
        ),
        calibration=CalibrationConfig(sampler="uniform", step_interval=2, num_samples=128 * 25),
        layers=LayerSelectionConfig(special_layers="same", shortcut_split=True),
    )
