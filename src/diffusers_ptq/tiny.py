"""Tiny random-weight diffusers pipelines, built fully offline.

They exist so that tests, the CLI's default model and examples can exercise the whole quantization
flow (attention, skip concatenations, cross-attention, several schedulers) in seconds on a CPU and
without any Hugging Face Hub access. Their outputs are noise-like; only shapes and numerics matter.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

if TYPE_CHECKING:  # imported where used: these modules pull in transformers' image processors, which
    # print notices about torchvision on import, for commands that never build a text-to-image pipeline.
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

__all__ = [
    "PIPELINE_NAMES",
    "SD_SCHEDULER_NAMES",
    "build_tiny_pipeline",
    "tiny_clip_tokenizer",
    "tiny_ddim_pipeline",
    "tiny_ddpm_pipeline",
    "tiny_sd_pipeline",
    "tiny_sd_unet",
    "tiny_sdxl_pipeline",
    "tiny_unet2d",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# The text encoders' embedding tables are sized independently of the tokenizer (which has ~600 tokens),
# so every id the tokenizer can emit is valid.
TEXT_VOCAB_SIZE = 1000
TEXT_HIDDEN_SIZE = 32

# Frequent English bigrams: each yields a mid-word merge and a word-final ("</w>") merge, so common
# words become a few pieces instead of one token per letter (one string: the formatter would otherwise
# put each pair on its own line).
_COMMON_PAIRS = (  # noqa: SIM905
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou le ve co me de"
).split()
# Whole-word merges built on top of the pair merges above (ranked after them, as BPE requires).
_WORD_MERGES = ("th e</w>", "an d</w>", "in g</w>", "o f</w>", "a t</w>", "i s</w>", "o n</w>")

SD_SCHEDULER_NAMES = ("ddim", "euler", "euler_karras", "dpm", "pndm")
PIPELINE_NAMES = ("ddpm", "ddim", "sd", "sdxl")

# Stable Diffusion's noise schedule, so latent-space schedulers behave like the real model's.
_SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    # The SD pipelines rewrite (and warn about) any scheduler config whose steps_offset is not 1.
    "steps_offset": 1,
}


def _byte_alphabet() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE maps each byte onto, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    # Non-printable bytes are shifted past 255 so every byte gets a visible, unambiguous character.
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return [mapping[b] for b in range(256)]


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    alphabet = _byte_alphabet()
    tokens = alphabet + [ch + "</w>" for ch in alphabet]
    merges = [f"{a} {b}" for a, b in _COMMON_PAIRS] + [f"{a} {b}</w>" for a, b in _COMMON_PAIRS]
    merges += _WORD_MERGES
    for merge in merges:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    # Special tokens last, like the real CLIP vocabulary.
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def tiny_clip_tokenizer(directory: str | os.PathLike[str] | None = None) -> CLIPTokenizer:
    """Build a small CLIP byte-level BPE tokenizer from a vocabulary generated in code.

    ``vocab.json`` and ``merges.txt`` are written to ``directory`` (kept there) or, if it is None, to a
    temporary directory that is removed once the tokenizer is loaded: the loaded tokenizer holds its
    vocabulary in memory and never reads the files again.
    """
    vocab, merges = _tiny_vocab_and_merges()

    def load(path: str) -> CLIPTokenizer:
        with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        # from_pretrained (not the constructor) is what turns vocab/merges files into the
        # tokenizers-backed CLIPTokenizer of transformers 5.
        return CLIPTokenizer.from_pretrained(
            path, model_max_length=MODEL_MAX_LENGTH, pad_token=EOS_TOKEN, local_files_only=True
        )

    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        return load(os.fspath(directory))
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tokenizer_") as tmp:
        tokenizer = load(tmp)
    # Don't advertise a path that no longer exists.
    tokenizer.name_or_path = ""
    return tokenizer


def _seeded(seed: int, factory: Callable[[], torch.nn.Module]) -> Any:
    """Build ``factory()`` under ``seed`` without disturbing the caller's global CPU RNG."""
    # Building under a CPU device context ignores any global default device; `.float()` rather than
    # `.to(dtype=...)` because diffusers' `to` warns about dtype casts.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        module = factory()
    return module.float().eval()


