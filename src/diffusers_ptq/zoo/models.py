"""The Fashion-MNIST DDPM shipped in the package: architecture, and offline loading as DDPM/DDIM pipelines."""

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


def sd15_unet_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's UNet config as `UNet2DConditionModel.from_config` takes it."""
    config = json.loads(SD15_UNET_CONFIG_FILE.read_text())
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    return config


def new_fashion_unet() -> UNet2DModel:
    """The untrained architecture (what the training script starts from)."""
    return UNet2DModel(**FASHION_UNET_CONFIG)


def _require_weights() -> None:
    if not (FASHION_DDPM_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(
            f"The Fashion-MNIST DDPM weights are missing from {FASHION_DDPM_DIR}; reinstall diffusers-ptq "
            "or re-create them with `python benchmarks/train_fashion_ddpm.py`."
        )


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
    unet = fashion_ddpm_unet(dtype)
    ddpm = DDPMScheduler.from_pretrained(FASHION_DDPM_DIR, subfolder="scheduler")
    if scheduler == "ddpm":
        return DDPMPipeline(unet=unet, scheduler=ddpm)
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(ddpm.config))
