"""Shared fixtures and helpers of the serialization tests: tiny pipelines quantized once and saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

from diffusers_ptq import CalibrationSet, PTQConfig, quantize_pipeline
from diffusers_ptq.tiny import tiny_ddim_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from recipe_helpers import QUICK_LAYERS

PROMPTS = ["a photo of a cat", "a red car", "a watercolor of a tree", "a city at night"]
FAST = {"num_samples": 8, "num_inference_steps": 4, "batch_size": 8, "progress": False}
WEIGHTS = "diffusion_pytorch_model.safetensors"
SEARCH = {"num_candidates": 20}  # a short range search keeps calibration quick; tested in test_primitives


def images(pipe, prompt: str | None = None) -> np.ndarray:
    kwargs = {"num_inference_steps": 3, "generator": torch.Generator().manual_seed(0), "output_type": "np"}
    if prompt is None:
        return pipe(batch_size=2, **kwargs).images
    return pipe([prompt, prompt + " at dusk"], **kwargs).images


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (not a dict)


def rewrite(path: Path, edit) -> None:
    tensors, metadata = read_checkpoint(path)
    edit(tensors, metadata)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def edit_config(unet_dir: Path, edit) -> None:
    config = json.loads((unet_dir / "config.json").read_text())
    edit(config["quantization_config"])
    (unet_dir / "config.json").write_text(json.dumps(config))


def saved(tmp_path_factory, name: str, pipe) -> tuple[object, Path]:
    directory = tmp_path_factory.mktemp(name) / "pipe"
    pipe.save_pretrained(directory)
    return pipe, directory


def save_quantized_ddim(tmp_path_factory):
    """UNet2DModel at W8A8, 4 timestep groups, symmetric (int8) weights, shortcut-split, attention."""
    pipe = tiny_ddim_pipeline()
    config = PTQConfig(
        weight_bits=8, act_bits=8, weights=SEARCH, activations={**SEARCH, "timestep_groups": 4}
    )
    quantize_pipeline(pipe, config, **FAST)
    return saved(tmp_path_factory, "ddim", pipe)


def save_quantized_sd(tmp_path_factory):
    """Stable Diffusion at W4A8 (packed nibbles), special layers kept float, 8-bit softmax."""
    pipe = tiny_sd_pipeline()
    config = PTQConfig(
        weight_bits=4,
        act_bits=8,
        weights=SEARCH,
        activations={**SEARCH, "timestep_groups": 2},
        layers={"special_layers": "float", **QUICK_LAYERS},
    )
    quantize_pipeline(pipe, config, prompts=PROMPTS, **FAST)
    return saved(tmp_path_factory, "sd", pipe)


def save_quantized_sdxl(tmp_path_factory):
    """SDXL with the Q-Diffusion preset: asymmetric (uint8) weights, float softmax, one group per step."""
    pipe = tiny_sdxl_pipeline()
    config = PTQConfig.preset(
        "q-diffusion",
        weights=SEARCH,
        activations={**SEARCH, "timestep_groups": "per_step"},
        calibration={"step_interval": 1},
        reconstruction={"enabled": False},  # reconstructed checkpoints: test_reconstruction_pipeline
    )
    quantize_pipeline(pipe, config, prompts=PROMPTS, **FAST)
    return saved(tmp_path_factory, "sdxl", pipe)


def unet_copy(saved, tmp_path: Path) -> Path:
    target = tmp_path / "unet"
    shutil.copytree(saved[1] / "unet", target)
    return target


def mixed_inputs(unet, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    return x, torch.tensor([950, 600, 250, 10])


def calibration_set(unet, rows: int = 2) -> CalibrationSet:
    gen = torch.Generator().manual_seed(0)
    cfg = unet.config
    t = torch.tensor([900, 100][:rows])
    return CalibrationSet(
        inputs={
            "sample": torch.randn(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen),
            "encoder_hidden_states": torch.randn(rows, 6, cfg.cross_attention_dim, generator=gen),
        },
        timesteps=t,
        train_timesteps=t,
        step_index=torch.arange(rows),
        trajectory=torch.zeros(rows, dtype=torch.long),
        step_timesteps=t,
        num_train_timesteps=1000,
    )
