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

from example_common import (
    bit_overrides,
    calibration_prompts,
    compare_and_save,
    compared_prompts,
    device_and_dtype,
    generate,
    make_parser,
    run_settings,
)

from diffusers_ptq import PTQConfig, available_presets, quantize_pipeline

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser(__doc__, output="sd15_comparison.png", bits_default="the preset's")
    parser.add_argument("--preset", default="q-diffusion", choices=available_presets(), help="method preset")
    parser.add_argument(
        "--reconstruction-minutes",
        type=float,
        help="time budget of the preset's block reconstruction (default: none; the published iteration "
        "counts take hours on Stable Diffusion)",
    )
    parser.add_argument("--no-reconstruction", action="store_true", help="calibration only")
    return parser.parse_args(argv)


def load_pipeline(tiny: bool) -> tuple[object, str]:
    device, dtype = device_and_dtype(tiny)
    if tiny:
        from diffusers_ptq.tiny import tiny_sd_pipeline

        pipe = tiny_sd_pipeline()
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(MODEL_ID, torch_dtype=dtype)
    return pipe.to(device), device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps, num_samples = run_settings(args, steps=50)
    prompts = compared_prompts(args)
    reconstruction: dict[str, object] = {}
    if args.no_reconstruction:
        reconstruction["enabled"] = False
    if args.reconstruction_minutes is not None:
        reconstruction["max_minutes"] = args.reconstruction_minutes
    if args.tiny:  # a plumbing run: a few optimiser steps per block
        reconstruction.update(iterations=4, act_iterations=2)
    config = PTQConfig.preset(args.preset, **bit_overrides(args), reconstruction=reconstruction)

    pipe, device = load_pipeline(args.tiny)
    pipe.set_progress_bar_config(disable=args.tiny)
    print(f"{'tiny SD' if args.tiny else MODEL_ID} on {device}: {args.preset} {config.tag}")
    call = {"prompt": prompts, "num_inference_steps": steps, "guidance_scale": args.guidance_scale}

    # 1. Float reference, generated before the UNet is quantized in place.
    float_images = generate(pipe, args.seed, **call)

    # 2. Calibrate on the pipeline's own sampling loop (the prompts are cycled, with fresh noise, when the
    #    preset records more trajectories than there are prompts).
    quantize_pipeline(
        pipe,
        config,
        prompts=calibration_prompts(args),
        num_samples=num_samples or 256,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        progress=not args.tiny,
    )

    # 3. Same prompts, same seed: the only difference is the quantized UNet.
    compare_and_save(float_images, generate(pipe, args.seed, **call), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
