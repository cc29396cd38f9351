"""`diffusers-ptq bench`: generation quality of float vs each preset x bit setting, on identical noise."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import time
from typing import Any

import torch

from diffusers_ptq.benchmark.ablation.benchmark import run_ablation
from diffusers_ptq.benchmark.ablation.report import ablation_table, write_ablation_outputs
from diffusers_ptq.benchmark.ablation.settings import AblationSettings
from diffusers_ptq.benchmark.metrics.colour_fashion import ColourFashionFidelity, matches_colour_model
from diffusers_ptq.benchmark.metrics.fashion import FashionFidelity, matches_fashion_model
from diffusers_ptq.benchmark.metrics.inception import (
    CombinedFidelity,
    InceptionFidelity,
    inception_unavailable_reason,
)
from diffusers_ptq.benchmark.plotting import pyplot
from diffusers_ptq.benchmark.quality.benchmark import (
    check_pipeline_prompts,
    check_unconditional,
    row_configs,
    run_quality_benchmark,
)
from diffusers_ptq.benchmark.quality.report import markdown_table, reference_table, write_outputs
from diffusers_ptq.benchmark.quality.settings import QUICK_RECONSTRUCTION_MINUTES, BenchSettings
from diffusers_ptq.calibration import get_pipeline_spec
from diffusers_ptq.cli.bench_ablation import (
    ABLATION_ONLY,
    ablation_settings,
    add_ablation_arguments,
    comma_names,
)
from diffusers_ptq.cli.bench_text import (
    add_text_arguments,
    check_model_prompts,
    model_text_conditioned,
    text_overrides,
)
from diffusers_ptq.cli.common import (
    COLOUR_MODEL,
    DEFAULT_MODEL,
    FASHION_MODEL,
    MODEL_HELP,
    atomic_directory,
    check_output,
    error,
    load_pipeline,
    resolve_device,
)
from diffusers_ptq.zoo.data import load_colour_fashion, load_fashion_mnist

# Each shipped model's FD/IS metric, the check that a pipeline generates its images, and its real test images
# (for Inception FID when those weights are on disk).
_ZOO_FIDELITY = {
    FASHION_MODEL: (FashionFidelity, matches_fashion_model, lambda: load_fashion_mnist("test")[0]),
    COLOUR_MODEL: (ColourFashionFidelity, matches_colour_model, lambda: load_colour_fashion("test")[0]),
}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def add_parser(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="quality benchmark: FD/IS/noise SQNR of float vs every preset at W8A8/W6A6/W4A8",
        description="Sample the float model and each (preset, bit setting) with DDIM on the same noise\n"
        "seeds; "
        "write table.md, results.json, reference.md (what the metric says of real data and noise),\n"
        "grids/<row>.png and sqnr_per_step.png into --output, atomically. FD/IS need a shipped\n"
        "classifier, so they are measured for --model fashion and colour-fashion only; other\n"
        "unconditional models get the noise SQNR alone. Text-to-image models (Stable Diffusion\n"
        "1.x/2.x, SDXL) take --prompts FILE and get the CLIP score when torchmetrics and cached CLIP\n"
        "weights are present.\n"
        "--ablation groups|selectors|w4 runs the timestep-group, the calibration-selector or the\n"
        "4-bit-weight ablation instead (its own table.md, results.json, plot and grids).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default = BenchSettings()
    b.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} Default: {DEFAULT_MODEL}.")
    b.add_argument(
        "--presets", type=comma_names, help=f"comma-separated presets. Default: {','.join(default.presets)}."
    )
    b.add_argument(
        "--bits", type=comma_names, help=f"comma-separated bit settings. Default: {','.join(default.bits)}."
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
        "--calibration-seed",
        type=int,
        help="seed of every row's calibration draw (its trajectories' noise, the observers' subsample); "
        "--seeds sets the sampling noise. Default: 0.",
    )
    b.add_argument(
        "--reconstruction-minutes",
        type=float,
        help="per-row time budget of block reconstruction, applied as reconstruction.max_minutes to rows "
        "whose preset enables reconstruction; with --ablation w4, the cap of its rows that reconstruct. "
        f"Default: the preset's own; w4: 5 (--quick: {QUICK_RECONSTRUCTION_MINUTES}; --ablation w4 --quick: "
        "0.05).",
    )
    b.add_argument(
        "--no-reconstruction",
        action="store_true",
        default=None,
        help="run every preset with block reconstruction off (q-diffusion reconstructs by default at the "
        "published iteration counts, about 11 h per row on 2 CPU cores); the table's notes say so. "
        "Not with --reconstruction-minutes.",
    )
    b.add_argument(
        "--compare-quanto",
        action="store_true",
        default=None,
        help="add a row with optimum-quanto's own W8A8 (quantize + Calibration over the q-diffusion row's "
        "calibration trajectories, then freeze); needs pip install 'diffusers-ptq[compare]', else the "
        "row is skipped with a note.",
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="CI size: every row and DDIM 100 as in the full run, but 32 images, one seed, 64 calibration "
        f"samples, 4 SQNR trajectories and {QUICK_RECONSTRUCTION_MINUTES} min of block reconstruction per "
        "reconstruction row (minutes on 2 CPU cores; it shows every row runs, not how good it is). "
        "With --ablation: every row of the study at toy sizes (DDIM 20, 16 images, calibration sizes "
        "16/32, one search epoch), a smoke test. Explicit flags still win.",
    )
    add_text_arguments(b, default)
    add_ablation_arguments(b)
    b.add_argument("--device", help="torch device. Default: cuda if available, else cpu.")
    b.add_argument("--output", required=True, metavar="DIR", help="output directory (required).")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --output. Default: refuse.")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars.")


def _settings(args: argparse.Namespace) -> BenchSettings:
    for option in ABLATION_ONLY:
        if getattr(args, option.lstrip("-").replace("-", "_")) is not None:
            raise ValueError(
                f"{option} applies to --ablation runs only; add --ablation groups, selectors or w4"
            )
    names = (
        "presets", "bits", "num_samples", "seeds", "num_inference_steps", "batch_size", "sqnr_samples",
        "calibration_samples", "calibration_seed", "reconstruction_minutes", "compare_quanto",
    )  # fmt: skip
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.no_reconstruction:
        if args.reconstruction_minutes is not None:
            raise ValueError(
                "--reconstruction-minutes applies only with reconstruction; drop it or --no-reconstruction"
            )
        overrides["reconstruction"] = False
    overrides.update(text_overrides(args))
    settings = BenchSettings.quick(**overrides) if args.quick else BenchSettings(**overrides)
    settings.validate()
    row_configs(settings)  # every recipe is built (and validated) before any model is loaded
    return settings


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {threads} torch threads), torch {torch.__version__}"


def _header(
    args: argparse.Namespace, settings: BenchSettings | AblationSettings, device: torch.device, seconds: float
) -> str:
    command = "diffusers-ptq " + " ".join(shlex.quote(a) for a in args.argv)
    seeds = ", ".join(map(str, settings.seeds))
    prompts = getattr(settings, "prompts", None)
    text = "" if prompts is None else f"{len(prompts)} prompts, guidance scale {settings.guidance_scale}; "
    draws = getattr(settings, "calibration_seeds", None) or [getattr(settings, "calibration_seed", 0)]
    calibration = f"calibration seed{'s' if len(draws) > 1 else ''} {', '.join(map(str, draws))}"
    return (
        f"Command: `{command}`  \n"
        f"Model: {args.model}; DDIM {settings.num_inference_steps} steps, eta 0; {text}"
        f"{settings.num_samples} images x {len(settings.seeds)} seeds ({seeds}) "
        f"per row, same noise in every row; {calibration}; noise SQNR on {settings.sqnr_samples} float "
        "trajectories.  \n"
        f"Machine: {machine_description(device)}; total {seconds / 60:.1f} min.\n\n"
    )


def _fidelity(model: str, pipe: Any) -> tuple[Any, FashionFidelity | None, list[str]]:
    """The shipped classifier's FD/IS for a shipped model, plus real Inception FID when possible."""
    metric, matches, real_images = _ZOO_FIDELITY.get(model, (None, None, None))
    if metric is None or not matches(pipe):
        print(f"diffusers-ptq: no classifier matches {model}: FD/IS skipped, noise SQNR still measured")
        return None, None, []
    fashion = metric()
    reason = inception_unavailable_reason()
    if reason is None:
        try:
            real = real_images()
        except FileNotFoundError as err:
            reason = f"real FID/IS skipped: {err}"
        else:
            return CombinedFidelity(fashion, InceptionFidelity(real)), fashion, []
    print(f"diffusers-ptq: {reason}")
    return fashion, fashion, [reason]


