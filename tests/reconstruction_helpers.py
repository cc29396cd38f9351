"""Shared helpers of the reconstruction tests: tiny UNets quantized from hand-made calibration sets."""

from __future__ import annotations

import torch

from diffusers_ptq import CalibrationSet, PTQConfig, quantize_unet
from diffusers_ptq.reconstruction import ReconstructionConfig, build_cache
from diffusers_ptq.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_unet2d
from recipe_helpers import plain

SEARCH = {"num_candidates": 10}
TIMESTEPS = (980, 700, 420, 150, 20)


def calibration_set(unet, rows: int = 10, seed: int = 0, tokens: int = 5, size: int = 8) -> CalibrationSet:
    """`rows` inputs of `size` x `size` spread over TIMESTEPS, with the conditioning the UNet asks for."""
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    t = torch.tensor([TIMESTEPS[i % len(TIMESTEPS)] for i in range(rows)])
    inputs = {"sample": torch.randn(rows, cfg.in_channels, size, size, generator=gen)}
    added = {}
    if getattr(cfg, "cross_attention_dim", None):
        inputs["encoder_hidden_states"] = torch.randn(rows, tokens, cfg.cross_attention_dim, generator=gen)
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(rows, text_dim, generator=gen),
            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(rows, 1),
        }
    steps = torch.tensor(TIMESTEPS)
    return CalibrationSet(
        inputs=inputs,
        timesteps=t.float(),
        train_timesteps=t,
        step_index=torch.tensor([i % len(TIMESTEPS) for i in range(rows)]),
        trajectory=torch.arange(rows) // len(TIMESTEPS),
        step_timesteps=steps,
        num_train_timesteps=1000,
        added_cond_kwargs=added,
    )


def ptq_config(
    weight_bits: int = 4,
    act_bits: int | None = 8,
    groups: int | str = 2,
    granularity: str = "auto",
    **layers,
) -> PTQConfig:
    return plain(
        weight_bits=weight_bits,
        act_bits=act_bits,
        weights={**SEARCH, "symmetric": False, "granularity": granularity},
        activations={**SEARCH, "timestep_groups": groups},
        layers=layers or {},
    )


def quantized(kind: str = "unet2d", rows: int = 10, **config):
    """(quantized tiny UNet, its calibration set)."""
    if kind == "unet2d":
        unet = tiny_unet2d(sample_size=8)
    elif kind == "sd":
        unet = tiny_sd_pipeline().unet
    elif kind == "sdxl":
        unet = tiny_sdxl_pipeline().unet
    else:
        raise ValueError(kind)
    data = calibration_set(unet, rows)  # 8 x 8 inputs (smaller than the tiny models' own) keep tests fast
    quantize_unet(unet, ptq_config(**config), data, batch_size=rows, progress=False)
    return unet, data


def fast_config(**overrides) -> ReconstructionConfig:
    base = {
        "iterations": 20,
        "act_iterations": 10,
        "batch_size": 4,
        "weight_lr": 1e-2,
        "cache_dtype": "float32",
        "cache_batch_size": 5,
    }
    return ReconstructionConfig(**{**base, **overrides})


def full_cache(unet, unit, data, rows: int, acts_on: bool):
    """`unit`'s cache of the first `rows` calibration rows in float32, in one batch, with activation
    quantization as `acts_on` says (weights quantized)."""
    return build_cache(
        unet,
        unit,
        data,
        torch.arange(rows),
        batch_size=rows,
        cache_dtype="float32",
        quant_state=(True, acts_on),
    )
