"""Does PTQD's variance absorption pay for stochastic sampling? FD of DDIM with eta > 0 on a shipped model.

Rows, all on the same start noise and the same per-step noise (one generator per image): the float model;
the default recipe at the given bits; the same quantized UNet with `absorb_quantization_noise`. FD against
the model's real-data statistics (the bench's classifier), with the per-step noise ratios sigma'/sigma.

    python benchmarks/variance_absorption.py --model fashion --bits W4A8 --num-samples 250 --eta 1.0 \
        --threads 1 --output benchmarks/results/variance_absorption_fashion.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_io import write_json
from tqdm.auto import tqdm

from diffusers_ptq import PTQConfig, absorb_quantization_noise, quantize_pipeline
from diffusers_ptq.benchmark.quality.sampling import ddim_pipeline, fresh_pipeline, image_generators
from diffusers_ptq.cli.common import COLOUR_MODEL, FASHION_MODEL, load_pipeline

MODELS = (FASHION_MODEL, COLOUR_MODEL)


def parse_bits(text: str) -> tuple[int, int]:
    parts = text.upper().lstrip("W").split("A")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--bits {text!r}: expected e.g. W4A8")
    return int(parts[0]), int(parts[1])


def fidelity_for(model: str):
    if model == FASHION_MODEL:
        from diffusers_ptq.benchmark.metrics.fashion import FashionFidelity

        return FashionFidelity()
    from diffusers_ptq.benchmark.metrics.colour_fashion import ColourFashionFidelity

    return ColourFashionFidelity()


@torch.no_grad()
def sample(pipe, args: argparse.Namespace, desc: str) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1]; image i's start and step noise come from its own generator."""
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    batches = range(0, args.num_samples, args.batch_size)
    for start in tqdm(batches, desc=desc, leave=False, disable=not args.progress):
        count = min(args.batch_size, args.num_samples - start)
        out = pipe(
            batch_size=count,
            generator=image_generators(args.seed, start, count),
            num_inference_steps=args.steps,
            eta=args.eta,
            output_type="np",
        ).images
        chunks.append(torch.from_numpy(np.asarray(out, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(chunks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default=FASHION_MODEL)
    parser.add_argument("--bits", type=parse_bits, default=(4, 8), help="Default: W4A8.")
    parser.add_argument("--num-samples", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps (sampling and calibration).")
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument(
        "--calibration-samples", type=int, default=None, help="Default: PTQConfig's calibration.num_samples."
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bars.")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write.")
    args = parser.parse_args(argv)
    if args.eta <= 0:
        parser.error(f"--eta {args.eta}: absorption only acts with eta > 0")
    if args.num_samples < 2 or args.batch_size < 1:
        parser.error("--num-samples must be >= 2 and --batch-size >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    fidelity = fidelity_for(args.model)
    float_pipe = ddim_pipeline(load_pipeline(args.model, torch.device("cpu"), torch.float32))
    rows = []

    def score(name: str, pipe, extra: dict) -> None:
        start = time.perf_counter()
        images = sample(pipe, args, name)
        metrics = fidelity.compute(images)
        rows.append({"row": name, **metrics, "sampling_s": round(time.perf_counter() - start, 1), **extra})
        print(f"{name}: FD {metrics['FD']:.2f}", file=sys.stderr)

    score("float", float_pipe, {})
    w, a = args.bits
    quant = fresh_pipeline(float_pipe)  # its own UNet and scheduler
    calibration = {"num_inference_steps": args.steps}
    if args.calibration_samples is not None:
        calibration["num_samples"] = args.calibration_samples
    config = PTQConfig(weight_bits=w, act_bits=a, calibration=calibration)
    start = time.perf_counter()
    quantize_pipeline(quant, config, progress=args.progress)
    calibration_s = round(time.perf_counter() - start, 1)
    correction = quant.unet.ptq_output_correction
    score(f"default W{w}A{a}", quant, {"calibration_s": calibration_s})
    with absorb_quantization_noise(quant) as handle:
        score(f"default W{w}A{a} + absorption", quant, {})
        ratios = list(handle.ratios)
    calls = -(-args.num_samples // args.batch_size)
    first_call = ratios[: len(ratios) // calls]  # the ratios depend on the step only: every call repeats them
    float_fd = rows[0]["FD"]
    for row in rows[1:]:
        row["FD_vs_float_pct"] = round(100 * (row["FD"] / float_fd - 1), 1)
    result = {
        "command": " ".join(["python", "benchmarks/variance_absorption.py", *(argv or sys.argv[1:])]),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "eta": args.eta,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "steps": args.steps,
        "rows": rows,
        "residual_var": correction.residual_var.tolist(),
        "k": correction.k.tolist(),
        "noise_ratio_per_noisy_step": [round(r, 6) for r in first_call],
        "noise_ratio_min": min(ratios) if ratios else None,
        "clipped_steps_per_call": handle.clipped_steps // calls,
    }
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