def _prepare(args: argparse.Namespace, build_settings: Any) -> tuple[Any, Any, Any, Any]:
    """Settings, output directory, device and pipeline, each checked before any model runs."""
    settings = build_settings(args)
    pyplot()  # the plot is written last: a missing matplotlib must stop the run before any work
    out = check_output(args.output, args.overwrite)
    device, _ = resolve_device(args.device, "float32")
    if not isinstance(settings, BenchSettings):  # the ablations: unconditional models only
        pipe = load_pipeline(args.model, device, torch.float32)
        check_unconditional(pipe)
        return settings, out, device, pipe
    check_model_prompts(args.model, model_text_conditioned(args.model), settings.prompts)
    pipe = load_pipeline(args.model, device, torch.float32)
    # Again on the loaded pipeline: a Hub model's class may not have been known before loading.
    check_model_prompts(args.model, get_pipeline_spec(pipe).text_conditioned, settings.prompts)
    check_pipeline_prompts(pipe, settings.prompts)
    return settings, out, device, pipe


def run(args: argparse.Namespace) -> int:
    if args.ablation is not None:
        return run_ablation_command(args)
    try:
        settings, out, device, pipe = _prepare(args, _settings)
    except (ValueError, TypeError, OSError, ImportError) as err:
        return error(err)
    fidelity, fashion, notes = (None, None, []) if settings.prompts else _fidelity(args.model, pipe)
    start = time.perf_counter()
    result = run_quality_benchmark(pipe, settings, fidelity, progress=not args.no_progress)
    result.notes += notes
    header = _header(args, settings, device, time.perf_counter() - start)
    with atomic_directory(out) as tmp:
        write_outputs(result, tmp, header)
        if fashion is not None:
            table = reference_table(fashion.reference_rows(settings.num_samples), result)
            (tmp / "reference.md").write_text(table, encoding="utf-8")
    return _report(header + markdown_table(result), result.notes, out)


def run_ablation_command(args: argparse.Namespace) -> int:
    try:
        settings, out, device, pipe = _prepare(args, ablation_settings)
    except (ValueError, TypeError, OSError, ImportError) as err:
        return error(err)
    fidelity, _, notes = _fidelity(args.model, pipe)
    start = time.perf_counter()
    result = run_ablation(pipe, settings, fidelity, progress=not args.no_progress)
    result.notes += notes
    header = _header(args, settings, device, time.perf_counter() - start)
    with atomic_directory(out) as tmp:
        write_ablation_outputs(result, tmp, header)
    return _report(header + ablation_table(result), result.notes, out)


def _report(table: str, notes: list[str], out: Any) -> int:
    """Print the table and the notes, say where the results went; the command's exit status."""
    print(table)
    for note in notes:
        print(f"note: {note}")
    print(f"diffusers-ptq: wrote {out}")
    return 0
