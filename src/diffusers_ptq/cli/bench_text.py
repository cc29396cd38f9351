"""Text-to-image inputs of `diffusers-ptq bench`: the --prompts file, and whether --model wants prompts.

Both are checked before any model is loaded, so a wrong combination fails in a second rather than after
minutes of loading weights.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from diffusers_ptq.benchmark.quality.settings import BenchSettings
from diffusers_ptq.calibration.pipelines import spec_for_class_name
from diffusers_ptq.cli.common import TINY_PREFIX, ZOO_MODELS
from diffusers_ptq.tiny import PIPELINE_NAMES

# The text-to-image ones among the tiny: pipelines (the others are unconditional DDPM/DDIM).
_TINY_TEXT = ("sd", "sdxl")
# Text-only options: (flag, argparse attribute).
TEXT_OPTIONS = (("--guidance-scale", "guidance_scale"), ("--clip-model", "clip_model"))


def read_prompts(path: str) -> list[str]:
    """One prompt per line, surrounding whitespace stripped, blank lines ignored."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts {path!r}: no such file (expected a text file with one prompt per line)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {path!r} cannot be read as UTF-8 text: {err}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(
            f"--prompts {path!r} holds no prompts (expected one per line; blank lines are ignored)"
        )
    return prompts


def _class_name(model: str) -> str | None:
    """The pipeline class --model names, read from its model_index.json; None when that is not at hand."""
    if os.path.isdir(model):
        index = Path(model) / "model_index.json"
    else:
        try:  # a few hundred bytes; from_pretrained would fetch it first anyway
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(model, "model_index.json"))
        except Exception:  # offline, unknown id, ...: decided after loading instead
            return None
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def model_text_conditioned(model: str) -> bool | None:
    """Whether --model is a text-to-image pipeline, without loading its weights; None: not known yet."""
    if model in ZOO_MODELS:
        return False
    if model.startswith(TINY_PREFIX):
        name = model[len(TINY_PREFIX) :]
        return name in _TINY_TEXT if name in PIPELINE_NAMES else None  # unknown: load_pipeline says so
    name = _class_name(model)
    return None if name is None else _text_conditioned_class(name)


def _text_conditioned_class(name: str) -> bool | None:
    spec = spec_for_class_name(name)
    return None if spec is None else spec.text_conditioned  # unsupported: get_pipeline_spec says so later


def check_model_prompts(model: str, text_conditioned: bool | None, prompts: list[str] | None) -> None:
    """--model and --prompts agree: prompts for text-to-image models, none for unconditional ones."""
    if text_conditioned is True and prompts is None:
        raise ValueError(
            f"--model {model} is text-conditioned (text-to-image): pass --prompts FILE, one prompt per line"
        )
    if text_conditioned is False and prompts is not None:
        raise ValueError(
            f"--prompts applies to text-to-image models; --model {model} is unconditional: drop --prompts"
        )


def text_overrides(args: Any) -> dict[str, Any]:
    """BenchSettings fields from --prompts, --guidance-scale and --clip-model (text-only flags need
    --prompts)."""
    if args.prompts is None:
        for flag, name in TEXT_OPTIONS:
            if getattr(args, name) is not None:
                raise ValueError(f"{flag} applies to text-to-image models; pass --prompts FILE with it")
        return {}
    out: dict[str, Any] = {"prompts": read_prompts(args.prompts)}
    out.update({name: getattr(args, name) for _, name in TEXT_OPTIONS if getattr(args, name) is not None})
    return out


def add_text_arguments(b: argparse.ArgumentParser, default: BenchSettings) -> None:
    b.add_argument(
        "--prompts",
        metavar="FILE",
        help="text-to-image models (required for them, refused for unconditional ones): a text file, one "
        "prompt per line, blank lines ignored. Image i of every seed and row uses prompt i mod the number "
        "of prompts; the same prompts, cycled, calibrate the quantized rows.",
    )
    b.add_argument(
        "--guidance-scale",
        type=float,
        help=f"with --prompts: classifier-free guidance scale. Default: {default.guidance_scale}.",
    )
    b.add_argument(
        "--clip-model",
        help="with --prompts: CLIP model of the CLIP score, a Hub id already in the local cache or a local "
        f"directory (never downloaded; skipped with a note when absent). Default: {default.clip_model}.",
    )
