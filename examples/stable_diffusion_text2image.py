"""Quantize Stable Diffusion v1.5 with a diffusers-ptq preset and compare it with the float model.

    python examples/stable_diffusion_text2image.py                      # Q-Diffusion W8A8 (GPU + Hub)
    python examples/stable_diffusion_text2image.py --weight-bits 4 --prompt "a corgi wearing sunglasses"
    python examples/stable_diffusion_text2image.py --preset ptq4dm --prompts-file my_prompts.txt
    python examples/stable_diffusion_text2image.py --tiny               # offline tiny model, CPU, seconds

What it does: load the float pipeline (float16 on CUDA); generate the reference images for --prompt with
a fixed seed; calibrate and fake-quantize the UNet on ~16 varied built-in prompts (or --prompts-file);
generate again with the same seed; save a grid (float top row, quantized bottom row) to --output and
print the SQNR of the quantized images against the float ones.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from diffusers_ptq import PTQConfig, available_presets, quantize_pipeline
from diffusers_ptq.primitives import sqnr_db

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="q-diffusion", choices=available_presets(), help="method preset")
    parser.add_argument("--weight-bits", type=int, help="weight bits (default: the preset's)")
    parser.add_argument(
        "--act-bits", help="activation bits, or 'none' for weight-only (default: the preset's)"
    )
    parser.add_argument("--prompt", action="append", help="prompt(s) to compare (repeatable)")
    parser.add_argument("--prompts-file", help="calibration prompts, one per line (default: 16 built-in)")
    parser.add_argument("--num-samples", type=int, help="calibration samples (default 256; --tiny: 4)")
    parser.add_argument("--num-inference-steps", type=int, help="sampling steps (default 50; --tiny: 2)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale (default 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the compared images (default 0)")
    parser.add_argument("--output", default="sd15_comparison.png", help="PNG grid path")
    parser.add_argument(
        "--reconstruction-minutes",
        type=float,
        help="time budget of the preset's block reconstruction (default: none; the published iteration "
        "counts take hours on Stable Diffusion)",
    )
    parser.add_argument("--no-reconstruction", action="store_true", help="calibration only")
    parser.add_argument("--tiny", action="store_true", help="offline tiny random-weight pipeline instead")
    return parser.parse_args(argv)


def load_pipeline(tiny: bool) -> tuple[object, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if tiny:
        from diffusers_ptq.tiny import tiny_sd_pipeline

        pipe = tiny_sd_pipeline()
    else:
        from diffusers import StableDiffusionPipeline

        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(MODEL_ID, torch_dtype=dtype)
    return pipe.to(device), device


def generate(pipe: object, prompts: list[str], steps: int, guidance: float, seed: int) -> np.ndarray:
    """(N, H, W, 3) images in [0, 1]; the CPU generator gives the same noise on any device."""
    generator = torch.Generator().manual_seed(seed)
    result = pipe(
        prompt=prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="np",
    )
    return np.asarray(result.images, dtype=np.float32)


def save_grid(rows: list[np.ndarray], path: str, min_tile: int = 256) -> None:
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    image = Image.fromarray((grid.clip(0, 1) * 255).round().astype(np.uint8))
    scale = max(1, min_tile // rows[0].shape[1])  # enlarge the tiny model's 32x32 images
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    torch.set_flush_denormal(True)  # an application may: denormals slow CPU calibration down a lot
    args = parse_args(argv)
    steps = args.num_inference_steps or (2 if args.tiny else 50)
    num_samples = args.num_samples or (4 if args.tiny else 256)
    prompts = args.prompt or ["a photograph of an astronaut riding a horse", "a red fox in the snow"]
    calibration = CALIBRATION_PROMPTS
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            calibration = [line.strip() for line in f if line.strip()]

    overrides = {}
    if args.weight_bits is not None:
        overrides["weight_bits"] = args.weight_bits
    if args.act_bits is not None:
        overrides["act_bits"] = None if args.act_bits.lower() == "none" else int(args.act_bits)
    reconstruction: dict[str, object] = {}
    if args.no_reconstruction:
        reconstruction["enabled"] = False
    if args.reconstruction_minutes is not None:
        reconstruction["max_minutes"] = args.reconstruction_minutes
    if args.tiny:  # a plumbing run: a few optimiser steps per block
        reconstruction.update(iterations=4, act_iterations=2)
    config = PTQConfig.preset(args.preset, **overrides, reconstruction=reconstruction)

    pipe, device = load_pipeline(args.tiny)
    pipe.set_progress_bar_config(disable=args.tiny)
    print(f"{'tiny SD' if args.tiny else MODEL_ID} on {device}: {args.preset} {config.tag}")

    # 1. Float reference, generated before the UNet is quantized in place.
    float_images = generate(pipe, prompts, steps, args.guidance_scale, args.seed)

    # 2. Calibrate on the pipeline's own sampling loop. A calibration trajectory needs a prompt of its
    #    own; the list is cycled when the preset records more trajectories than there are prompts.
    cycled = [calibration[i % len(calibration)] for i in range(max(num_samples, len(calibration)))]
    quantize_pipeline(
        pipe,
        config,
        prompts=cycled,
        num_samples=num_samples,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        progress=not args.tiny,
    )

    # 3. Same prompts, same seed: the only difference is the quantized UNet.
    quant_images = generate(pipe, prompts, steps, args.guidance_scale, args.seed)
    save_grid([float_images, quant_images], args.output)
    sqnr = sqnr_db(torch.from_numpy(float_images), torch.from_numpy(quant_images))
    print(
        f"SQNR of quantized vs float images: {sqnr:.2f} dB; grid (float top, quantized bottom): {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
