"""Load a quantized pipeline from the Hub with stock diffusers and compare it with its float model.

    python examples/load_quantized_from_hub.py user/sd15-w8a8        # a repo pushed with push_to_hub (GPU)
    python examples/load_quantized_from_hub.py ./sd15-w8a8 --base-model my-org/my-sd15-finetune
    python examples/load_quantized_from_hub.py --tiny                # offline: quantize, save, reload

What it does: `import diffusers_ptq` (it registers the quantizer with diffusers), then load REPO (a Hub id of
a pipeline saved with `save_pretrained` / `diffusers_ptq.push_to_hub`, or a local directory) with
`DiffusionPipeline.from_pretrained` — no calibration, the stored integer weights and scale tables are used as
they are; generate --prompt with a fixed seed; then load the float model (--base-model, default: the
`base_model` recorded in the checkpoint) and generate again; save a grid (float top, quantized bottom) and
print the SQNR of the quantized images against the float ones.

--tiny needs no Hub: it quantizes the tiny SD pipeline (--weight-bits / --act-bits, default W8A8), saves it
to a temporary directory, loads it back the same way and checks that the loaded pipeline reproduces the
in-memory quantized images bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import numpy as np
import torch
from example_common import (
    compare_and_save,
    compared_prompts,
    device_and_dtype,
    generate,
    load_pipeline,
    make_parser,
    quantize_default_recipe,
    run_settings,
)

import diffusers_ptq  # noqa: F401  (registers the diffusers-ptq quantizer: needed before from_pretrained)


def load_quantized(source: str, dtype: torch.dtype, device: str, tiny: bool) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=tiny)
    return pipe.to(device)


def run_tiny(args: argparse.Namespace, call: dict) -> tuple[np.ndarray, np.ndarray]:
    """Float and reloaded-quantized images of the tiny SD pipeline, via save_pretrained/from_pretrained."""
    from diffusers_ptq.tiny import tiny_sd_pipeline

    steps, num_samples = run_settings(args, steps=50)
    pipe = load_pipeline(args, "tiny SD", tiny_sd_pipeline, real=None)
    float_images = generate(pipe, args.seed, **call)
    quantize_default_recipe(pipe, args, steps, num_samples)
    quant_images = generate(pipe, args.seed, **call)
    device, dtype = device_and_dtype(tiny=True)
    with tempfile.TemporaryDirectory() as directory:
        pipe.save_pretrained(directory)
        loaded = load_quantized(directory, dtype, device, tiny=True)
        loaded_images = generate(loaded, args.seed, **call)
    same = np.array_equal(loaded_images, quant_images)
    print(f"reloaded pipeline reproduces the quantized images bit for bit: {same}")
    if not same:
        raise RuntimeError("the reloaded quantized pipeline's images differ from the in-memory ones")
    return float_images, loaded_images


def run_hub(args: argparse.Namespace, call: dict) -> tuple[np.ndarray, np.ndarray]:
    """Images of the quantized pipeline `args.repo` and of its float base model."""
    from diffusers import DiffusionPipeline

    device, dtype = device_and_dtype(tiny=False)
    pipe = load_quantized(args.repo, dtype, device, tiny=False)
    print(f"{args.repo} on {device}: {pipe.unet.ptq_state.config.tag}")
    quant_images = generate(pipe, args.seed, **call)
    base_model = args.base_model or pipe.unet.ptq_state.base_model
    if base_model is None:
        raise SystemExit(f"{args.repo} records no base model; pass --base-model")
    del pipe  # one pipeline on the device at a time
    float_pipe = DiffusionPipeline.from_pretrained(base_model, torch_dtype=dtype).to(device)
    print(f"float reference: {base_model}")
    return generate(float_pipe, args.seed, **call), quant_images


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__, output="hub_quantized_comparison.png")
    parser.add_argument("repo", nargs="?", help="Hub id or local directory of a quantized pipeline")
    parser.add_argument("--base-model", help="the float model to compare with (default: the recorded one)")
    args = parser.parse_args(argv)
    if not args.tiny and not args.repo:
        parser.error("give the quantized pipeline's Hub id or directory (or --tiny)")
    steps, _ = run_settings(args, steps=50)
    call = {
        "prompt": compared_prompts(args),
        "num_inference_steps": steps,
        "guidance_scale": args.guidance_scale,
    }
    float_images, quant_images = run_tiny(args, call) if args.tiny else run_hub(args, call)
    compare_and_save(float_images, quant_images, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
