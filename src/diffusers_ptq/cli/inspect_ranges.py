"""`diffusers-ptq inspect`: plot per-layer activation ranges across timesteps for any supported pipeline, and
with --quantized a quantized UNet's noise SQNR and noise bias per sampling step."""

from __future__ import annotations

import argparse
import json
from typing import Any

from diffusers_ptq.benchmark.plotting import pyplot
from diffusers_ptq.calibration import get_pipeline_spec
from diffusers_ptq.cli import inspect_sensitivity
from diffusers_ptq.cli.common import (
    DEFAULT_MODEL,
    DEFAULT_PROMPTS,
    DTYPES,
    MODEL_HELP,
    atomic_directory,
    check_output,
    error,
    load_pipeline,
    resolve_device,
)
from diffusers_ptq.cli.pipeline_args import add_pipeline_call_arguments, pipeline_kwargs
from diffusers_ptq.inspection import (
    noise_error_by_step,
    plot_activation_ranges,
    plot_noise_error,
    record_activation_ranges,
)


def add_parser(sub: Any) -> None:
    i = sub.add_parser(
        "inspect",
        help="plot per-layer activation ranges across timesteps (why activations need per-timestep scales)",
        description="Run the float pipeline once and record the input range of every Conv2d/Linear of the\n"
        "UNet at each sampling step. Writes activation_ranges.png (the layers whose range varies most\n"
        "across timesteps) and activation_ranges.json (every layer) into --output, atomically.\n"
        "With --quantized UNET_DIR (a quantized UNet saved with save_pretrained) it also runs that UNet on\n"
        "the float DDIM trajectory and writes noise_error.json and noise_error_per_step.png: per step the\n"
        "noise SQNR and the noise bias, RMS over (C, H, W) of the mean over samples of eps_q - eps.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} Default: {DEFAULT_MODEL}.")
    i.add_argument("--prompt", action="append", help="prompt for text-conditioned pipelines; repeatable.")
    i.add_argument(
        "--num-images", type=int, default=4, help="images of an unconditional pipeline. Default: 4."
    )
    i.add_argument("--num-inference-steps", type=int, default=50, help="sampling steps. Default: 50.")
    i.add_argument("--layers", metavar="REGEX", help="only layers whose name matches. Default: all.")
    i.add_argument("--max-layers", type=int, default=16, help="subplots in the PNG. Default: 16.")
    i.add_argument("--seed", type=int, default=0, help="noise seed. Default: 0.")
    i.add_argument("--device", help="torch device. Default: cuda if available, else cpu.")
    i.add_argument(
        "--dtype", choices=sorted(DTYPES), help="pipeline dtype. Default: float32 on cpu, float16 on cuda."
    )
    i.add_argument(
        "--quantized",
        metavar="UNET_DIR",
        help="a quantized UNet directory (save_pretrained) to compare with --model's UNet per step.",
    )
    i.add_argument("--output", required=True, metavar="DIR", help="output directory (required).")
    i.add_argument("--overwrite", action="store_true", help="replace a non-empty --output. Default: refuse.")
    add_pipeline_call_arguments(i, "the pipeline's inspected run (with --sensitivity: its calibration calls)")
    inspect_sensitivity.add_arguments(i)


def run(args: argparse.Namespace) -> int:
    if args.sensitivity:
        return inspect_sensitivity.run(args)
    try:
        for name in ("num_images", "num_inference_steps", "max_layers"):
            if getattr(args, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; expected >= 1"
                )
        out = check_output(args.output, args.overwrite)
        pyplot()  # the plot is written last: a missing matplotlib must stop the run before any work
        device, dtype = resolve_device(args.device, args.dtype)
        pipe = load_pipeline(args.model, device, dtype)
        spec = get_pipeline_spec(pipe)
        if spec.text_conditioned and not args.prompt:
            args.prompt = DEFAULT_PROMPTS[:2]
        extra = pipeline_kwargs(args, pipe, spec) or None
        if extra is not None and args.quantized is not None:
            raise ValueError(
                "--quantized compares on a plain DDIM trajectory of the model; it takes no "
                "--pipeline-kwargs / --init-image / --mask-image / --control-image"
            )
        ranges = record_activation_ranges(
            pipe,
            prompts=args.prompt,
            num_images=args.num_images,
            num_inference_steps=args.num_inference_steps,
            layers=args.layers,
            seed=args.seed,
            pipeline_kwargs=extra,
        )
        noise = None if args.quantized is None else _noise_error(args, pipe, device, dtype)
    except (ValueError, TypeError, OSError, ImportError) as err:
        return error(err)
    with atomic_directory(out) as tmp:
        shown = plot_activation_ranges(ranges, tmp / "activation_ranges.png", args.max_layers)
        (tmp / "activation_ranges.json").write_text(json.dumps(ranges.to_dict()) + "\n", encoding="utf-8")
        if noise is not None:
            plot_noise_error(noise, tmp / "noise_error_per_step.png")
            (tmp / "noise_error.json").write_text(json.dumps(noise) + "\n", encoding="utf-8")
    variation = ranges.variation()
    print(f"diffusers-ptq: {len(ranges.layers)} layers over {len(ranges.timesteps)} UNet calls")
    for name in shown[:5]:
        factor = float(variation[ranges.layers.index(name)])
        print(f"  {name}: input range varies {factor:.1f}x across timesteps")
    if noise is not None:
        worst = max(range(len(noise["bias"])), key=noise["bias"].__getitem__)
        print(
            f"diffusers-ptq: quantized UNet, noise SQNR {min(noise['sqnr_db']):.2f} to "
            f"{max(noise['sqnr_db']):.2f} dB per step; largest bias {noise['bias'][worst]:.3g} at "
            f"t={noise['timesteps'][worst]}"
        )
    print(f"diffusers-ptq: wrote {out}")
    return 0


def _noise_error(args: argparse.Namespace, pipe: Any, device: Any, dtype: Any) -> dict[str, list[float]]:
    """Load the quantized UNet of --quantized and measure it on the float pipeline's trajectory."""
    import diffusers_ptq  # noqa: F401  (registers the quantizer with diffusers' from_pretrained)

    unet = type(pipe.unet).from_pretrained(args.quantized, torch_dtype=dtype).to(device)
    if getattr(unet, "ptq_state", None) is None:
        raise ValueError(f"--quantized {args.quantized!r} is not a UNet quantized by diffusers-ptq")
    return noise_error_by_step(
        pipe,
        unet,
        prompts=args.prompt,
        num_images=args.num_images,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
    )
