"""Checkpoint size of a quantized UNet against its float16 checkpoint (Stable Diffusion 1.5 shapes default).

Builds the UNet from its config with random weights (sizes do not depend on the values), saves it in float16
with diffusers' `save_pretrained`, then quantizes copies with `quantize_unet` (a one-row synthetic calibration
set at 8x8 latents and min/max scale search: the checkpoint layout and size do not depend on the calibration)
and saves each with `save_pretrained`. Sizes count every `*.safetensors` file of the saved folder.

    # BENCHMARKS.md section 4 (writes benchmarks/results/checkpoint_size.json):
    OMP_NUM_THREADS=1 python benchmarks/checkpoint_size.py --verify --machine CPU-3 \
        --json benchmarks/results/checkpoint_size.json
    OMP_NUM_THREADS=1 python benchmarks/checkpoint_size.py --bits 8 4 2   # other bit widths, printed only
    OMP_NUM_THREADS=1 python benchmarks/checkpoint_size.py --group-sizes 128 64   # + per-group scale rows

The default config is Stable Diffusion 1.5's public UNet config, shipped in the package
(`diffusers_ptq.zoo.SD15_UNET_CONFIG_FILE`). Builds real (random) weights, not shapes only: it needs several
GB of RAM and temporary disk for the checkpoints (the sum of the `bytes` it reports: 3.0 GB for SD 1.5's
860 M parameters); the run time and peak memory measured are in the JSON it writes (`seconds`,
`peak_rss_mb`).
`--verify` also reloads each checkpoint with `from_pretrained` and checks the outputs are bit-identical.
`--group-sizes` adds, for each bit width, a row with per-group weight scales (`weights.granularity=
"per_group"`; layers whose input size is not a multiple keep per-channel scales, counted in
`per_channel_fallbacks`).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

import diffusers_ptq  # noqa: F401  (registers the quantizer, so from_pretrained loads the checkpoints)
from diffusers_ptq import CalibrationSet, PTQConfig, quantize_unet
from diffusers_ptq.prepare import group_fallbacks
from diffusers_ptq.zoo import SD15_UNET_CONFIG_FILE

DEFAULT_CONFIG = SD15_UNET_CONFIG_FILE


def load_config(path: Path | None) -> dict:
    config = json.loads(Path(path or DEFAULT_CONFIG).read_text())
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    return config


def calibration_set(unet: UNet2DConditionModel, size: int = 8, tokens: int = 8) -> CalibrationSet:
    gen = torch.Generator().manual_seed(0)
    cfg = unet.config
    t = torch.tensor([500])
    return CalibrationSet(
        inputs={
            "sample": torch.randn(1, cfg.in_channels, size, size, generator=gen),
            "encoder_hidden_states": torch.randn(1, tokens, cfg.cross_attention_dim, generator=gen),
        },
        timesteps=t,
        train_timesteps=t,
        step_index=torch.zeros(1, dtype=torch.long),
        trajectory=torch.zeros(1, dtype=torch.long),
        step_timesteps=t,
        num_train_timesteps=1000,
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="UNet2DConditionModel config.json")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="weight bit widths (A8 each)")
    parser.add_argument(
        "--group-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also a per-group-scale row per bit width and group size (weights.granularity='per_group')",
    )
    parser.add_argument("--verify", action="store_true", help="reload each checkpoint and compare outputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--machine", default=None, help="a label for the machine, stored in the JSON")
    parser.add_argument("--keep", type=Path, default=None, help="save the checkpoints here (default: temp)")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(load_config(args.config)).eval()
    params = sum(p.numel() for p in unet.parameters())
    built = time.perf_counter() - start
    print(f"UNet2DConditionModel: {params / 1e6:.1f} M parameters, built in {built:.0f} s")

    with tempfile.TemporaryDirectory(prefix="checkpoint_size_") as tmp:
        root = args.keep or Path(tmp)
        # Casting back to float32 afterwards loses nothing that matters here: the weights are random.
        unet.to(torch.float16).save_pretrained(root / "fp16")
        unet.to(torch.float32)
        fp16 = checkpoint_bytes(root / "fp16")
        rows = [{"checkpoint": "float16", "bytes": fp16, "ratio_vs_fp16": 1.0}]
        data = calibration_set(unet)
        settings = [(bits, None) for bits in args.bits]
        settings += [(bits, size) for bits in args.bits for size in args.group_sizes]
        for bits, group_size in settings:
            t0 = time.perf_counter()
            quantized = copy.deepcopy(unet)
            minmax = {"scale_search": "minmax"}
            weights = {**minmax, "granularity": "per_channel"}
            if group_size is not None:
                weights.update(granularity="per_group", group_size=group_size)
            # The storage format is what is measured: nearest rounding (GPTQ changes codes, not bytes), and
            # none of the default recipe's extra tensors or float layers (correction tables, mixed precision).
            weights["rounding"] = "nearest"
            recipe = PTQConfig(
                weight_bits=bits,
                act_bits=8,
                weights=weights,
                activations=minmax,
                bias_correction="off",
                layers={"mixed_precision": {"mode": "off"}},
            )
            with warnings.catch_warnings():  # the fallback layers are counted in the row instead
                warnings.filterwarnings("ignore", message=r"weights\.group_size=")
                quantize_unet(quantized, recipe, data, progress=False)
            label = recipe.tag.upper() + ("" if group_size is None else f" g{group_size}")
            folder = root / label.replace(" ", "_")
            quantized.save_pretrained(folder)
            size = checkpoint_bytes(folder)
            row = {"checkpoint": label, "bytes": size, "ratio_vs_fp16": size / fp16}
            report = quantized.ptq_state.plan
            row["quantized_layers"] = len(report.layers)
            row["kept_float"] = len(report.kept_float)
            if group_size is not None:
                row["group_size"] = group_size
                row["per_channel_fallbacks"] = len(group_fallbacks(quantized, report, recipe))
            if args.verify:
                loaded = UNet2DConditionModel.from_pretrained(folder)
                kwargs = data.unet_kwargs(slice(None))
                with torch.no_grad():
                    row["bit_exact"] = bool(torch.equal(loaded(**kwargs).sample, quantized(**kwargs).sample))
                del loaded
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            del quantized
            print(f"{row['checkpoint']}: done in {row['seconds']} s")

    print()
    print("| checkpoint | size (MB) | vs float16 |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['checkpoint']} | {row['bytes'] / 1e6:,.1f} | {row['ratio_vs_fp16']:.3f}x |")
    config_name = args.config or DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[4])
    result = {
        "parameters": params,
        "config": str(config_name),
        "bits": args.bits,
        **({"group_sizes": args.group_sizes} if args.group_sizes else {}),
        "verify": args.verify,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"label": args.machine, "cpu": _cpu_name(), "torch": torch.__version__},
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
