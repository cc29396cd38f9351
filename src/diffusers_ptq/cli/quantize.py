"""`diffusers-ptq quantize`: calibrate a UNet; write its config, report, quantizer state and a comparison."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusers_ptq import TimestepActQuantizer, WeightQuantizer, __version__, available_presets, distributed
from diffusers_ptq.api import quantize_pipeline
from diffusers_ptq.calibration import get_pipeline_spec
from diffusers_ptq.calibration.driver import check_pipeline_kwargs
from diffusers_ptq.cli.common import (
    DEFAULT_MODEL,
    DEFAULT_PROMPTS,
    DTYPES,
    MODEL_HELP,
    act_bits_arg,
    atomic_directory,
    check_output,
    error,
    load_pipeline,
    resolve_device,
)
from diffusers_ptq.cli.pipeline_args import add_pipeline_call_arguments, pipeline_kwargs
from diffusers_ptq.config import PTQConfig, describe_fields
from diffusers_ptq.primitives import sqnr_db
from diffusers_ptq.reconstruction import ReconstructionReport


def _timestep_groups(text: str) -> int | str:
    return "per_step" if text == "per_step" else int(text)


def _config_epilog() -> str:
    rows = [f"  {name} (default {value!r}): {text}" for name, value, text in describe_fields()]
    return "PTQConfig JSON fields for --config (nested sections):\n" + "\n".join(rows)


_RECIPE = "Default: from the recipe"
# (flag, type, metavar, what it overrides); every override is validated by PTQConfig.
_OVERRIDES = [
    ("--weight-bits", int, "BITS", "weights.bits, an integer 2-8"),
    ("--act-bits", act_bits_arg, "{BITS,none}", "activations.bits: 2-16, or 'none' for weight-only"),
    (
        "--timestep-groups",
        _timestep_groups,
        "{G,per_step}",
        "activations.timestep_groups: G contiguous timestep groups, each with its own activation "
        "scales, or 'per_step' (one group per sampling step)",
    ),
    ("--num-samples", int, "N", "calibration.num_samples, the recorded (trajectory, step) pairs"),
    (
        "--bias-correction",
        str,
        "{off,layer,output}",
        "bias_correction: per layer and timestep group ('layer'), of the noise prediction ('output')",
    ),
    (
        "--weight-rounding",
        str,
        "{nearest,gptq}",
        "weights.rounding: second-order rounding on the calibration inputs ('gptq') or nearest codes",
    ),
    (
        "--float-layers",
        int,
        "N",
        "keep the N layers ranked most sensitive float (layers.mixed_precision max_layers; 0: none)",
    ),
    (
        "--num-inference-steps",
        int,
        "N",
        "calibration.num_inference_steps; also used for the comparison images (recipe's None: the "
        "pipeline's default)",
    ),
    ("--batch-size", int, "N", "calibration.batch_size"),
    ("--guidance-scale", float, "SCALE", "calibration.guidance_scale (text pipelines; None: the pipeline's)"),
    (
        "--seed",
        int,
        "SEED",
        "calibration.seed (noise, timestep draws, observer subsampling); the comparison images use "
        "SEED + 1 so they are not calibration trajectories",
    ),
]


def add_parser(sub: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    q = sub.add_parser(
        "quantize",
        help="quantize a pipeline's UNet; write config, report, quantizer state and a comparison grid",
        description="Calibrate and fake-quantize the UNet of a diffusers pipeline. Writes ptq_config.json,\n"
        "report.json, report.txt, quantizer_state.safetensors and comparison.png (float images on the top\n"
        "row, quantized below, same noise) into --output, atomically.",
        epilog=_config_epilog(),
        formatter_class=raw,
    )
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} Default: {DEFAULT_MODEL}.")
    recipe = q.add_mutually_exclusive_group()
    recipe.add_argument(
        "--preset",
        metavar="NAME",
        help=f"start from a method preset; choices: {', '.join(available_presets())}. "
        "Default: PTQConfig() defaults.",
    )
    recipe.add_argument(
        "--config", metavar="FILE.json", help="start from a PTQConfig JSON file (fields listed below)."
    )
    for flag, kind, metavar, what in _OVERRIDES:
        q.add_argument(flag, type=kind, metavar=metavar, help=f"override {what}. {_RECIPE}.")
    q.add_argument(
        "--prompt",
        action="append",
        help="calibration prompt for text-conditioned pipelines; repeatable. Prompts are cycled when the "
        f"calibration needs more trajectories than prompts. Default: {len(DEFAULT_PROMPTS)} generic prompts.",
    )
    q.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="text file with one calibration prompt per line (blank lines skipped); added to --prompt.",
    )
    add_pipeline_call_arguments(q, "every calibration and comparison call of the pipeline")
    recon = q.add_argument_group("block reconstruction (presets q-diffusion, eda-dm and tfmq-dm enable it)")
    recon.add_argument(
        "--no-reconstruction",
        action="store_true",
        help="skip the recipe's reconstruction (calibration only).",
    )
    recon.add_argument(
        "--reconstruction-iterations",
        type=int,
        metavar="N",
        help=f"override reconstruction.iterations (optimiser steps per block). {_RECIPE}.",
    )
    recon.add_argument(
        "--reconstruction-act-iterations",
        type=int,
        metavar="N",
        help=f"override reconstruction.act_iterations (step-size pass of 'sequential'). {_RECIPE}.",
    )
    recon.add_argument(
        "--reconstruction-minutes",
        type=float,
        metavar="M",
        help="override reconstruction.max_minutes: a time budget divided across the blocks. Default: none.",
    )
    recon.add_argument(
        "--reconstruction-checkpoint",
        metavar="DIR",
        help="save each finished block here; run the same command again to resume after an interruption.",
    )
    q.add_argument("--device", help="torch device. Default: cuda if available, else cpu.")
    q.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="pipeline dtype; choices: %(choices)s. Default: float32 on cpu, float16 on cuda.",
    )
    q.add_argument("--samples", type=int, default=4, help="images in each row of comparison.png. Default: 4.")
    q.add_argument("--output", required=True, metavar="DIR", help="output directory (required).")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --output. Default: refuse.")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars. Default: show them.")


def _build_config(args: argparse.Namespace) -> PTQConfig:
    overrides = _overrides(args)
    if args.preset is not None:  # through preset(): values published per bit width follow the overrides
        return PTQConfig.preset(args.preset, **overrides)
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        config = PTQConfig.from_json(path.read_text(encoding="utf-8"))
    else:
        config = PTQConfig()
    return config.replace(**overrides) if overrides else config


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.weight_bits is not None:
        overrides["weight_bits"] = args.weight_bits
    if args.act_bits is not None:
        overrides["act_bits"] = None if args.act_bits == "none" else args.act_bits
    if args.timestep_groups is not None:
        overrides["activations"] = {"timestep_groups": args.timestep_groups}
    if args.bias_correction is not None:
        overrides["bias_correction"] = args.bias_correction
    if args.weight_rounding is not None:
        overrides["weights"] = {"rounding": args.weight_rounding}
    if args.float_layers is not None:
        off = {"mode": "off"}
        promote = {"mode": "max_layers", "max_layers": args.float_layers, "high_bits": None}
        overrides["layers"] = {"mixed_precision": promote if args.float_layers > 0 else off}
    names = ("num_samples", "num_inference_steps", "batch_size", "seed", "guidance_scale")
    calib = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if calib:
        overrides["calibration"] = calib
    recon: dict[str, Any] = {}
    if args.no_reconstruction:
        recon["enabled"] = False
    if args.reconstruction_iterations is not None:
        recon["iterations"] = args.reconstruction_iterations
    if args.reconstruction_act_iterations is not None:
        recon["act_iterations"] = args.reconstruction_act_iterations
    if args.reconstruction_minutes is not None:
        recon["max_minutes"] = args.reconstruction_minutes
    if recon:
        overrides["reconstruction"] = recon
    return overrides


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def _images(pipe: Any, kwargs: dict[str, Any], seed: int, which: str, progress: bool) -> np.ndarray:
    """(N, H, W, C) float images in [0, 1] from one pipeline call seeded with `seed`."""
    # The pipeline's own step bar, labelled so the console says what it is.
    pipe.set_progress_bar_config(disable=not progress, desc=f"comparison: {which} images")
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="np").images
    return np.asarray(images, dtype=np.float32)


def save_grid(top: np.ndarray, bottom: np.ndarray, path: str | os.PathLike[str], min_tile: int = 128) -> None:
    """Save a two-row PNG grid (float images on top, quantized below), upscaled to `min_tile` pixels."""
    from PIL import Image

    rows = [np.concatenate(list(row), axis=1) for row in (top, bottom)]
    grid = (np.clip(np.concatenate(rows, axis=0), 0.0, 1.0) * 255).round().astype(np.uint8)
    grid = grid[..., 0] if grid.shape[-1] == 1 else grid
    scale = max(1, min_tile // max(top.shape[1:3]))
    image = Image.fromarray(grid)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def quantizer_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer of every WeightQuantizer/TimestepActQuantizer in `unet`, by state-dict name."""
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, WeightQuantizer | TimestepActQuantizer):
            for key, buf in module.named_buffers(prefix=name, recurse=False):
                state[key] = buf.detach().cpu().contiguous().clone()
    return state