def tiny_unet2d(sample_size: int = 16, seed: int = 0) -> UNet2DModel:
    """Pixel-space UNet with self-attention and up-block skip concatenations (~0.3M params)."""
    return _seeded(
        seed,
        lambda: UNet2DModel(
            sample_size=sample_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=8,
        ),
    )


def tiny_ddpm_pipeline(seed: int = 0) -> DDPMPipeline:
    """Unconditional pixel-space DDPM pipeline on 16x16 RGB images."""
    return DDPMPipeline(unet=tiny_unet2d(seed=seed), scheduler=DDPMScheduler(num_train_timesteps=1000))


def tiny_ddim_pipeline(seed: int = 0) -> DDIMPipeline:
    """Unconditional pixel-space DDIM pipeline on 16x16 RGB images."""
    return DDIMPipeline(unet=tiny_unet2d(seed=seed), scheduler=DDIMScheduler(num_train_timesteps=1000))


def _sd_scheduler(name: str) -> Any:
    # Latents are not bounded to [-1, 1], so sample clipping is off; the rest mirrors SD's own configs.
    factories: dict[str, Callable[[], Any]] = {
        "ddim": lambda: DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False),
        "euler": lambda: EulerDiscreteScheduler(**_SD_SCHEDULE),
        "euler_karras": lambda: EulerDiscreteScheduler(**_SD_SCHEDULE, use_karras_sigmas=True),
        "dpm": lambda: DPMSolverMultistepScheduler(**_SD_SCHEDULE),
        "pndm": lambda: PNDMScheduler(**_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
    }
    if name not in factories:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SD_SCHEDULER_NAMES)}")
    return factories[name]()


def _text_config(tokenizer: CLIPTokenizer, **overrides: Any) -> CLIPTextConfig:
    # Special-token ids come from the tokenizer so the pooled output is taken at the real EOS position.
    kwargs: dict[str, Any] = {
        "vocab_size": TEXT_VOCAB_SIZE,
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "layer_norm_eps": 1e-5,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def _tiny_vae() -> AutoencoderKL:
    # Two blocks -> vae_scale_factor 2, so 16x16 latents decode to 32x32 images.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_sd_unet(seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    """The tiny SD UNet (16x16x4 latents, cross-attention); `overrides` change its config (e.g.
    `in_channels=9` for inpainting, `time_cond_proj_dim` for LCM)."""
    config: dict[str, Any] = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": TEXT_HIDDEN_SIZE,
        "norm_num_groups": 8,
        "attention_head_dim": 2,
    }
    config.update(overrides)
    return _seeded(seed, lambda: UNet2DConditionModel(**config))


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim") -> StableDiffusionPipeline:
    """Text-to-image Stable Diffusion pipeline: 16x16x4 latents, 32x32 images.

    ``scheduler`` is one of ``SD_SCHEDULER_NAMES``.
    """
    noise_scheduler = _sd_scheduler(scheduler)
    tokenizer = tiny_clip_tokenizer()
    # Each component gets its own derived seed so changing one architecture leaves the others' weights intact.
    unet = tiny_sd_unet(seed)
    vae = _seeded(seed + 1, _tiny_vae)
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(_text_config(tokenizer)))
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL pipeline with two text encoders and text/time micro-conditioning: 16x16x4 latents."""
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    projection_dim = 32
    time_embed_dim = 8
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # SDXL layout: deeper transformer stacks at lower resolution.
            transformer_layers_per_block=(1, 2),
            # The UNet attends over both encoders' penultimate hidden states, concatenated.
            cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
            use_linear_projection=True,
            norm_num_groups=8,
            attention_head_dim=(2, 4),
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # Six micro-conditioning values (original size, crop, target size) plus the pooled text embedding.
            projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        ),
    )
    vae = _seeded(seed + 1, _tiny_vae)
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(_text_config(tokenizer)))
    text_encoder_2 = _seeded(
        seed + 3,
        lambda: CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=projection_dim)),
    )
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_SCHEDULE),
        # The invisible-watermark package is optional and pointless on random-weight outputs.
        add_watermarker=False,
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "ddpm": tiny_ddpm_pipeline,
    "ddim": tiny_ddim_pipeline,
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
}


def build_tiny_pipeline(name: str, seed: int = 0) -> DiffusionPipeline:
    """Build the tiny pipeline called ``name`` (one of ``PIPELINE_NAMES``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline {name!r}; valid names: {', '.join(PIPELINE_NAMES)}")
    return _BUILDERS[name](seed)
