"""The DDPMs shipped in the package (Fashion-MNIST; colour Fashion-MNIST): architectures, and offline loading
as DDPM/DDIM pipelines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

ASSETS_DIR = Path(__file__).parent / "assets"
FASHION_DDPM_DIR = ASSETS_DIR / "fashion_ddpm"
# Stable Diffusion 1.5's public UNet config (shapes only, no weights): checkpoint-size and speed measurements
# build a random-weight UNet of the real size from it.
SD15_UNET_CONFIG_FILE = ASSETS_DIR / "sd15_unet" / "config.json"

# Cheap at full resolution (16 channels at 32x32), parameters at the low resolutions: training costs
# ~250 MFLOP per image, which is what makes CPU training in tens of minutes possible. One attention
# block (8x8) and the up blocks' skip concatenations exercise attention and shortcut-split quantization.
FASHION_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (16, 32, 64, 128),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}
FASHION_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}
SCHEDULERS = ("ddim", "ddpm")

# The second benchmark model differs from the first where quantization cares: 3-channel colour input and
# output at 16x16, three levels of (32, 64, 64) channels with attention only at the lowest (4x4) level and
# four heads, a cosine (squaredcos_cap_v2) noise schedule and v-prediction instead of a linear schedule and
# epsilon-prediction. Trained by `benchmarks/train_colour_ddpm.py` on colourised Fashion-MNIST.
COLOUR_DDPM_DIR = ASSETS_DIR / "colour_ddpm"
COLOUR_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 16,
}
COLOUR_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": True,
}


def sd15_unet_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's UNet config as `UNet2DConditionModel.from_config` takes it."""
    config = json.loads(SD15_UNET_CONFIG_FILE.read_text())
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    return config


def new_fashion_unet() -> UNet2DModel:
    """The untrained architecture (what the training script starts from)."""
    return UNet2DModel(**FASHION_UNET_CONFIG)


def new_colour_unet() -> UNet2DModel:
    """The second model's untrained architecture."""
    return UNet2DModel(**COLOUR_UNET_CONFIG)


def _require_weights(directory: Path = FASHION_DDPM_DIR, script: str = "train_fashion_ddpm.py") -> None:
    if not (directory / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(
            f"The DDPM weights are missing from {directory}; reinstall diffusers-ptq "
            f"or re-create them with `python benchmarks/{script}`."
        )


def _pipeline(directory: Path, unet: UNet2DModel, scheduler: str) -> DDIMPipeline | DDPMPipeline:
    ddpm = DDPMScheduler.from_pretrained(directory, subfolder="scheduler")
    if scheduler == "ddpm":
        return DDPMPipeline(unet=unet, scheduler=ddpm)
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(ddpm.config))


def fashion_ddpm_unet(dtype: torch.dtype = torch.float32) -> UNet2DModel:
    """The trained UNet2DModel, loaded offline from the package's safetensors weights."""
    _require_weights()
    return UNet2DModel.from_pretrained(FASHION_DDPM_DIR, subfolder="unet", torch_dtype=dtype)


def fashion_ddpm_pipeline(
    scheduler: str = "ddim", dtype: torch.dtype = torch.float32
) -> DDIMPipeline | DDPMPipeline:
    """The trained model as a `DDIMPipeline` (default) or `DDPMPipeline`, offline.

    Both share the training scheduler's betas; DDIM uses `eta=0` unless the call says otherwise.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not valid; choose one of {list(SCHEDULERS)}")
    return _pipeline(FASHION_DDPM_DIR, fashion_ddpm_unet(dtype), scheduler)


def colour_ddpm_unet(dtype: torch.dtype = torch.float32) -> UNet2DModel:
    """The second model's trained UNet2DModel (16x16 RGB, v-prediction), loaded offline."""
    _require_weights(COLOUR_DDPM_DIR, "train_colour_ddpm.py")
    return UNet2DModel.from_pretrained(COLOUR_DDPM_DIR, subfolder="unet", torch_dtype=dtype)


def colour_ddpm_pipeline(
    scheduler: str = "ddim", dtype: torch.dtype = torch.float32
) -> DDIMPipeline | DDPMPipeline:
    """The colour Fashion-MNIST model as a `DDIMPipeline` (default) or `DDPMPipeline`, offline.

    Its schedulers carry `prediction_type="v_prediction"` and the cosine betas, so both samplers convert the
    UNet's v output themselves.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not valid; choose one of {list(SCHEDULERS)}")
    return _pipeline(COLOUR_DDPM_DIR, colour_ddpm_unet(dtype), scheduler)
