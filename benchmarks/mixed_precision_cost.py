"""What keeping the most sensitive layers at higher precision costs: checkpoint size and `convert` speed.

Quantizes the shipped Fashion-MNIST DDPM (or a tiny pipeline) at W4A8 once per row, with
`layers.mixed_precision` off, then with the N most sensitive layers promoted to W8A8 and kept float; saves
each with `save_pretrained` (size: every `*.safetensors` file), runs `convert` on int8 kernels and times the
UNet forward on a fixed batch (median of --repeats; the rows are timed round-robin, so a change in machine
load hits them alike), fake-quant and int8. Also records the promoted layers and the average weight bits. A
small calibration keeps it to minutes on one CPU thread; sizes and speeds do not depend on it.

    OMP_NUM_THREADS=1 python benchmarks/mixed_precision_cost.py --layers 4 \
        --json benchmarks/results/mixed_precision_cost.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffusers_ptq  # noqa: F401  (registers the quantizer)
from diffusers_ptq import PTQConfig, convert, quantize_pipeline
from diffusers_ptq.cli.common import load_pipeline


def rows_for(n: int) -> list[tuple[str, dict]]:
    off = {"mode": "off"}
    top = {"mode": "max_layers", "max_layers": n, "num_samples": 16}  # rows of the sensitivity pass
    return [
        ("W4A8", off),
        (f"W4A8 + top {n} at W8A8", {**top, "high_bits": 8}),
        (f"W4A8 + top {n} float", {**top, "high_bits": None}),
    ]


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@torch.no_grad()
def interleaved_median_ms(unets: list[torch.nn.Module], batch: int, repeats: int) -> list[float]:
    """Median forward time of each UNet, timed round-robin so that a change in machine load hits all alike."""
    cfg = unets[0].config
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500)
    for unet in unets:
        unet(x, t)  # warm-up: oneDNN prepacks on the first call
    times: list[list[float]] = [[] for _ in unets]
    for _ in range(repeats):
        for unet, row in zip(unets, times):
            start = time.perf_counter()
            unet(x, t)
            row.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(row) for row in times]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fashion", help="'fashion' or a tiny:NAME pipeline")
    parser.add_argument("--layers", type=int, default=4, help="layers promoted (max_layers). Default: 4")
    parser.add_argument("--batch", type=int, default=8, help="timed forward batch. Default: 8")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per row. Default: 10")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration samples. Default: 32")
    parser.add_argument("--num-inference-steps", type=int, default=20, help="calibration steps. Default: 20")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.layers, args.batch, args.repeats, args.num_samples, args.num_inference_steps) < 1:
        parser.error("--layers, --batch, --repeats, --num-samples and --num-inference-steps must be >= 1")
    torch.set_flush_denormal(True)
    base_pipe = load_pipeline(args.model, torch.device("cpu"), torch.float32)
    results: list[dict] = []
    fake_unets: list[torch.nn.Module] = []
    int8_unets: list[torch.nn.Module] = []
    with tempfile.TemporaryDirectory(prefix="mixed_cost_") as tmp:
        for label, mixed in rows_for(args.layers):
            pipe = copy.deepcopy(base_pipe)
            calib = {"num_samples": args.num_samples, "num_inference_steps": args.num_inference_steps}
            config = PTQConfig(
                weight_bits=4,
                act_bits=8,
                weights={"granularity": "per_channel"},  # as measured; the int8 GEMM path
                calibration=calib,
                layers={"mixed_precision": mixed},
            )
            start = time.perf_counter()
            quantize_pipeline(pipe, config, progress=False)
            seconds = time.perf_counter() - start
            report = pipe.unet.ptq_state.report
            folder = Path(tmp) / str(len(results))
            pipe.unet.save_pretrained(folder)
            size = checkpoint_bytes(folder)
            fake_unets.append(copy.deepcopy(pipe.unet))
            conversion = convert(pipe.unet)
            int8_unets.append(pipe.unet)
            summary = report.mixed_precision or {}
            results.append(
                {
                    "row": label,
                    "bytes": size,
                    "quantize_seconds": round(seconds, 1),
                    "integer_layers": len(conversion.integer),
                    "split_w8_layers": sum(info.split_for_saturation for info in conversion.integer),
                    "layers_by_bits": report.layers_by_bits,
                    "promoted": summary.get("promoted", []),
                    "average_weight_bits": summary.get("average_weight_bits"),
                }
            )
            print(f"{label}: {size / 1e6:.2f} MB, quantized in {seconds:.0f} s")
    for key, unets in (("fake_quant_ms", fake_unets), ("int8_ms", int8_unets)):
        for row, ms in zip(results, interleaved_median_ms(unets, args.batch, args.repeats)):
            row[key] = round(ms, 2)
    base = results[0]
    print()
    head = f"row ({args.model}, batch {args.batch}, {torch.get_num_threads()} threads)"
    print(f"| {head} | checkpoint | vs W4A8 | int8 forward | vs W4A8 |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['row']} | {r['bytes'] / 1e6:.2f} MB | {r['bytes'] / base['bytes']:.3f}x | "
            f"{r['int8_ms']:.1f} ms | {r['int8_ms'] / base['int8_ms']:.2f}x |"
        )
    out = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "rows": results}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
