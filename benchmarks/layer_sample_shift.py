"""What each layer's quantization alone does to the sampled images, and whether that explains FD.

`measure`: with the recipe's calibrated quantizers (the probe `layers.mixed_precision` ranks with: scales
searched, nearest rounding, no GPTQ or bias correction), each layer the mixed-precision pass may keep float
is quantized alone on the float UNet and the pipeline's own DDIM loop samples `--trajectories` images from
fixed noise (never a calibration seed); against the float UNet's images from the same noise it records the
mean squared error, the mean square of the error's mean over the samples (drift), the signed mean of the
error (a brightness shift), per channel too, and the per-step noise MSE the mixed-precision ranking uses.

`explain`: for every quantized row of `diffusers-ptq bench` results that kept layers float, the net shift
its quantized layers add up to (the sum of their single-layer shifts; the float ones contribute none), next
to the row's FD, and the Spearman correlation of FD with |net shift| and with the summed sample MSE; and each
layer's rank by the per-step noise MSE and by the sample error.

    python benchmarks/layer_sample_shift.py measure --model fashion --output OUT.json
    python benchmarks/layer_sample_shift.py explain --layers OUT.json RESULTS.json [...] --output EXPL.json \\
        [--rows 'W4A8 default recipe,...']
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from bench_io import write_json
from fd_correlation import spearman
from tqdm.auto import tqdm

from diffusers_ptq import PTQConfig
from diffusers_ptq.api import build_group_map
from diffusers_ptq.prepare import plan_quantization
from diffusers_ptq.sensitivity.measure import enable_only
from diffusers_ptq.sensitivity.mixed import layer_probe
from diffusers_ptq.sensitivity.run import capture_for_sensitivity

NOISE_SEED = 10_000  # far above the small calibration seeds


def sample(pipe: Any, trajectories: int, steps: int, seed: int) -> torch.Tensor:
    """(N, H, W, C) float64 images of the pipeline's own loop from fixed noise."""
    generator = torch.Generator().manual_seed(NOISE_SEED + seed)
    out = pipe(batch_size=trajectories, generator=generator, num_inference_steps=steps, output_type="np")
    return torch.from_numpy(out.images).double()


