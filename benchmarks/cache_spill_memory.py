"""Peak RAM of block reconstruction with the cache in RAM and spilled to disk (`reconstruction.cache_max_gb`).

Each setting runs in a fresh process: the same `quantize_pipeline` call on the shipped model (W4A8,
round-to-nearest, no bias correction or mixed precision, so the run is mostly reconstruction) with a large
calibration set, so that the largest unit's block cache is several times the budget. A thread samples the
process's /proc/self/status every few milliseconds; what is reported is the growth during reconstruction
above the resident set just before it starts (model, calibration set, interpreter), split into anonymous
memory (RssAnon: what `cache_max_gb` bounds) and file-backed pages (RssFile: a spilled cache's mapped
pages, which the kernel may write back and evict; they are not what the budget is about). Three settings:
the cache in RAM, every unit spilled (`cache_max_gb=0`: what reconstruction needs besides its cache —
mini-batches, activations kept for the backward, evaluation chunks), and spilled above the budget; the
cache's share of RAM is a setting's growth above the all-spilled run's. The quantized UNets of the
settings are compared bit for bit.

    python benchmarks/cache_spill_memory.py --num-samples 1024 --cache-max-gb 0.05 \
        --output benchmarks/results/cache_spill_memory.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_io import handoff_file, write_json

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
MIB = 1024**2


def _status() -> dict[str, int]:
    """The resident-set fields of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak of every FIELDS value since `mark()`; sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.running = interval, True
        self.peak: dict[str, int] = {}
        self.lock = threading.Lock()

    def mark(self) -> dict[str, int]:
        now = _status()
        with self.lock:
            self.peak = dict(now)
        return now

    def run(self) -> None:
        while self.running:
            now = _status()
            with self.lock:
                for k, v in now.items():
                    self.peak[k] = max(self.peak.get(k, 0), v)
            time.sleep(self.interval)


def _digest(unet) -> str:
    h = hashlib.sha256()
    for name, t in sorted([*unet.named_parameters(), *unet.named_buffers()]):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    from diffusers_ptq import PTQConfig, job, quantize_pipeline
    from diffusers_ptq.benchmark.quality.sampling import ddim_pipeline
    from diffusers_ptq.cli.common import load_pipeline

    pipe = ddim_pipeline(load_pipeline("fashion", torch.device("cpu"), torch.float32))
    reconstruction = {
        "enabled": True,
        "iterations": args.iterations,
        "act_iterations": 0,
        "num_samples": args.num_samples,
        "cache_dtype": "float16",
    }
    budget = None if args.child_budget == "none" else float(args.child_budget)
    if budget is not None:
        reconstruction.update(cache_max_gb=budget, cache_dir=args.cache_dir)
    config = PTQConfig(
        weight_bits=4,
        act_bits=8,
        weights={"rounding": "nearest", "granularity": "per_channel"},
        bias_correction="off",
        layers={"mixed_precision": {"mode": "off"}},
        calibration={"num_samples": args.num_samples, "num_inference_steps": 100},
        reconstruction=reconstruction,
    )
    sampler = Sampler()
    sampler.start()
    marks: dict[str, dict[str, int]] = {}
    original = job.reconstruct

    def measured(*a, **kw):
        marks["before"] = sampler.mark()
        try:
            return original(*a, **kw)
        finally:
            with sampler.lock:
                marks["peak"] = dict(sampler.peak)

    job.reconstruct = measured
    started = time.perf_counter()
    quantize_pipeline(pipe, config, progress=False)
    seconds = time.perf_counter() - started
    sampler.running = False
    units = pipe.unet.ptq_state.reconstruction["units"]
    model_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    before, peak = marks["before"], marks["peak"]
    return {
        "cache_max_gb": budget,
        "seconds": round(seconds, 1),
        "rows": pipe.unet.ptq_state.reconstruction["rows"],
        "largest_unit_cache_mib": round(max(u["cache_bytes"] or 0 for u in units) / MIB, 1),
        "units_spilled": sum(bool(u["cache_spilled"]) for u in units),
        "units": len(units),
        "model_mib": round(model_bytes / MIB, 1),
        "before_mib": {k: round(v / MIB, 1) for k, v in before.items()},
        "growth_mib": {k: round((peak[k] - before[k]) / MIB, 1) for k in FIELDS if k in peak},
        "unet_sha256": _digest(pipe.unet),
    }


def _run_child(args: argparse.Namespace, cache_max_gb: float | None) -> dict:
    with handoff_file() as out:
        cmd = [sys.executable, __file__, "--child", str(out), "--num-samples", str(args.num_samples)]
        cmd += ["--iterations", str(args.iterations), "--cache-dir", args.cache_dir]
        cmd += ["--child-budget", "none" if cache_max_gb is None else str(cache_max_gb)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        row = json.loads(out.read_text())
    print(json.dumps(row), file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=1024, help="calibration rows (all reconstructed)")
    parser.add_argument("--iterations", type=int, default=20, help="AdaRound steps per unit")
    parser.add_argument("--cache-max-gb", type=float, default=0.05, help="the budget of the spilled run")
    parser.add_argument("--cache-dir", default=tempfile.gettempdir())
    parser.add_argument("--output", type=Path, help="JSON file to write (parent run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-budget", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        Path(args.child).write_text(json.dumps(child(args)))
        return 0
    if args.output is None:
        parser.error("--output is required")
    started = time.perf_counter()
    budget = args.cache_max_gb
    # In RAM; every unit spilled (what reconstruction needs besides its cache: mini-batches, activations
    # kept for the backward, evaluation chunks); spilled above the budget.
    rows = [_run_child(args, None), _run_child(args, 0.0), _run_child(args, budget)]
    anon = [row["growth_mib"]["RssAnon"] for row in rows]
    result = {
        "command": " ".join(["python", "benchmarks/cache_spill_memory.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread",
        "rows": rows,
        "identical_unets": len({row["unet_sha256"] for row in rows}) == 1,
        # The budget's claim: what the cache adds to anonymous memory (growth above the all-spilled run)
        # stays within cache_max_gb.
        "cache_anon_mib": {"ram": round(anon[0] - anon[1], 1), "budget": round(anon[2] - anon[1], 1)},
        "cache_within_budget": anon[2] - anon[1] <= budget * 1024,
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
