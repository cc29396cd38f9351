"""Quantize Stable Diffusion XL with the default diffusers-ptq recipe and compare it with the float model.

    python examples/sdxl_text2image.py                        # W8A8, SDXL base 1.0 (GPU + Hub)
    python examples/sdxl_text2image.py --weight-bits 4 --prompt "a corgi wearing sunglasses"
    python examples/sdxl_text2image.py --tiny                 # offline tiny SDXL pipeline, CPU, seconds

What it does: load stabilityai/stable-diffusion-xl-base-1.0 (float16 on CUDA); generate the reference images
for --prompt with a fixed seed; calibrate and fake-quantize the UNet on its own sampling loop (two text
encoders, text/time micro-conditioning replayed with every recorded step) with 16 built-in prompts (or
--prompts-file); generate again with the same seed; save a grid (float top row, quantized bottom row) and
print the SQNR of the quantized images against the float ones.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from example_common import (
    compare_and_save,
    compared_prompts,
    generate,
    load_pipeline,
    make_parser,
    quantize_default_recipe,
    run_settings,
)

MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def load_real(dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionXLPipeline

    variant = "fp16" if dtype == torch.float16 else None  # the half-size weight files
    return StableDiffusionXLPipeline.from_pretrained(MODEL_ID, torch_dtype=dtype, variant=variant)


def main(argv: list[str] | None = None) -> int:
    args = make_parser(__doc__, output="sdxl_comparison.png", guidance=5.0).parse_args(argv)
    steps, num_samples = run_settings(args, steps=30)
    from diffusers_ptq.tiny import tiny_sdxl_pipeline

    pipe = load_pipeline(args, MODEL_ID, tiny_sdxl_pipeline, load_real)
    call = {
        "prompt": compared_prompts(args),
        "num_inference_steps": steps,
        "guidance_scale": args.guidance_scale,
    }
    float_images = generate(pipe, args.seed, **call)  # before the UNet is quantized in place
    quantize_default_recipe(pipe, args, steps, num_samples)
    compare_and_save(float_images, generate(pipe, args.seed, **call), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
