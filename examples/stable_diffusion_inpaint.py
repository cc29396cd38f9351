"""Quantize a Stable Diffusion inpainting pipeline (9-channel UNet) and compare it with the float model.

    python examples/stable_diffusion_inpaint.py                       # W8A8, SD 1.5 inpainting (GPU + Hub)
    python examples/stable_diffusion_inpaint.py --image photo.png --mask-image mask.png --prompt "a cat"
    python examples/stable_diffusion_inpaint.py --tiny                # offline tiny pipeline, CPU, seconds

What it does: load stable-diffusion-v1-5/stable-diffusion-inpainting (float16 on CUDA), whose UNet takes the
noisy latents, the mask and the masked-image latents (9 input channels); load --image and --mask-image
(paths or URLs, white = repaint; default: the bench photo and mask of the diffusers documentation images;
--tiny: a synthetic 32x32 image and a rectangle mask); generate the reference images for --prompt; calibrate
on the pipeline's own inpainting loop with the image and mask in `pipeline_kwargs`; generate again with the
same seed; save a grid (float top, quantized bottom) and print the SQNR of the quantized images against
the float ones.
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

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-inpainting"
IMAGES = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/"
PROMPTS = ["a white cat sitting on a park bench, photograph", "a bouquet of flowers on a park bench"]


def load_real(dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline.from_pretrained(MODEL_ID, torch_dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, output="sd15_inpaint_comparison.png")
    parser.add_argument("--image", default=IMAGES + "inpaint.png", help="path or URL of the image to edit")
    parser.add_argument(
        "--mask-image", default=IMAGES + "inpaint_mask.png", help="path or URL; white = repaint"
    )
    args = parser.parse_args(argv)
    steps, num_samples = run_settings(args, steps=50)
    from diffusers_ptq.tiny_variants import tiny_image, tiny_inpaint_pipeline

    pipe = load_pipeline(args, MODEL_ID, tiny_inpaint_pipeline, load_real)
    if args.tiny:
        image, mask = tiny_image(seed=2), tiny_image(seed=2, kind="mask")
    else:
        image, mask = load_input_image(args.image, 512), load_input_image(args.mask_image, 512)
    prompts = compared_prompts(args, PROMPTS)
    call = {"prompt": prompts, "num_inference_steps": steps, "guidance_scale": args.guidance_scale}
    call.update(image=[image] * len(prompts), mask_image=[mask] * len(prompts))
    float_images = generate(pipe, args.seed, **call)  # before the UNet is quantized in place
    image_kwargs = {"image": image, "mask_image": mask}
    quantize_default_recipe(pipe, args, steps, num_samples, pipeline_kwargs=image_kwargs)
    compare_and_save(float_images, generate(pipe, args.seed, **call), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
