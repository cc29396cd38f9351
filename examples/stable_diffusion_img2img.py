"""Quantize a Stable Diffusion image-to-image pipeline and compare it with the float model.

    python examples/stable_diffusion_img2img.py                       # W8A8, SD 1.5 img2img (GPU + Hub)
    python examples/stable_diffusion_img2img.py --init-image photo.png --strength 0.6 --prompt "a watercolor"
    python examples/stable_diffusion_img2img.py --tiny                # offline tiny pipeline, CPU, seconds

What it does: load stable-diffusion-v1-5/stable-diffusion-v1-5 as a StableDiffusionImg2ImgPipeline (float16
on CUDA) and the --init-image (a path or URL; default: a sketch from the diffusers documentation images,
512x512; --tiny: a synthetic 32x32 gradient image); generate the reference images for --prompt; calibrate
on the pipeline's own img2img loop, passing the init image (and its mirror image) and --strength through
`pipeline_kwargs` (so the recorded steps are the truncated schedule the pipeline really runs); generate
again with the same seed; save a grid (float top, quantized bottom) and print the SQNR of the quantized
images against the float ones.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from example_common import (
    compare_and_save,
    compared_prompts,
    generate,
    load_input_image,
    load_pipeline,
    make_parser,
    quantize_default_recipe,
    run_settings,
)
from PIL import Image

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
INIT_IMAGE = (
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/img2img-init.png"
)
PROMPTS = ["a fantasy landscape at dusk, oil painting", "a mountain valley in winter, watercolor"]


def load_real(dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline.from_pretrained(MODEL_ID, torch_dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, output="sd15_img2img_comparison.png")
    parser.add_argument("--init-image", default=INIT_IMAGE, help="path or URL of the image to transform")
    parser.add_argument("--strength", type=float, default=0.75, help="img2img strength (default 0.75)")
    args = parser.parse_args(argv)
    steps, num_samples = run_settings(args, steps=50)
    from diffusers_ptq.tiny_variants import tiny_image, tiny_sd_img2img_pipeline

    pipe = load_pipeline(args, MODEL_ID + " (img2img)", tiny_sd_img2img_pipeline, load_real)
    init = tiny_image(seed=1) if args.tiny else load_input_image(args.init_image, 512)
    prompts = compared_prompts(args, PROMPTS)
    # One dict per calibration trajectory (cycled): the init image and its mirror image, for some variety.
    mirrored = init.transpose(Image.FLIP_LEFT_RIGHT)
    image_kwargs = [{"image": image, "strength": args.strength} for image in (init, mirrored)]
    call = {"prompt": prompts, "num_inference_steps": steps, "guidance_scale": args.guidance_scale}
    call.update(image=[init] * len(prompts), strength=args.strength)
    float_images = generate(pipe, args.seed, **call)  # before the UNet is quantized in place
    quantize_default_recipe(pipe, args, steps, num_samples, pipeline_kwargs=image_kwargs)
    compare_and_save(float_images, generate(pipe, args.seed, **call), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
