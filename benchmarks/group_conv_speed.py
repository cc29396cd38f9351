"""Time of a conv with per-group weight scales after `convert`, against per-channel and fake quant.

Rows, one 3x3 conv (default 320 -> 320 channels at 2 x 32 x 32, Stable Diffusion's first block), W4A8:
- fake quant: the calibrated `QuantConv2d` (float conv on the fake-quantized weight and input);
- per_channel <kernel>: `Int8Conv2d` with one scale per output channel (the int8 GEMM);
- per_group <size> <kernel>: `Int8Conv2d` with one scale per group: the Triton kernel applies the group
  scales inside its reduction; onednn and int_mm fall back to `integer/grouped.py` (an fp32 GEMM of the
  activation codes with the group-dequantised weight).
Each row is checked against its fake-quant layer (max abs difference in `max_abs_error`). Median of
`--repeats` calls after a warm-up (on CUDA, each timed to the end of its kernels). Float32 throughout.

    OMP_NUM_THREADS=1 python benchmarks/group_conv_speed.py --label CPU-shared \
        --output benchmarks/results/group_conv_speed.json
    python benchmarks/group_conv_speed.py --device cuda --batch 8 --size 64 --output gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from diffusers_ptq import QuantConv2d
from diffusers_ptq.config import ActivationQuantConfig, WeightQuantConfig
from diffusers_ptq.integer import Int8Conv2d, onednn_available
from diffusers_ptq.quantizers import TimestepActQuantizer, contiguous_group_map
from diffusers_ptq.timestep import TimestepContext


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":  # kernels run asynchronously: time to their end, not their launch
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _layer(channels: int, weights: WeightQuantConfig, context: TimestepContext) -> QuantConv2d:
    torch.manual_seed(0)
    group_map = contiguous_group_map(1000, 1)
    acts = ActivationQuantConfig(bits=8)

    def make(name: str) -> TimestepActQuantizer:
        q = TimestepActQuantizer(acts, context, group_map, bits=8, name=name)
        with torch.no_grad():  # a fixed input range [-4, 4]: the timing does not depend on it
            q.scale.fill_(8 / 255)
            q.zero_point.fill_(128)
        return q

    layer = QuantConv2d.from_float(nn.Conv2d(channels, channels, 3, padding=1), weights, make)
    layer.calibrate_weights()
    return layer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cuda: triton, int_mm)")
    parser.add_argument("--label", default=None, help="a label for the machine, stored in the JSON")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    torch.set_flush_denormal(True)
    context = TimestepContext(1000)
    x = torch.randn(
        args.batch, args.channels, args.size, args.size, generator=torch.Generator().manual_seed(1)
    ).to(device)
    t = torch.full((args.batch,), 500, device=device)
    if device.type == "cuda":
        kernels = ["triton", "int_mm"]
    else:
        kernels = ["onednn", "int_mm"] if onednn_available() else ["int_mm"]
    settings = [("per_channel", None)] + [("per_group", size) for size in args.group_sizes]
    rows = []
    with torch.no_grad(), context.use(t):
        for granularity, size in settings:
            weights = WeightQuantConfig(bits=4, granularity=granularity, group_size=size or 128)
            weights.scale_search = "minmax"
            layer = _layer(args.channels, weights, context).to(device)
            ref = layer(x)
            label = granularity if size is None else f"{granularity} {size}"
            if size is None:
                rows.append(
                    {
                        "row": "fake quant",
                        "ms": _median_ms(lambda layer=layer: layer(x), args.repeats, device),
                    }
                )
            for kernel in kernels:
                new = Int8Conv2d(layer, kernel)
                error = float((new(x) - ref).abs().max())
                ms = _median_ms(lambda new=new: new(x), args.repeats, device)
                row = {"row": f"{label} {kernel}", "ms": ms, "max_abs_error": error}
                row["group_size_in_effect"] = new.weights[0].group_size  # None: per-channel (fallback)
                rows.append(row)
    for row in rows:
        print(f"{row['row']:<24} {row['ms']:8.1f} ms")
    result = {
        "shape": {"channels": args.channels, "size": args.size, "batch": args.batch, "kernel": [3, 3]},
        "weight_bits": 4,
        "act_bits": 8,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "machine": {
            "label": args.label,
            "cpu": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
