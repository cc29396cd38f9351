"""Tiny offline variants of the Stable Diffusion pipelines: img2img, inpainting, ControlNet, SDXL img2img,
LCM and v-prediction, plus matching tiny conditioning images.

Built from the tiny SD / SDXL components of `diffusers_ptq.tiny`, so tests and examples exercise every
calibration path (truncated schedules, 9-channel UNets, ControlNet residuals, `timestep_cond`) in seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusers_ptq.tiny import (
    _SD_SCHEDULE,
    _sd_scheduler,
    _seeded,
    tiny_sd_pipeline,
    tiny_sd_unet,
    tiny_sdxl_pipeline,
)

__all__ = [
    "tiny_controlnet_pipeline",
    "tiny_depth2img_pipeline",
    "tiny_image",
    "tiny_inpaint_pipeline",
    "tiny_lcm_pipeline",
    "tiny_sample_prediction_pipeline",
    "tiny_sd_img2img_pipeline",
    "tiny_sdxl_img2img_pipeline",
    "tiny_upscale_pipeline",
    "tiny_v_prediction_pipeline",
]

IMAGE_SIZE = 32  # the tiny VAE decodes 16x16 latents to 32x32 images


def tiny_image(seed: int = 0, kind: str = "rgb") -> Image.Image:
    """A 32x32 PIL image: smooth colour gradients ('rgb') or a rectangle mask ('mask', white = repaint)."""
    if kind == "mask":
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        mask[8:24, 4 + seed % 8 : 20 + seed % 8] = 255
        return Image.fromarray(mask, mode="L").convert("RGB")
    gen = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    phases = gen.uniform(0, 2 * np.pi, size=3)
    rgb = np.stack([0.5 + 0.5 * np.sin(4 * x + 3 * y + p) for p in phases], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8), mode="RGB")


def _sd_components(seed: int, **unet_overrides: Any) -> dict[str, Any]:
    components = tiny_sd_pipeline(seed).components
    if unet_overrides:
        components["unet"] = tiny_sd_unet(seed, **unet_overrides)
    return components


def tiny_sd_img2img_pipeline(seed: int = 0) -> Any:
    """StableDiffusionImg2ImgPipeline on the tiny SD components."""
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**_sd_components(seed), requires_safety_checker=False)


def tiny_inpaint_pipeline(seed: int = 0) -> Any:
    """StableDiffusionInpaintPipeline with a 9-channel UNet (latents, mask, masked-image latents)."""
    from diffusers import StableDiffusionInpaintPipeline

    components = _sd_components(seed, in_channels=9)
    return StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)


def tiny_controlnet_pipeline(seed: int = 0, residual_scale: float = 3.0) -> Any:
    """StableDiffusionControlNetPipeline with a ControlNetModel made from the tiny UNet.

    A trained ControlNet's zero convolutions are not zero; here they get random weights of std
    `residual_scale`, so the residuals the UNet receives are larger than its own activations (a calibration
    that leaves them out sets ranges that clip them).
    """
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    components = _sd_components(seed)

    def build() -> ControlNetModel:
        # One stride-2 stage in the conditioning embedding: 32x32 control images -> 16x16 latents.
        net = ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(8, 16))
        zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block]
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=residual_scale)
            torch.nn.init.zeros_(conv.bias)
        torch.nn.init.normal_(net.controlnet_cond_embedding.conv_out.weight, std=residual_scale)
        return net

    controlnet = _seeded(seed + 4, build)
    return StableDiffusionControlNetPipeline(
        **components, controlnet=controlnet, requires_safety_checker=False
    )


def tiny_sdxl_img2img_pipeline(seed: int = 0) -> Any:
    """StableDiffusionXLImg2ImgPipeline on the tiny SDXL components (text/time micro-conditioning)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    components = tiny_sdxl_pipeline(seed).components
    components.pop("image_encoder", None)
    components.pop("feature_extractor", None)
    return StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=False)


def tiny_lcm_pipeline(seed: int = 0) -> Any:
    """LatentConsistencyModelPipeline: LCMScheduler and a UNet with a guidance embedding (`timestep_cond`)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    components = _sd_components(seed, time_cond_proj_dim=16)
    components["scheduler"] = LCMScheduler(**_SD_SCHEDULE)
    components.pop("image_encoder", None)
    return LatentConsistencyModelPipeline(**components, requires_safety_checker=False)


def tiny_v_prediction_pipeline(seed: int = 0) -> Any:
    """The tiny SD pipeline with a v-prediction scheduler (as SD 2.x 768)."""
    pipe = tiny_sd_pipeline(seed)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return pipe


def tiny_upscale_pipeline(seed: int = 0) -> Any:
    """StableDiffusionUpscalePipeline (as SD x4 upscaler): a 7-channel UNet (latents and the low-resolution
    image) with the noise level as `class_labels`; 16x16 inputs upscale to 32x32."""
    from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline

    components = _sd_components(seed, in_channels=7, num_class_embeds=1000)
    vae = components["vae"]
    vae.register_to_config(scaling_factor=0.08333)  # the upscaler's own VAE scaling
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000),
        scheduler=_sd_scheduler("ddim"),
        max_noise_level=350,
    )


def tiny_depth2img_pipeline(seed: int = 0) -> Any:
    """StableDiffusionDepth2ImgPipeline (as SD 2 depth): a 5-channel UNet (latents and the depth map).
    No depth estimator is built: call it with `depth_map=`, which the pipeline then uses as given."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    components = _sd_components(seed, in_channels=5)
    return StableDiffusionDepth2ImgPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=components["scheduler"],
        depth_estimator=None,
        feature_extractor=None,
    )


def tiny_sample_prediction_pipeline(seed: int = 0) -> Any:
    """The tiny SD pipeline with a scheduler whose UNet predicts the clean sample x0 ('sample')."""
    pipe = tiny_sd_pipeline(seed)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    return pipe
