"""What `reconstruct` accepts: a UNet quantized by diffusers-ptq that still holds its float weights, and a
calibration set of the same model; checked before any work."""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.primitives import fake_quantize
from diffusers_ptq.quantizers.adaround import AdaRoundQuantizer
from diffusers_ptq.reconstruction.config import ReconstructionConfig
from diffusers_ptq.reconstruction.spill import check_cache_dir


def weights_on_grid(unet: nn.Module) -> bool:
    """Whether every quantized weight already sits on its grid (float weights gone: loaded or baked)."""
    for m in unet.modules():
        if not isinstance(m, QuantLayerMixin):
            continue
        for q, part in zip(m.weight_quantizers, m._weight_parts(m.weight)):
            scale, zero_point = q.qparams(part)
            if not torch.equal(fake_quantize(part.float(), scale, zero_point, q.qmin, q.qmax), part.float()):
                return False
    return True


def check_inputs(
    unet: nn.Module, data: CalibrationSet, config: ReconstructionConfig | None
) -> ReconstructionConfig:
    """The validated config (the default one for None); raises before any work on what `reconstruct` cannot
    take: an unquantized UNet, a calibration set of another model, a UNet mid-reconstruction or without
    its float weights."""
    config = ReconstructionConfig() if config is None else config
    if not isinstance(config, ReconstructionConfig):
        raise TypeError(f"config must be a ReconstructionConfig, got {type(config).__name__}")
    config.validate()
    state = getattr(unet, "ptq_state", None)
    if state is None or not any(isinstance(m, QuantLayerMixin) for m in unet.modules()):
        raise ValueError(
            "reconstruct needs a UNet quantized by diffusers-ptq; run quantize_pipeline or quantize_unet "
            "first"
        )
    if not isinstance(data, CalibrationSet):
        raise TypeError(f"calibration_set must be a CalibrationSet, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("the calibration set is empty; record calibration samples first")
    if data.num_train_timesteps != state.context.num_train_timesteps:
        raise ValueError(
            f"the calibration set has {data.num_train_timesteps} training timesteps but the UNet was "
            f"quantized for {state.context.num_train_timesteps}; pass the calibration set of this model"
        )
    if config.cache_max_gb is not None:
        check_cache_dir(config.cache_dir)
    if any(isinstance(m, AdaRoundQuantizer) for m in unet.modules()):
        raise ValueError("the UNet is in the middle of another reconstruction")
    # GPTQ (inside the same job) leaves on-grid weights but keeps the float ones: reconstruction starts there.
    if not any("float_weight" in m.__dict__ for m in unet.modules()) and weights_on_grid(unet):
        raise ValueError(
            "every quantized weight of this UNet is already on its integer grid (a loaded checkpoint, or a "
            "model reconstructed before): reconstruction needs the float weights; quantize the float model "
            "again"
        )
    return config
