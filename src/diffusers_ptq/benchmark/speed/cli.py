"""Command line of the speed benchmark (`python benchmarks/speed.py`); every option is checked first."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from diffusers_ptq.benchmark.plotting import pyplot
from diffusers_ptq.benchmark.speed.benchmark import SpeedResult, SpeedRowError, run_speed_benchmark
from diffusers_ptq.benchmark.speed.report import markdown_report, write_speed_outputs
from diffusers_ptq.benchmark.speed.settings import (
    DTYPES,
    MODEL_CHOICES,
    ROW_HELP,
    ROWS,
    SpeedSettings,
    parse_models,
)
from diffusers_ptq.cli.common import atomic_directory, check_output, error
from diffusers_ptq.integer import KERNELS

DESCRIPTION = """\
Per-step UNet latency (median of repeated calls after warm-up, with quartiles) and peak memory of
float, diffusers-ptq fake-quant and int8 (eager and torch.compile'd), torchao int8 and optimum-quanto
W8A8, on Stable Diffusion 1.5's UNet (random weights; 64x64 latents, batch 2, text 2x77x768) and the
shipped Fashion-MNIST DDPM. Prints each row's ratio to the float row and writes table.md,
results.json and speed.png into --output, atomically. Rows whose library is missing are skipped with
the reason and its pip install command. Each row's first output is checked against the float model's:
a row that raises or whose output is wrong is reported as an error (--strict: the run then exits 1).

rows:
""" + "\n".join(f"  {name:15s} {text}" for name, text in ROW_HELP.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/speed.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = SpeedSettings()
    p.add_argument(
        "--model",
        default="both",
        help=f"comma-separated, of {', '.join(MODEL_CHOICES)} ('both': sd15,fashion; 'tiny': toy UNets "
        "for plumbing tests). Default: both.",
    )
    p.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)}. Default: all.")
    p.add_argument("--device", help="cpu or cuda[:N]. Default: cuda if available, else cpu.")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        help="float dtype of the rows. Default: float16 on cuda, else float32.",
    )
    p.add_argument(
        "--repeats", type=int, default=d.repeats, help=f"timed calls per row. Default: {d.repeats}."
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=d.warmup,
        help=f"untimed calls after the (also untimed) first call. Default: {d.warmup}.",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"batch of the Fashion model (SD 1.5 runs batch 2). Default: {d.batch_size}.",
    )
    p.add_argument("--kernel", choices=KERNELS, default=d.kernel, help="diffusers_ptq.convert's GEMM kernel.")
    p.add_argument("--compile-mode", default=d.compile_mode, help="torch.compile mode. Default: default.")
    p.add_argument(
        "--calibration-rows",
        type=int,
        default=d.calibration_rows,
        help="synthetic calibration inputs, one per timestep group of the W8A8 recipe (scale values do not "
        f"change the speed). Default: {d.calibration_rows}.",
    )
    p.add_argument(
        "--weight-bits",
        type=int,
        default=d.weight_bits,
        help="weight bits of the diffusers-ptq rows (activations 8): 8, or 4 (packed; on a CPU without VNNI "
        f"no split GEMMs). torchao and quanto stay W8A8. Default: {d.weight_bits}.",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (required).")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output. Default: refuse.")
    p.add_argument("--traceback", action="store_true", help="print the traceback of a row that fails.")
    p.add_argument(
        "--strict",
        action="store_true",
        help="CI: exit 1 (after writing the outputs) when a row is in error, i.e. it raised or its output "
        "differs from the float model's; a missing optional library stays a skip. Default: report only.",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> SpeedSettings:
    rows = list(ROWS) if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    settings = SpeedSettings(
        models=parse_models(args.model),
        rows=rows,
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
        warmup=args.warmup,
        batch_size=args.batch_size,
        kernel=args.kernel,
        compile_mode=args.compile_mode,
        calibration_rows=args.calibration_rows,
        weight_bits=args.weight_bits,
        verbose_errors=args.traceback,
        strict=args.strict,
    )
    settings.validate()
    return settings


def ratio_summary(result: SpeedResult) -> str:
    lines = []
    for model in result.models:
        for row in model.rows:
            if row.ok and row.speedup is not None and row.id != "float":
                memory = "" if row.memory_ratio is None else f", peak memory {row.memory_ratio:.2f}x"
                lines.append(f"{model.name}: {row.label}: {row.speedup:.2f}x the float speed{memory}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        out = check_output(args.output, args.overwrite)
        pyplot()  # the plot is written last: a missing matplotlib must stop the run before any work
    except (ValueError, TypeError, OSError, ImportError) as err:
        return error(err)
    torch.set_flush_denormal(True)  # random weights produce denormals that stall CPU float math
    failure: SpeedRowError | None = None
    try:
        result = run_speed_benchmark(settings)
    except SpeedRowError as err:  # --strict: the outputs are still written, then the run fails
        result, failure = err.result, err
    command = "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in argv)
    with atomic_directory(out) as tmp:
        write_speed_outputs(result, tmp, command)
    print()
    print(markdown_report(result))
    print(ratio_summary(result))
    print(f"speed benchmark: wrote {out} ({result.device})")
    if failure is not None:
        print(f"speed benchmark: error (--strict): {failure}", file=sys.stderr)
        return 1
    for line in result.errors():
        print(f"speed benchmark: error: {line}", file=sys.stderr)
    return 0
