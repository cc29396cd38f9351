"""What the example scripts share: their common flags, device/dtype choice, generation, grid and SQNR.

Not part of the diffusers-ptq API; each example imports it from its own folder (`python examples/X.py`
puts examples/ on the import path).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusers_ptq import PTQConfig, quantize_pipeline
from diffusers_ptq.primitives import sqnr_db

DEFAULT_PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow"]
CALIBRATION_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a bowl of ramen on a wooden table, studio lighting",
    "a watercolor painting of a lighthouse in a storm",
    "a close-up portrait of an elderly woman smiling",
    "a futuristic city skyline at night with flying cars",
    "a golden retriever puppy playing in autumn leaves",
    "an oil painting of a quiet village by a river",
    "a red sports car on a mountain road at sunset",
    "a cozy library with tall bookshelves and a fireplace",
    "a macro photo of a dew-covered spider web",
    "a medieval castle on a hill, fantasy art",
    "a tropical beach with palm trees and clear water",
    "a pencil sketch of a cat sleeping on a windowsill",
    "an isometric illustration of a small coffee shop",
    "a snowy forest at dawn with a deer in the distance",
    "a plate of colorful macarons on a marble counter",
]
TINY_STEPS = 2
TINY_SAMPLES = 4


def act_bits_arg(value: str) -> int | str:
    """`--act-bits`: an integer, or 'none' for weight-only."""
    if value.lower() == "none":
        return "none"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {value!r}") from None


def make_parser(
    doc: str | None, output: str, guidance: float = 7.5, bits_default: str = "8"
) -> argparse.ArgumentParser:
    """A parser with the flags every example has; the script adds its own before parsing."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight-bits", type=int, help=f"weight bits (default: {bits_default})")
    parser.add_argument(
        "--act-bits",
        type=act_bits_arg,
        help=f"activation bits, or 'none' for weight-only (default: {bits_default})",
    )
    parser.add_argument("--prompt", action="append", help="prompt(s) to compare (repeatable)")
    parser.add_argument("--prompts-file", help="calibration prompts, one per line (default: 16 built-in)")
    parser.add_argument(
        "--num-samples", type=int, help=f"calibration samples (default: the recipe's; --tiny: {TINY_SAMPLES})"
    )
    parser.add_argument("--num-inference-steps", type=int, help=f"sampling steps (--tiny: {TINY_STEPS})")
    parser.add_argument(
        "--guidance-scale", type=float, default=guidance, help=f"CFG scale (default {guidance})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the compared images (default 0)")
    parser.add_argument("--output", default=output, help=f"PNG grid path (default {output})")
    parser.add_argument("--tiny", action="store_true", help="offline tiny random-weight pipeline instead")
    return parser


def bit_overrides(args: argparse.Namespace) -> dict[str, int | None]:
    """The `weight_bits` / `act_bits` the user gave (act 'none' -> None: weight-only)."""
    overrides: dict[str, int | None] = {}
    if args.weight_bits is not None:
        overrides["weight_bits"] = args.weight_bits
    if args.act_bits is not None:
        overrides["act_bits"] = None if args.act_bits == "none" else args.act_bits
    return overrides


def default_recipe_kwargs(args: argparse.Namespace) -> dict[str, int | None]:
    """`PTQConfig(**this)`: the default recipe at W8A8 unless the flags say otherwise."""
    return {"weight_bits": 8, "act_bits": 8, **bit_overrides(args)}


def run_settings(args: argparse.Namespace, steps: int) -> tuple[int, int | None]:
    """(sampling steps, calibration samples): the flags, else `steps` and the recipe's count (tiny: small)."""
    default_steps, default_samples = (TINY_STEPS, TINY_SAMPLES) if args.tiny else (steps, None)
    return args.num_inference_steps or default_steps, args.num_samples or default_samples


def compared_prompts(args: argparse.Namespace, default: list[str] | None = None) -> list[str]:
    """--prompt's values, else `default` (else two built-in prompts)."""
    return args.prompt or list(default or DEFAULT_PROMPTS)


def calibration_prompts(args: argparse.Namespace) -> list[str]:
    """--prompts-file's lines, else the built-in list (quantize_pipeline cycles them over trajectories)."""
    if not args.prompts_file:
        return list(CALIBRATION_PROMPTS)
    with open(args.prompts_file, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {args.prompts_file} has no prompts")
    return prompts


def device_and_dtype(tiny: bool) -> tuple[str, torch.dtype]:
    """CUDA in float16 when there is a GPU; the CPU in float32 otherwise and for the tiny models.

    Also flushes denormals to zero, as an application may: they slow CPU calibration down a lot."""
    torch.set_flush_denormal(True)
    if torch.cuda.is_available():
        return "cuda", torch.float32 if tiny else torch.float16
    return "cpu", torch.float32


def load_pipeline(
    args: argparse.Namespace, name: str, tiny: Callable[[], Any], real: Callable[[torch.dtype], Any]
) -> Any:
    """`tiny()` with --tiny (no progress bars), else `real(dtype)` (the Hub model); moved to the device."""
    device, dtype = device_and_dtype(args.tiny)
    pipe = tiny() if args.tiny else real(dtype)
    pipe.set_progress_bar_config(disable=args.tiny)
    print(f"{'tiny ' + type(pipe).__name__ if args.tiny else name} on {device}")
    return pipe.to(device)


def load_input_image(source: str, size: int) -> Image.Image:
    """An RGB image from a path or URL (diffusers' `load_image`), resized to `size` x `size`."""
    from diffusers.utils import load_image

    return load_image(source).convert("RGB").resize((size, size), Image.BICUBIC)


def quantize_default_recipe(
    pipe: Any, args: argparse.Namespace, steps: int, num_samples: int | None, **kwargs: Any
) -> PTQConfig:
    """Quantize `pipe` in place with `PTQConfig(weight_bits, act_bits)`, calibrated on its own sampling loop
    with the calibration prompts; `kwargs` go to `quantize_pipeline` (e.g. `pipeline_kwargs`)."""
    config = PTQConfig(**default_recipe_kwargs(args))
    print(f"quantizing with the default recipe, {config.tag}")
    quantize_pipeline(
        pipe,
        config,
        prompts=calibration_prompts(args),
        num_samples=num_samples,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        progress=not args.tiny,
        **kwargs,
    )
    return config


def generate(pipe: Any, seed: int, **call_kwargs: Any) -> np.ndarray:
    """(N, H, W, 3) images in [0, 1]; the CPU generator gives the same noise on any device."""
    generator = torch.Generator().manual_seed(seed)
    result = pipe(generator=generator, output_type="np", **call_kwargs)
    return np.asarray(result.images, dtype=np.float32)


def save_grid(rows: list[np.ndarray], path: str, min_tile: int = 256) -> None:
    """One row of tiles per array in `rows`; tiny 32x32 images are enlarged to `min_tile` pixels."""
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    image = Image.fromarray((grid.clip(0, 1) * 255).round().astype(np.uint8))
    scale = max(1, min_tile // rows[0].shape[1])
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def compare_and_save(float_images: np.ndarray, quant_images: np.ndarray, path: str) -> float:
    """Save the float-over-quantized grid to `path`, print and return the SQNR of quantized vs float."""
    save_grid([float_images, quant_images], path)
    sqnr = sqnr_db(torch.from_numpy(float_images), torch.from_numpy(quant_images))
    print(f"SQNR of quantized vs float images: {sqnr:.2f} dB; grid (float top, quantized bottom): {path}")
    return sqnr
