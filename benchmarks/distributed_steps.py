"""Where a data-parallel reconstruction step's time goes: 1 process against N, step by step.

Block reconstruction alone is timed (W4A8 on the shipped model, nearest rounding, no mixed precision, no
sampling check, stratified batches, a fixed iteration count), in one process with one torch thread and on
`--world` Gloo processes on the loopback address, one thread each. Under the process group every rank
records, for each optimiser step, the seconds before its gradient sum (its own work) and inside it. Per
step, the rank arriving last waits only for the collective itself; what the first one waits beyond that is
the ranks' imbalance. Quality is not measured (`distributed_reconstruction.py` does that).

    python benchmarks/distributed_steps.py --iterations 100 --act-iterations 50 \
        --output benchmarks/results/distributed_steps.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_io import cpu_rank, handoff_file, spawn_ranks, write_json  # noqa: E402


def _config(args: argparse.Namespace):
    from diffusers_ptq import PTQConfig

    return PTQConfig(
        weight_bits=4,
        act_bits=8,
        weights={"rounding": "nearest", "granularity": "per_channel"},
        layers={"mixed_precision": {"mode": "off"}},
        calibration={"num_inference_steps": args.steps, "batch_size": 1},
        reconstruction={
            "enabled": True,
            "iterations": args.iterations,
            "act_iterations": args.act_iterations,
            "batch_sampling": "stratified",
            "sampling_check": 0,
        },
    )


def _record_steps(log: list) -> None:
    """Time each gradient sum and the work before it (wrapping GradientSum.step in this process)."""
    from diffusers_ptq import gradsum

    inner = gradsum.GradientSum.step
    last = [time.perf_counter()]

    def step(self, error, also=()):
        started = time.perf_counter()
        inner(self, error, also)
        ended = time.perf_counter()
        log.append((started - last[0], ended - started, sum(p.numel() for p in self.params)))
        last[0] = ended

    gradsum.GradientSum.step = step


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    cpu_rank(rank, world, port)
    from diffusers_ptq import quantize_pipeline
    from diffusers_ptq.benchmark.quality.sampling import ddim_pipeline, fresh_pipeline
    from diffusers_ptq.cli.common import load_pipeline

    steps: list = []
    _record_steps(steps)
    pipe = fresh_pipeline(ddim_pipeline(load_pipeline("fashion", torch.device("cpu"), torch.float32)))
    start = time.perf_counter()
    quantize_pipeline(pipe, _config(args), progress=False)
    total = time.perf_counter() - start
    if world > 1:
        torch.distributed.destroy_process_group()
    recon = pipe.unet.ptq_state.reconstruction
    row = {
        "rank": rank,
        "quantize_s": round(total, 1),
        "reconstruction_s": round(recon["seconds"], 1),
        "train_s": round(sum(u.get("train_seconds") or 0.0 for u in recon["units"]), 1),
        "exchange_s": round(sum(u.get("exchange_seconds") or 0.0 for u in recon["units"]), 1),
        "steps": steps,
    }
    Path(out).with_suffix(f".{rank}.json").write_text(json.dumps(row))


def _decompose(ranks: list[dict]) -> dict:
    """Per-step waits by gradient size: the last arriver's (the collective) and the first's extra."""
    firsts = [s for s in zip(*(r["steps"] for r in ranks)) if all(own < 0.2 for own, _, _ in s)]
    out = {}
    sizes = (("under 100", 0, 100), ("100 to 100k", 100, 100_000), ("over 100k", 100_000, 1e12))
    for name, low, high in sizes:
        rows = [s for s in firsts if low <= s[0][2] < high]
        if not rows:
            continue
        last = [min(w for _, w, _ in s) for s in rows]
        first = [max(w for _, w, _ in s) for s in rows]
        out[name] = {
            "steps": len(rows),
            "own_work_ms": round(1e3 * statistics.mean(s[0][0] for s in rows), 2),
            "collective_ms_mean": round(1e3 * statistics.mean(last), 2),
            "collective_ms_median": round(1e3 * statistics.median(last), 2),
            "imbalance_ms_mean": round(1e3 * statistics.mean(f - lw for f, lw in zip(first, last)), 2),
        }
    return out


def run(world: int, args: argparse.Namespace) -> dict:
    with handoff_file() as out:
        spawn_ranks(worker, world, args, str(out))
        ranks = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(world)]
        for r in range(world):
            out.with_suffix(f".{r}.json").unlink()
    row = {k: v for k, v in ranks[0].items() if k not in ("rank", "steps")}
    row["processes"] = world
    if world > 1:
        row["per_step"] = _decompose(ranks)
    print(json.dumps(row), file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument("--iterations", type=int, default=100, help="AdaRound steps per block")
    parser.add_argument("--act-iterations", type=int, default=50, help="step-size steps per block")
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps of the calibration")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error(f"--world {args.world} is invalid; expected at least 2 (it is compared with 1)")
    started = time.perf_counter()
    rows = [run(1, args), run(args.world, args)]
    rows[1]["reconstruction_speedup"] = round(rows[0]["reconstruction_s"] / rows[1]["reconstruction_s"], 2)
    commit = subprocess.run(
        ["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    write_json(
        args.output,
        {
            "command": "python benchmarks/distributed_steps.py " + " ".join(argv or sys.argv[1:]),
            "commit": commit,
            "machine": f"{platform.machine()}, {mp.cpu_count()} cores, torch {torch.__version__}",
            "minutes": round((time.perf_counter() - started) / 60, 1),
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
