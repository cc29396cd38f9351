"""Quantize the UNet of a Stable Diffusion ControlNet pipeline and compare it with the float model.

    python examples/controlnet.py                       # W8A8, SD 1.5 + the canny ControlNet (GPU + Hub)
    python examples/controlnet.py --control-source photo.png --prompt "a marble statue"
    python examples/controlnet.py --tiny                # offline tiny pipeline and ControlNet, CPU, seconds

What it does: load stable-diffusion-v1-5/stable-diffusion-v1-5 with lllyasviel/sd-controlnet-canny (float16
on CUDA); turn --control-source (a path or URL; default: the Vermeer portrait of the diffusers documentation
images; --tiny: a synthetic 32x32 drawing) into a white-on-black edge map (PIL's edge filter, thresholded: a
stand-in for Canny that needs no OpenCV); generate the reference images for --prompt; calibrate on the
pipeline's own loop with the edge map in `pipeline_kwargs` (the ControlNet residuals the UNet receives are
recorded and replayed during calibration; the ControlNet itself stays float); generate again with the same
seed; save a grid (float top, quantized bottom) and print the SQNR of the quantized images against the
float ones.
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
from PIL import Image, ImageDraw, ImageFilter

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONTROLNET_ID = "lllyasviel/sd-controlnet-canny"
SOURCE = (
    "https://hf.co/datasets/huggingface/documentation-images/resolve/main/diffusers/input_image_vermeer.png"
)
PROMPTS = ["a portrait of a woman with a pearl earring, oil painting", "a bronze statue of a woman, museum"]


def edge_map(image: Image.Image, threshold: int = 24) -> Image.Image:
    """White edges on black, as a Canny ControlNet expects."""
    edges = image.convert("L").filter(ImageFilter.SMOOTH).filter(ImageFilter.FIND_EDGES)
    return edges.point(lambda v: 255 if v > threshold else 0).convert("RGB")


def synthetic_drawing(size: int = 32) -> Image.Image:
    """A few flat shapes, so the tiny run's edge map has edges."""
    image = Image.new("RGB", (size, size), (40, 60, 90))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 8, size // 2, size // 2), fill=(230, 200, 60))
    draw.rectangle((size // 2, size // 3, size - size // 8, size - size // 8), fill=(200, 40, 40))
    return image


def load_real(dtype: torch.dtype) -> Any:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    controlnet = ControlNetModel.from_pretrained(CONTROLNET_ID, torch_dtype=dtype)
    return StableDiffusionControlNetPipeline.from_pretrained(
        MODEL_ID, controlnet=controlnet, torch_dtype=dtype
    )


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, output="sd15_controlnet_comparison.png")
    parser.add_argument(
        "--control-source", default=SOURCE, help="path or URL of the image to take edges from"
    )
    args = parser.parse_args(argv)
    steps, num_samples = run_settings(args, steps=50)
    from diffusers_ptq.tiny_variants import tiny_controlnet_pipeline

    pipe = load_pipeline(args, f"{MODEL_ID} + {CONTROLNET_ID}", tiny_controlnet_pipeline, load_real)
    source = synthetic_drawing() if args.tiny else load_input_image(args.control_source, 512)
    control = edge_map(source)
    prompts = compared_prompts(args, PROMPTS)
    call = {"prompt": prompts, "num_inference_steps": steps, "guidance_scale": args.guidance_scale}
    call["image"] = [control] * len(prompts)
    float_images = generate(pipe, args.seed, **call)  # before the UNet is quantized in place
    quantize_default_recipe(pipe, args, steps, num_samples, pipeline_kwargs={"image": control})
    compare_and_save(float_images, generate(pipe, args.seed, **call), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
