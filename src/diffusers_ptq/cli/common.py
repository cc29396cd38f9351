"""Shared pieces of the `diffusers-ptq` commands: model loading, atomic output directories, errors."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

from diffusers_ptq.serialization import atomic as serialization_atomic
from diffusers_ptq.tiny import PIPELINE_NAMES, build_tiny_pipeline

TINY_PREFIX = "tiny:"
FASHION_MODEL = "fashion"
COLOUR_MODEL = "colour-fashion"
# The DDPMs that ship in the package (offline, DDIM sampling), by --model name.
ZOO_MODELS = (FASHION_MODEL, COLOUR_MODEL)
DEFAULT_MODEL = FASHION_MODEL
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Used for text-conditioned pipelines when the command line gives no prompt.
DEFAULT_PROMPTS = [
    "a photograph of a red fox in a snowy forest",
    "a bowl of fresh fruit on a wooden table",
    "a lighthouse on a rocky coast at sunset",
    "a portrait of an old man with a grey beard",
    "a city street at night with neon signs",
    "a watercolor painting of mountains and a lake",
    "a vintage car parked in front of a diner",
    "a cozy living room with a fireplace and bookshelves",
]
MODEL_HELP = (
    "Hub model id or local directory (diffusers.DiffusionPipeline.from_pretrained); 'fashion' for the "
    "DDPM trained on Fashion-MNIST that ships with diffusers-ptq (offline, DDIM sampling); "
    "'colour-fashion' for the second shipped DDPM (16x16 colour, cosine schedule, v-prediction); or one of "
    + ", ".join(TINY_PREFIX + n for n in PIPELINE_NAMES)
    + " (offline random-weight pipelines for plumbing tests)."
)


def act_bits_arg(text: str) -> int | str:
    """argparse type of --act-bits: an integer, or 'none' for weight-only quantization."""
    return "none" if text.lower() == "none" else int(text)


def error(err: BaseException) -> int:
    """Print a one-line error for bad input and return exit code 2."""
    print("diffusers-ptq: error: " + " ".join(str(err).split()), file=sys.stderr)
    return 2


def resolve_device(name: str | None, dtype_name: str | None) -> tuple[torch.device, torch.dtype]:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available")
    return device, DTYPES[dtype_name or ("float16" if device.type == "cuda" else "float32")]


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A pipeline from a Hub id / local path, a shipped DDPM ('fashion', 'colour-fashion'), or a 'tiny:'
    pipeline."""
    if model == FASHION_MODEL:
        from diffusers_ptq.zoo import fashion_ddpm_pipeline

        return fashion_ddpm_pipeline("ddim", dtype=dtype).to(device)
    if model == COLOUR_MODEL:
        from diffusers_ptq.zoo import colour_ddpm_pipeline

        return colour_ddpm_pipeline("ddim", dtype=dtype).to(device)
    if model.startswith(TINY_PREFIX):
        pipe = build_tiny_pipeline(model[len(TINY_PREFIX) :])  # built in float32
        return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)


def check_output(text: str, overwrite: bool) -> Path:
    out = Path(text).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {text!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output directory {text!r} is not empty; pass --overwrite to replace it")
    return out


def atomic_directory(out: Path) -> contextlib.AbstractContextManager[Path]:
    """A fresh directory next to `out`; on success it replaces `out` entirely, on error it vanishes."""
    return serialization_atomic.atomic_directory(out, carry_over=False)
