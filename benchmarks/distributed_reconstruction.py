"""Data-parallel calibration on N CPU processes against one: wall time, FD and noise SQNR.

The same `quantize_pipeline` call (the default recipe at the given bits with block reconstruction at a
fixed iteration count) runs in one process with one torch thread, then on `--world` processes of a Gloo
group on the loopback address, one thread each. Rank 0 reports the stage times and, after the timed part,
samples DDIM images for FD and measures the per-step noise SQNR on float trajectories. Use a machine with
at least `--world` idle cores.

    python benchmarks/distributed_reconstruction.py --model fashion --bits W4A8 --iterations 200 \
        --act-iterations 100 --samplings stratified,random \
        --output benchmarks/results/distributed_reconstruction.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_io import cpu_rank, handoff_file, spawn_ranks, write_json  # noqa: E402
from variance_absorption import MODELS, fidelity_for, parse_bits  # noqa: E402


def _config(args: argparse.Namespace, sampling: str):
    from diffusers_ptq import PTQConfig

    w, a = args.bits
    reconstruction = {
        "enabled": True,
        "iterations": args.iterations,
        "act_iterations": args.act_iterations,
        "batch_sampling": sampling,
    }
    # Capture splits pipeline calls among ranks; the default recipe makes one call for all trajectories
    # (3 on the shipped model). Here one call per trajectory, in both runs: the same calibration set.
    calibration = {"num_inference_steps": args.steps, "batch_size": args.calibration_batch_size}
    if args.calibration_samples is not None:
        calibration["num_samples"] = args.calibration_samples
    return PTQConfig(weight_bits=w, act_bits=a, calibration=calibration, reconstruction=reconstruction)


def _sample(pipe, args: argparse.Namespace) -> torch.Tensor:
    import numpy as np

    from diffusers_ptq.benchmark.quality.sampling import image_generators

    pipe.set_progress_bar_config(disable=True)
    chunks = []
    for start in range(0, args.num_samples, args.batch_size):
        count = min(args.batch_size, args.num_samples - start)
        out = pipe(
            batch_size=count,
            generator=image_generators(args.seed, start, count),
            num_inference_steps=args.steps,
            output_type="np",
        ).images
        chunks.append(torch.from_numpy(np.asarray(out, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(chunks)


def _quality(pipe, float_pipe, args: argparse.Namespace) -> dict:
    from diffusers_ptq.benchmark.quality.sampling import (
        noise_errors_per_step,
        pooled_sqnr_db,
        record_trajectory,
    )

    trajectory = record_trajectory(float_pipe, args.sqnr_samples, args.seed + 1, args.steps)
    errors = noise_errors_per_step(pipe.unet, trajectory)
    metrics = fidelity_for(args.model).compute(_sample(pipe, args))
    return {"FD": metrics["FD"], "noise_sqnr_db": round(pooled_sqnr_db(trajectory, errors.mse), 3)}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, sampling: str, out: str) -> None:
    cpu_rank(rank, world, port)
    from diffusers_ptq import quantize_pipeline
    from diffusers_ptq.benchmark.quality.sampling import ddim_pipeline, fresh_pipeline
    from diffusers_ptq.cli.common import load_pipeline

    float_pipe = ddim_pipeline(load_pipeline(args.model, torch.device("cpu"), torch.float32))
    pipe = fresh_pipeline(float_pipe)
    start = time.perf_counter()
    quantize_pipeline(pipe, _config(args, sampling), progress=False)
    total = time.perf_counter() - start
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    state = pipe.unet.ptq_state
    recon = state.reconstruction
    row = {
        "processes": world,
        "batch_sampling": sampling,
        "quantize_s": round(total, 1),
        "reconstruction_s": round(recon["seconds"], 1),
        "reconstruction_train_s": round(sum(u.get("train_seconds") or 0.0 for u in recon["units"]), 1),
        # Of those, waiting for the gradient sums (rank 0): what the collective costs beyond the overlap.
        "reconstruction_exchange_s": round(sum(u.get("exchange_seconds") or 0.0 for u in recon["units"]), 1),
        "gptq_s": round((state.gptq or {}).get("seconds", 0.0), 1),
        "sensitivity_s": round((state.report.mixed_precision or {}).get("seconds", 0.0), 1),
        "rows_per_rank": recon.get("rows_per_rank"),
        "units_kept": sum(u["status"] == "trained" for u in recon["units"]),
        "model_reverted": recon["model_reverted"],
    }
    row.update(_quality(pipe, float_pipe, args))
    Path(out).write_text(json.dumps(row))


def run(world: int, args: argparse.Namespace, sampling: str) -> dict:
    with handoff_file() as out:  # rank 0 writes its row here
        spawn_ranks(worker, world, args, sampling, str(out))
        row = json.loads(out.read_text())
    print(json.dumps(row), file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--bits", type=parse_bits, default=(4, 8), help="Default: W4A8.")
    parser.add_argument("--world", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument("--iterations", type=int, default=200, help="AdaRound steps per block")
    parser.add_argument("--act-iterations", type=int, default=100, help="step-size steps per block")
    parser.add_argument("--samplings", default="stratified", help="comma-separated batch_sampling values")
    parser.add_argument("--calibration-samples", type=int, default=None)
    parser.add_argument(
        "--calibration-batch-size", type=int, default=1, help="trajectories per calibration pipeline call"
    )
    parser.add_argument("--num-samples", type=int, default=250, help="images for FD")
    parser.add_argument("--sqnr-samples", type=int, default=32, help="float trajectories for the SQNR")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps (sampling and calibration)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error(f"--world {args.world}: needs at least 2 processes")
    samplings = [s.strip() for s in args.samplings.split(",") if s.strip()]
    rows = []
    started = time.perf_counter()
    for sampling in samplings:
        one = run(1, args, sampling)
        many = run(args.world, args, sampling)
        many["speedup_quantize"] = round(one["quantize_s"] / many["quantize_s"], 2)
        many["speedup_reconstruction"] = round(one["reconstruction_s"] / many["reconstruction_s"], 2)
        rows += [one, many]
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    from diffusers_ptq.benchmark.quality.sampling import ddim_pipeline
    from diffusers_ptq.cli.common import load_pipeline

    float_pipe = ddim_pipeline(load_pipeline(args.model, torch.device("cpu"), torch.float32))
    float_fd = fidelity_for(args.model).compute(_sample(float_pipe, args))["FD"]
    for row in rows:
        row["FD_vs_float_pct"] = round(100 * (row["FD"] / float_fd - 1), 1)
    result = {
        "command": " ".join(["python", "benchmarks/distributed_reconstruction.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread per process, Gloo",
        "torch": torch.__version__,
        "model": args.model,
        "bits": f"W{args.bits[0]}A{args.bits[1]}",
        "float_FD": float_fd,
        "rows": rows,
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
