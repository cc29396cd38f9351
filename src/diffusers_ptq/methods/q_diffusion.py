"""Q-Diffusion (Li et al., ICCV 2023): evenly spaced calibration steps, shortcut-split, attention quantizers.

Calibration: every 2nd step of the sampling schedule (Stable Diffusion: PLMS-50, 128 prompts; CIFAR-10:
DDIM-100 every 5th step, 256 per step); both classifier-free-guidance halves are kept. Asymmetric
BRECQ-style quantizers with the lp search; softmax kept at 16 bits (effectively float) as the released
Stable Diffusion code does; everything is quantized, conv_in/conv_out/time embedding included.

Reconstruction (BRECQ, as the released code): AdaRound block by block with activations float (20,000
iterations, batch 32, lambda 0.01, beta 20 -> 2 after a 20 % warm-up, Adam lr 1e-3), then a second pass
learning the activation step sizes LSQ-style (5,000 iterations, lr 4e-4). `reconstruction_config()` is
that recipe, shared with TFMQ-DM.
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
from diffusers_ptq.reconstruction.config import ReconstructionConfig


def reconstruction_config(**overrides: object) -> ReconstructionConfig:
    """BRECQ / Q-Diffusion block reconstruction (docs/methods.md, "Block reconstruction")."""
    values: dict[str, object] = {
        "enabled": True,
        "optimization": "sequential",
        "weight_rounding": "adaround",
        "learn_act_scales": True,
        "iterations": 20000,
        "act_iterations": 5000,
        "batch_size": 32,
        "weight_lr": 1e-3,
        "act_lr": 4e-4,
        "round_weight": 0.01,
        "beta_start": 20.0,
        "beta_end": 2.0,
        "warmup": 0.2,
        "layer_loss_weight": 0.0,
        "qdrop_prob": 0.0,
    }
    return ReconstructionConfig.from_dict({**values, **overrides})


@register_preset("q-diffusion")
def q_diffusion() -> PTQConfig:
    return PTQConfig(
        method="q-diffusion",
        # Published recipes: nearest rounding, no bias correction, no mixed precision (not the default's).
        bias_correction="off",
        weights=WeightQuantConfig(
            bits=8,
            granularity="per_channel",
            symmetric=False,
            scale_search="mse",
            lp_norm=2.4,
            num_candidates=100,
            rounding="nearest",
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
        layers=LayerSelectionConfig(
            special_layers="same", shortcut_split=True, mixed_precision=MixedPrecisionConfig(mode="off")
        ),
        reconstruction=reconstruction_config(),
    )
