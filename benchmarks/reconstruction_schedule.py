"""Wall time of block reconstruction at the published schedule, from measured per-step costs.

Builds a UNet from its config (default: SD 1.5's public config, random weights: the cost does not depend
on the values), quantizes it with nearest rounding on random calibration rows, and runs a reconstruction
of `--iterations` steps per unit and pass twice: at mini-batch `--batch-size` (one device) and at
batch-size / `--devices` (one rank of a data-parallel run). Per unit it takes the measured seconds per
optimiser step and the caching + evaluation time per calibration row, and extrapolates to the published
schedule (BRECQ / Q-Diffusion: 20,000 AdaRound steps and 5,000 step-size steps per block) over
`--published-rows` calibration rows:

- 1 device: sum over units of (steps x seconds per step at the full batch) + rows x caching seconds per row;
- N devices: steps x (seconds per step at batch / N + the gradient all-reduce, 2 x gradient bytes /
  `--bandwidth-gbs`, a ring all-reduce's traffic) + rows / N x caching seconds per row.

    python benchmarks/reconstruction_schedule.py --device cuda --json OUT.json     # SD 1.5, on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

PUBLISHED = {"weights": 20000, "acts": 5000}


def _calibration(unet: torch.nn.Module, rows: int, latent: int, tokens: int):
    from diffusers_ptq import CalibrationSet

    gen = torch.Generator().manual_seed(0)
    cfg = unet.config
    steps = torch.linspace(980, 20, 10).long()
    t = steps[torch.arange(rows) % len(steps)]
    inputs = {"sample": torch.randn(rows, cfg.in_channels, latent, latent, generator=gen)}
    if getattr(cfg, "cross_attention_dim", None):
        inputs["encoder_hidden_states"] = torch.randn(rows, tokens, cfg.cross_attention_dim, generator=gen)
    return CalibrationSet(
        inputs=inputs,
        timesteps=t.float(),
        train_timesteps=t,
        step_index=torch.arange(rows) % len(steps),
        trajectory=torch.arange(rows) // len(steps),
        step_timesteps=steps,
        num_train_timesteps=1000,
    )


def measure(config: dict[str, Any], args: argparse.Namespace, batch_size: int) -> list[dict[str, Any]]:
    """Per unit and pass: seconds per optimiser step, caching + evaluation seconds per row, grad bytes."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    from diffusers_ptq import PTQConfig, quantize_unet

    cls = UNet2DConditionModel if config.get("cross_attention_dim") else UNet2DModel
    torch.manual_seed(0)
    unet = cls.from_config(config).to(args.device).eval()
    data = _calibration(unet, args.rows, args.latent, args.tokens)
    recon = {
        "enabled": True,
        "iterations": args.iterations,
        "act_iterations": args.iterations,
        "batch_size": batch_size,
        "cache_batch_size": min(batch_size, 8),
        "holdout": 0.1,
    }
    ptq = PTQConfig(
        weight_bits=4,
        act_bits=8,
        weights={"rounding": "nearest", "granularity": "per_channel"},
        layers={"mixed_precision": {"mode": "off"}},
        bias_correction="off",
        reconstruction=recon,
    )
    quantize_unet(unet, ptq, data, batch_size=8, progress=args.progress)
    units = []
    for u in unet.ptq_state.reconstruction["units"]:
        if not u["iterations"]:
            continue
        overhead = u["seconds"] - u["train_seconds"]
        units.append(
            {
                "unit": u["unit"],
                "phase": u["phase"],
                "step_s": u["train_seconds"] / u["iterations"],
                "overhead_s_per_row": overhead / args.rows,
            }
        )
    grads = _grad_bytes(unet)
    for u in units:
        u["grad_bytes"] = grads.get((u["unit"], u["phase"]), 0)
    del unet
    return units


def _grad_bytes(unet: torch.nn.Module) -> dict[tuple[str, str], int]:
    """Bytes of what each unit's pass trains (AdaRound V: one float32 per quantized weight; step sizes)."""
    from diffusers_ptq.nn import QuantLayerMixin
    from diffusers_ptq.quantizers import TimestepActQuantizer
    from diffusers_ptq.reconstruction import ReconstructionConfig, reconstruction_units

    out = {}
    data = _calibration(unet, 1, 8, 4)
    for unit in reconstruction_units(unet, ReconstructionConfig(), data):
        weights = sum(
            unet.get_submodule(n).weight.numel()
            for n in unit.layers
            if isinstance(unet.get_submodule(n), QuantLayerMixin)
        )
        scales = sum(
            unet.get_submodule(n).scale.numel()
            for n in unit.act_quantizers
            if isinstance(unet.get_submodule(n), TimestepActQuantizer)
        )
        out[(unit.name, "weights")] = 4 * weights
        out[(unit.name, "acts")] = 4 * scales
    return out


def extrapolate(full: list[dict], per_rank: list[dict], args: argparse.Namespace) -> dict[str, float]:
    """Hours of the published schedule on 1 and `--devices` devices."""
    rows, n = args.published_rows, args.devices
    one = many = 0.0
    ranked = {(u["unit"], u["phase"]): u for u in per_rank}
    for u in full:
        steps = PUBLISHED[u["phase"]]
        one += steps * u["step_s"] + rows * u["overhead_s_per_row"]
        rank = ranked.get((u["unit"], u["phase"]), u)
        allreduce = 2 * u["grad_bytes"] / (args.bandwidth_gbs * 1e9)
        many += steps * (rank["step_s"] + allreduce) + rows / n * rank["overhead_s_per_row"]
    return {"hours_1_device": one / 3600, f"hours_{n}_devices": many / 3600, "speedup": one / max(many, 1e-9)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=None, help="UNet config.json; default: SD 1.5's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent", type=int, default=64, help="latent height and width")
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--rows", type=int, default=64, help="calibration rows of the measuring run")
    parser.add_argument("--iterations", type=int, default=10, help="measured steps per unit and pass")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--published-rows", type=int, default=1024)
    parser.add_argument("--bandwidth-gbs", type=float, default=200.0, help="all-reduce bus bandwidth, GB/s")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.devices < 2 or args.batch_size < args.devices:
        parser.error("--devices must be >= 2 and --batch-size >= --devices")
    from diffusers_ptq.zoo import SD15_UNET_CONFIG_FILE

    config = json.loads((args.config or SD15_UNET_CONFIG_FILE).read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    started = time.perf_counter()
    # Warm-up (kernel selection, allocator, lazy initialisation), so neither measured run pays for it: one
    # step per unit on a few rows.
    warm = argparse.Namespace(**{**vars(args), "iterations": 1, "rows": min(args.rows, 8)})
    measure(config, warm, min(args.batch_size, 8))
    result = {
        "command": " ".join(["python", "benchmarks/reconstruction_schedule.py", *(argv or [])]),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
        "torch": torch.__version__,
        "published_schedule": PUBLISHED,
        "published_rows": args.published_rows,
        "batch_size": args.batch_size,
        "devices": args.devices,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    full = measure(config, args, args.batch_size)
    # Written before the per-rank run as well, so a run stopped there (device time is scarce) still
    # leaves the one-device measurement.
    _write(args.json, {**result, "units_full_batch": full, "seconds": time.perf_counter() - started})
    per_rank = measure(config, args, args.batch_size // args.devices)
    result.update(extrapolate(full, per_rank, args))
    result.update(units_full_batch=full, units_per_rank_batch=per_rank, seconds=time.perf_counter() - started)
    _write(args.json, result)
    return result


def _write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