def _write_outputs(tmp: Path, config: PTQConfig, unet: Any, top: np.ndarray, bottom: np.ndarray) -> None:
    from safetensors.torch import save_file

    state = unet.ptq_state
    report = {**state.report.to_dict(), "reconstruction": state.reconstruction}
    text = str(state.report)
    if state.reconstruction is not None:
        text += "\n" + str(ReconstructionReport.from_dict(state.reconstruction))
    (tmp / "ptq_config.json").write_text(config.to_json() + "\n", encoding="utf-8")
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (tmp / "report.txt").write_text(text + "\n", encoding="utf-8")
    meta = {"format": "pt", "diffusers_ptq": __version__, "method": config.method, "tag": config.tag}
    save_file(quantizer_state(unet), str(tmp / "quantizer_state.safetensors"), metadata=meta)
    save_grid(top, bottom, tmp / "comparison.png")


def run(args: argparse.Namespace) -> int:
    try:
        config = _build_config(args)
        out = check_output(args.output, args.overwrite)
        if args.samples < 1:
            raise ValueError(f"--samples={args.samples} is invalid; expected an integer >= 1")
        prompts = _read_prompts(args)
        device, dtype = resolve_device(args.device, args.dtype)
        if distributed.launched():  # torchrun / accelerate launch: one rank per process, one GPU per rank
            distributed.init_from_environment()
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        pipe = load_pipeline(args.model, device, dtype)
        spec = get_pipeline_spec(pipe)
        extra = pipeline_kwargs(args, pipe, spec)
        check_pipeline_kwargs(spec, extra)  # before the float comparison images use them
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        return error(err)

    calib = config.calibration
    call: dict[str, Any] = {}
    if calib.num_inference_steps is not None:
        call["num_inference_steps"] = calib.num_inference_steps
    calib_prompts = None
    if spec.text_conditioned:
        if not prompts:
            prompts = list(DEFAULT_PROMPTS)
            print(f"diffusers-ptq: no --prompt/--prompts-file given; using {len(prompts)} built-in prompts")
        # quantize_pipeline cycles them when calibration needs more trajectories (fresh noise each time).
        calib_prompts = list(prompts)
        call["prompt"] = [prompts[i % len(prompts)] for i in range(args.samples)]
        if calib.guidance_scale is not None:
            call["guidance_scale"] = calib.guidance_scale
    else:
        if prompts:
            print(f"diffusers-ptq: {spec.name} is unconditional; ignoring the prompts")
        if spec.batch_arg is not None:
            call[spec.batch_arg] = args.samples
    # The comparison images use the calibration's call arguments too (after quantize_pipeline checks them).
    compare = {**extra, **call}
    # With a torch.distributed group every rank quantizes; only rank 0 makes the images and writes.
    main = distributed.is_main_process()
    # Before quantizing: the float reference.
    try:
        float_images = _images(pipe, compare, calib.seed + 1, "float", not args.no_progress) if main else None
    except (ValueError, TypeError) as err:  # the pipeline's own check of its arguments (a missing image)
        return error(err)

    try:
        with atomic_directory(out) if main else contextlib.nullcontext() as tmp:
            quantize_pipeline(
                pipe,
                config,
                prompts=calib_prompts,
                pipeline_kwargs=extra or None,
                reconstruction_checkpoint=args.reconstruction_checkpoint,
                progress=not args.no_progress,
            )
            # The other ranks wait here for rank 0's writing; a failure there is raised on every rank.
            with distributed.guard("writing the outputs"):
                if main:
                    quant_images = _images(pipe, compare, calib.seed + 1, "quantized", not args.no_progress)
                    _write_outputs(tmp, config, pipe.unet, float_images, quant_images)
    except (ValueError, TypeError) as err:  # quantize_pipeline's validation of the pipeline and prompts
        return error(err)
    if not main:
        return 0
    if args.no_progress:  # quantize_pipeline prints the report itself when progress is on
        print(pipe.unet.ptq_state.report)
    sqnr = sqnr_db(torch.from_numpy(float_images), torch.from_numpy(quant_images))
    print(f"diffusers-ptq: {args.samples} comparison images, SQNR of quantized vs float: {sqnr:.2f} dB")
    print(f"diffusers-ptq: wrote {out}")
    return 0
