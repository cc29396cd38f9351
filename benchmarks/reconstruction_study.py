"""Block reconstruction at W4A8 on the shipped Fashion-MNIST DDPM: calibration only vs BRECQ vs EDA-DM FBR
vs TFMQ-DM, on the same quantizers, calibration samples and per-image noise (issue 6's targets).

Rows (all W4A8 on the q-diffusion preset's quantizers and calibration; only `reconstruction` differs):
- calibration only: reconstruction off.
- BRECQ (Q-Diffusion): AdaRound `--iterations` per block with activations float, then `--act-iterations`
  of LSQ step sizes (the preset's losses, lr and regulariser schedule).
- FBR (EDA-DM): the eda-dm preset's joint pass (W4A8 learning rates 0.5 / 5e-4, cosine, QDrop 0.5,
  gamma 0.8, no regulariser) for `--iterations + --act-iterations` steps: the same optimiser steps as BRECQ.
- TFMQ-DM: BRECQ with the temporal block first and per-step activation scales (the tfmq-dm preset).

    OMP_NUM_THREADS=1 python benchmarks/reconstruction_study.py --iterations 300 --act-iterations 75 \
        --num-samples 250 --output benchmarks/results/reconstruction

Writes table.md, results.json, grids/ and sqnr_per_step.png (as `diffusers-ptq bench`) plus
reconstruction.json (per row: block losses before/after, iterations, seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from diffusers_ptq import PTQConfig
from diffusers_ptq.benchmark.metrics.fashion import FashionFidelity
from diffusers_ptq.benchmark.quality.benchmark import BenchResult, RowResult, RowSpec, run_rows
from diffusers_ptq.benchmark.quality.report import markdown_table, write_outputs
from diffusers_ptq.benchmark.quality.sampling import ddim_pipeline, record_trajectory
from diffusers_ptq.benchmark.quality.settings import BenchSettings
from diffusers_ptq.cli.common import atomic_directory, check_output
from diffusers_ptq.zoo.models import fashion_ddpm_pipeline


def row_configs(args: argparse.Namespace) -> dict[str, PTQConfig]:
    """Row name -> recipe; every row shares the q-diffusion quantizers and calibration samples."""
    calibration = {"num_samples": args.calibration_samples, "num_inference_steps": args.steps}
    base = {"weight_bits": 4, "act_bits": 8, "calibration": calibration}
    brecq = {"iterations": args.iterations, "act_iterations": args.act_iterations}
    fbr = PTQConfig.preset("eda-dm", weight_bits=4, act_bits=8).reconstruction.replace(
        iterations=args.iterations + args.act_iterations
    )
    tfmq = PTQConfig.preset("tfmq-dm", **base, reconstruction=brecq)
    return {
        "calibration only": PTQConfig.preset("q-diffusion", **base, reconstruction={"enabled": False}),
        "BRECQ (q-diffusion)": PTQConfig.preset("q-diffusion", **base, reconstruction=brecq),
        "FBR (eda-dm)": PTQConfig.preset("q-diffusion", **base, reconstruction=fbr, method="fbr"),
        "TFMQ-DM": tfmq.replace(calibration=calibration),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=300, help="AdaRound steps per block (BRECQ)")
    parser.add_argument("--act-iterations", type=int, default=75, help="step-size steps per block (BRECQ)")
    parser.add_argument("--num-samples", type=int, default=250, help="generated images per row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps (sampling and calibration)")
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--rows", nargs="+", help="run only these rows (names as in the table)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    for name in ("iterations", "act_iterations", "num_samples", "steps", "calibration_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_flush_denormal(True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configs = row_configs(args)
    unknown = sorted(set(args.rows or []) - set(configs))
    if unknown:
        parser.error(f"unknown --rows {unknown}; valid: {list(configs)}")
    if args.rows:
        configs = {name: cfg for name, cfg in configs.items() if name in args.rows}
    out = check_output(args.output, args.overwrite)
    settings = BenchSettings(
        presets=["q-diffusion"],
        bits=["W4A8"],
        num_samples=args.num_samples,
        seeds=args.seeds,
        num_inference_steps=args.steps,
        batch_size=min(args.num_samples, 125),
        calibration_samples=args.calibration_samples,
    )
    started = time.perf_counter()
    float_pipe = ddim_pipeline(fashion_ddpm_pipeline("ddim"))
    fidelity = FashionFidelity()
    trajectory = record_trajectory(float_pipe, settings.sqnr_samples, args.seeds[0], args.steps)
    specs = [RowSpec(RowResult("float", None, None, None))]
    specs += [RowSpec(RowResult(name, cfg.method, 4, 8), cfg) for name, cfg in configs.items()]

    def log(row: RowResult) -> None:
        summary = f"FD {row.mean('FD')}, SQNR {row.sqnr_db}, calibration {row.calibration_s} s"
        print(f"{row.name}: {summary}", flush=True)

    rows, grids = run_rows(
        specs, float_pipe, settings, trajectory, fidelity, progress=True, desc="rows", on_row=log
    )
    recon = {row.name: row.calibration_info.get("reconstruction") for row in rows}
    result = BenchResult(
        settings=settings,
        rows=rows,
        timesteps=[int(t) for t in trajectory.timesteps],
        grids=grids,
        fidelity=fidelity.name,
    )
    header = (
        f"Command: `{shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}`\n\n"
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; wall time {(time.perf_counter() - started) / 60:.1f} min\n\n"
    )
    with atomic_directory(out) as tmp:
        write_outputs(result, tmp, header)
        (tmp / "reconstruction.json").write_text(json.dumps(recon, indent=1) + "\n", encoding="utf-8")
    print(header + markdown_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
