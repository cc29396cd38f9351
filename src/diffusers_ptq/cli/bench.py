"""`diffusers-ptq bench`: generation quality of float vs each preset x bit setting, on identical noise."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import time
from typing import Any

import torch

from diffusers_ptq.benchmark.fashion import FashionFidelity, matches_fashion_model
from diffusers_ptq.benchmark.inception import (
    CombinedFidelity,
    InceptionFidelity,
    inception_unavailable_reason,
)
from diffusers_ptq.benchmark.quality import check_unconditional, run_quality_benchmark
from diffusers_ptq.benchmark.report import markdown_table, reference_table, write_outputs
from diffusers_ptq.benchmark.settings import BenchSettings
from diffusers_ptq.cli.common import (
    DEFAULT_MODEL,
    FASHION_MODEL,
    MODEL_HELP,
    atomic_directory,
    check_output,
    error,
    load_pipeline,
    resolve_device,
)
from diffusers_ptq.zoo.data import load_fashion_mnist


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_parser(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="quality benchmark: FD/IS/noise SQNR of float vs every preset at W8A8/W6A6/W4A8",
        description="Sample the float model and each (preset, bit setting) with DDIM on the same noise\n"
        "seeds; "
        "write table.md, results.json, reference.md (what the metric says of real data and noise),\n"
        "grids/<row>.png and sqnr_per_step.png into --output, atomically. FD/IS need the shipped\n"
        "Fashion-MNIST classifier, so they are measured for --model fashion only; other unconditional\n"
        "models get the noise SQNR alone.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default = BenchSettings()
    b.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} Default: {DEFAULT_MODEL}.")
    b.add_argument(
        "--presets", type=_names, help=f"comma-separated presets. Default: {','.join(default.presets)}."
    )
    b.add_argument(
        "--bits", type=_names, help=f"comma-separated bit settings. Default: {','.join(default.bits)}."
    )
    b.add_argument(
        "--num-samples", type=int, help=f"images per seed and row. Default: {default.num_samples}."
    )
    b.add_argument("--seeds", type=_ints, help="comma-separated noise seeds. Default: 0,1.")
    b.add_argument("--num-inference-steps", type=int, help="DDIM steps. Default: 100.")
    b.add_argument("--batch-size", type=int, help=f"images per pipeline call. Default: {default.batch_size}.")
    b.add_argument(
        "--sqnr-samples", type=int, help="float trajectories for per-step noise SQNR. Default: 32."
    )
    b.add_argument(
        "--calibration-samples",
        type=int,
        help="override each preset's calibration size. Default: the preset's.",
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="CI size: every row, 48 images, one seed, 128 calibration samples (explicit flags still win).",
    )
    b.add_argument("--device", help="torch device. Default: cuda if available, else cpu.")
    b.add_argument("--output", required=True, metavar="DIR", help="output directory (required).")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --output. Default: refuse.")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars.")


def _settings(args: argparse.Namespace) -> BenchSettings:
    names = (
        "presets", "bits", "num_samples", "seeds", "num_inference_steps", "batch_size", "sqnr_samples",
        "calibration_samples",
    )  # fmt: skip
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    settings = BenchSettings.quick(**overrides) if args.quick else BenchSettings(**overrides)
    settings.validate()
    return settings


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {threads} torch threads), torch {torch.__version__}"


def _header(args: argparse.Namespace, settings: BenchSettings, device: torch.device, seconds: float) -> str:
    command = "diffusers-ptq " + " ".join(shlex.quote(a) for a in args.argv)
    seeds = ", ".join(map(str, settings.seeds))
    return (
        f"Command: `{command}`  \n"
        f"Model: {args.model}; DDIM {settings.num_inference_steps} steps, eta 0; "
        f"{settings.num_samples} images x {len(settings.seeds)} seeds ({seeds}) "
        f"per row, same noise in every row; noise SQNR on {settings.sqnr_samples} float trajectories.  \n"
        f"Machine: {machine_description(device)}; total {seconds / 60:.1f} min.\n\n"
    )


def _fidelity(model: str, pipe: Any) -> tuple[Any, FashionFidelity | None, list[str]]:
    """The shipped classifier's FD/IS for the shipped model, plus real Inception FID when possible."""
    if model != FASHION_MODEL or not matches_fashion_model(pipe):
        print(f"diffusers-ptq: no classifier matches {model}: FD/IS skipped, noise SQNR still measured")
        return None, None, []
    fashion = FashionFidelity()
    reason = inception_unavailable_reason()
    if reason is None:
        try:
            real, _ = load_fashion_mnist("test")
        except FileNotFoundError as err:
            reason = f"real FID/IS skipped: {err}"
        else:
            return CombinedFidelity(fashion, InceptionFidelity(real)), fashion, []
    print(f"diffusers-ptq: {reason}")
    return fashion, fashion, [reason]


def run(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        out = check_output(args.output, args.overwrite)
        device, _ = resolve_device(args.device, "float32")
        pipe = load_pipeline(args.model, device, torch.float32)
        check_unconditional(pipe)
    except (ValueError, TypeError, OSError) as err:
        return error(err)
    fidelity, fashion, notes = _fidelity(args.model, pipe)
    start = time.perf_counter()
    result = run_quality_benchmark(pipe, settings, fidelity, progress=not args.no_progress)
    result.notes += notes
    header = _header(args, settings, device, time.perf_counter() - start)
    with atomic_directory(out) as tmp:
        write_outputs(result, tmp, header)
        if fashion is not None:
            table = reference_table(fashion.reference_rows(settings.num_samples), result)
            (tmp / "reference.md").write_text(table, encoding="utf-8")
    print(header + markdown_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(f"diffusers-ptq: wrote {out}")
    return 0