def layer_effects(
    pipe: Any, config: PTQConfig, trajectories: int, seed: int, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Per eligible layer, quantized alone: the sampled images' errors and the per-step noise MSE."""
    steps = config.calibration.num_inference_steps
    data = capture_for_sensitivity(pipe, config, None, None, None, None, None, progress)
    plan = plan_quantization(pipe.unet, config)
    group_map = build_group_map(
        config.activations.timestep_groups, data.num_train_timesteps, data.step_timesteps
    )
    acts = config.activations.enabled
    effects: dict[str, dict[str, Any]] = {}
    with layer_probe(
        pipe.unet, plan, config, group_map, data, config.calibration.batch_size, seed, False
    ) as probe:
        errors = probe.errors(list(probe.units))
        enable_only(pipe.unet, None, acts)
        reference = sample(pipe, trajectories, steps, seed)
        for unit, err in zip(tqdm(list(probe.units.values()), desc="layers", disable=not progress), errors):
            enable_only(pipe.unet, unit, acts)
            try:
                diff = sample(pipe, trajectories, steps, seed) - reference
            finally:
                enable_only(pipe.unet, None, acts)
            effects[unit.name] = {
                "step_noise_mse": err.total_mse,
                "sample_mse": float(diff.pow(2).mean()),
                "sample_drift": float(diff.mean(0).pow(2).mean()),
                "shift": float(diff.mean()),
                "shift_per_channel": diff.mean(dim=(0, 1, 2)).tolist(),
            }
    return effects


def explain(
    layers: dict[str, dict[str, Any]], results: list[Path], only: list[str] | None = None
) -> dict[str, Any]:
    """Net shift and summed sample MSE of each bench row's quantized layers, against its FD.

    `only`: explain just the rows of these names (as the results name them, e.g. 'W4A8 default recipe').
    """
    runs = {path: json.loads(Path(path).read_text()) for path in results}
    if only is not None:
        seen = {r["name"] for run in runs.values() for r in run["rows"]}
        missing = [name for name in only if name not in seen]
        if missing:
            raise ValueError(f"--rows: {missing} in none of the results; they hold {sorted(seen)}")
    total_shift = sum(e["shift"] for e in layers.values())
    total_mse = sum(e["sample_mse"] for e in layers.values())
    rows = []
    for path, run in runs.items():
        floats = [r for r in run["rows"] if r["name"] == "float" and r["metrics"].get("FD")]
        for row in run["rows"]:
            mixed = (row.get("calibration_info") or {}).get("mixed_precision") or {}
            kept = [name for name, _ in mixed.get("promoted", [])]
            if row["name"] == "float" or not kept or not floats or not row["metrics"].get("FD"):
                continue
            if only is not None and row["name"] not in only:
                continue
            unknown = sorted(set(kept) - set(layers))
            if unknown:
                raise ValueError(f"{path}: row {row['name']!r} kept {unknown} float, not in the layer file")
            fd = [100.0 * (q / f - 1.0) for q, f in zip(row["metrics"]["FD"], floats[0]["metrics"]["FD"])]
            rows.append(
                {
                    "results": str(path),
                    "row": row["name"],
                    "kept_float": kept,
                    "fd_change_percent": sum(fd) / len(fd),
                    "net_shift": total_shift - sum(layers[n]["shift"] for n in kept),
                    "sample_mse_sum": total_mse - sum(layers[n]["sample_mse"] for n in kept),
                }
            )
    fd = [r["fd_change_percent"] for r in rows]
    by_noise = sorted(layers, key=lambda n: -layers[n]["step_noise_mse"])
    by_sample = sorted(layers, key=lambda n: -layers[n]["sample_mse"])
    return {
        "rows": rows,
        # 1 = the layer whose quantization alone costs most: by the ranking's noise MSE, by the sample error.
        "layer_ranks": {
            n: {"step_noise_mse": by_noise.index(n) + 1, "sample_mse": by_sample.index(n) + 1} for n in layers
        },
        "spearman_fd_abs_net_shift": spearman(fd, [abs(r["net_shift"]) for r in rows]),
        "spearman_fd_sample_mse_sum": spearman(fd, [r["sample_mse_sum"] for r in rows]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="each layer quantized alone: its sampled images' errors")
    m.add_argument("--model", default="fashion", help="fashion | colour-fashion | tiny:ddim")
    m.add_argument("--weight-bits", type=int, default=4)
    m.add_argument("--act-bits", type=int, default=8)
    m.add_argument("--steps", type=int, default=100, help="DDIM steps of calibration and sampling")
    m.add_argument("--calibration-samples", type=int, default=None, help="default: the recipe's")
    m.add_argument("--trajectories", type=int, default=16)
    m.add_argument("--seed", type=int, default=0, help="calibration seed (the bench uses 0)")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("--output", type=Path, required=True)
    e = sub.add_parser("explain", help="net shift of each bench row's quantized layers against its FD")
    e.add_argument("--layers", type=Path, required=True, help="a `measure` output")
    e.add_argument("results", type=Path, nargs="+", help="bench results.json files of the same model")
    e.add_argument(
        "--rows",
        type=lambda v: [n.strip() for n in v.split(",") if n.strip()],
        default=None,
        help="comma-separated row names to explain, as the results name them (e.g. 'W4A8 default recipe'); "
        "default: every row that kept layers float",
    )
    e.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "explain":
        layers = json.loads(args.layers.read_text())["layers"]
        out = explain(layers, args.results, args.rows)
        for r in out["rows"]:
            print(f"{r['fd_change_percent']:+6.1f} %  net shift {r['net_shift']:+.4f}  {r['kept_float']}")
        print(f"Spearman(FD, |net shift|) {out['spearman_fd_abs_net_shift']:+.2f}")
        write_json(args.output, {"layers_file": str(args.layers), "only_rows": args.rows, **out})
        return 0
    if args.trajectories < 1 or args.steps < 1:
        parser.error("--trajectories and --steps must be >= 1")
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    from diffusers_ptq.cli.common import load_pipeline  # here: keeps `explain` light

    pipe = load_pipeline(args.model, torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    calibration: dict[str, Any] = {"num_inference_steps": args.steps, "seed": args.seed}
    if args.calibration_samples is not None:
        calibration["num_samples"] = args.calibration_samples
    config = PTQConfig(weight_bits=args.weight_bits, act_bits=args.act_bits, calibration=calibration)
    start = time.perf_counter()
    layers = layer_effects(pipe, config, args.trajectories, args.seed, not args.no_progress)
    write_json(
        args.output,
        {
            "model": args.model,
            "recipe": config.tag,
            "trajectories": args.trajectories,
            "steps": args.steps,
            "seed": args.seed,
            "seconds": round(time.perf_counter() - start, 1),
            "layers": layers,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
