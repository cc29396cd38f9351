"""`diffusers-ptq inspect --sensitivity`: rank layers and groups by the noise error quantizing them adds."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from diffusers_ptq import available_presets
from diffusers_ptq.benchmark.plotting import pyplot
from diffusers_ptq.calibration import get_pipeline_spec
from diffusers_ptq.cli.common import (
    DEFAULT_PROMPTS,
    act_bits_arg,
    atomic_directory,
    check_output,
    error,
    load_pipeline,
    resolve_device,
)
from diffusers_ptq.cli.pipeline_args import pipeline_kwargs
from diffusers_ptq.config import PTQConfig
from diffusers_ptq.sensitivity import measure_sensitivity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --sensitivity flag and the recipe options it reads (added to `inspect`)."""
    group = parser.add_argument_group(
        "per-layer sensitivity (--sensitivity)",
        "Quantize one layer (or one group: special layers, embeddings, attention, time path, each block) "
        "at a time on top of the float UNet, with the recipe's bits and calibrated scales, and rank them by "
        "the noise-prediction error and its bias per step. Writes sensitivity.png, sensitivity.json and "
        "table.md. --num-inference-steps and --seed set the calibration run.",
    )
    group.add_argument("--sensitivity", action="store_true", help="rank layers by quantization sensitivity.")
    recipe = group.add_mutually_exclusive_group()
    recipe.add_argument(
        "--preset", metavar="NAME", help=f"recipe preset; choices: {', '.join(available_presets())}."
    )
    recipe.add_argument("--config", metavar="FILE.json", help="recipe from a PTQConfig JSON file.")
    group.add_argument("--weight-bits", type=int, metavar="BITS", help="override weights.bits.")
    group.add_argument(
        "--act-bits",
        type=act_bits_arg,
        metavar="{BITS,none}",
        help="override activations.bits ('none': weight-only).",
    )
    group.add_argument(
        "--num-samples", type=int, default=64, help="calibration samples (trajectory, step). Default: 64."
    )
    group.add_argument(
        "--max-rows",
        type=int,
        help="measure each unit on this many calibration rows (evenly spread). Default: all.",
    )
    group.add_argument(
        "--rank-by", choices=("mse", "bias"), default="mse", help="ranking metric. Default: mse."
    )
    group.add_argument("--top", type=int, default=12, help="layers in the plot. Default: 12.")
    group.add_argument("--threads", type=int, help="torch CPU threads. Default: torch's.")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars.")


def _config(args: argparse.Namespace) -> PTQConfig:
    overrides: dict[str, Any] = {}
    if args.weight_bits is not None:
        overrides["weight_bits"] = args.weight_bits
    if args.act_bits is not None:
        overrides["act_bits"] = None if args.act_bits == "none" else args.act_bits
    overrides["calibration"] = {
        "num_samples": args.num_samples,
        "num_inference_steps": args.num_inference_steps,
        "seed": args.seed,
    }
    if args.preset is not None:
        return PTQConfig.preset(args.preset, **overrides)
    if args.config is not None:
        with open(args.config, encoding="utf-8") as f:
            return PTQConfig.from_json(f.read()).replace(**overrides)
    return PTQConfig().replace(**overrides)


def run(args: argparse.Namespace) -> int:
    try:
        for name in ("num_samples", "num_inference_steps", "top", "max_rows", "threads"):
            if getattr(args, name) is None:
                continue
            if getattr(args, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag}={getattr(args, name)} is invalid; expected >= 1")
        config = _config(args)
        out = check_output(args.output, args.overwrite)
        pyplot()  # the plot is written last: a missing matplotlib must stop the run before any work
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        device, dtype = resolve_device(args.device, args.dtype)
        pipe = load_pipeline(args.model, device, dtype)
        spec = get_pipeline_spec(pipe)
        prompts = None
        if spec.text_conditioned:
            base = args.prompt or DEFAULT_PROMPTS
            prompts = [base[i % len(base)] for i in range(max(len(base), args.num_samples))]
        report = measure_sensitivity(
            pipe,
            config,
            prompts=prompts,
            pipeline_kwargs=pipeline_kwargs(args, pipe, spec) or None,
            max_rows=args.max_rows,
            metric=args.rank_by,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError, OSError, ImportError) as err:
        return error(err)
    with atomic_directory(out) as tmp:
        report.plot(tmp / "sensitivity.png", args.top)
        (tmp / "sensitivity.json").write_text(json.dumps(report.to_dict()) + "\n", encoding="utf-8")
        text = (
            f"# Quantization sensitivity ({report.tag}, {config.method}, ranked by {report.metric}, "
            f"{report.rows} calibration rows)\n\n## Layers\n\n{report.table(('layer', 'attention'))}\n\n"
            f"## Groups\n\n{report.table('group')}\n"
        )
        (tmp / "table.md").write_text(text, encoding="utf-8")
    layers = report.ranked(("layer", "attention"))
    print(f"diffusers-ptq: sensitivity of {len(layers)} layers at {report.tag}, ranked by {report.metric}")
    for rank, unit in enumerate(layers[:5], start=1):
        numbers = f"noise MSE {unit.mse:.3g}, SQNR {unit.sqnr_db:.1f} dB, bias {unit.bias:.3g}"
        print(f"  {rank}. {unit.name}: {numbers}")
    print(f"diffusers-ptq: wrote {out}")
    return 0
