"""Memory of block reconstruction on full-size UNets, from shapes alone (BENCHMARKS.md section 5).

Builds each UNet from its public config on the meta device (no weights, no memory) and runs one forward of
one calibration row on meta tensors with hooks on every reconstruction unit (the units `block_map` forms:
ResNet blocks, transformer blocks, attention blocks, up/down-samplers, and every other Conv2d / Linear on
its own; TFMQ-DM's temporal block and fine-grained inner-layer targets are not counted). For each unit it
records the bytes one calibration row takes in the block cache (every batched input tensor and the output,
in the cache dtype, plus the row's timestep), its parameters, and the summed outputs of its submodules in
float32 (what autograd keeps for the backward of one row: an estimate, attention kernels may keep less or
more). From these it derives the peak RAM and device memory of each memory setting for a run of `--rows`
calibration rows and mini-batches of `--batch-size`:

- device memory, offload='none': the float32 UNet + the largest unit's training state + one mini-batch;
- device memory, offload='cpu': the largest unit's float32 weights and training state + one mini-batch;
- RAM: the largest unit's cache (or `cache_max_gb` when it spills), + the float32 UNet with offload='cpu'.

A unit's training state is its weights' AdaRound variables, their gradients and Adam's two moments (4 x its
float32 weight bytes). Nothing here allocates real tensors: it runs in seconds on a laptop.

    OMP_NUM_THREADS=1 python benchmarks/reconstruction_memory.py \
        --json benchmarks/results/reconstruction_memory.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, Upsample2D
from torch import nn
from torch.utils import _pytree as pytree

from diffusers_ptq.reconstruction.blocks import RESNET_TYPES
from diffusers_ptq.zoo import SD15_UNET_CONFIG_FILE

ROOT = Path(__file__).resolve().parents[1]
SDXL_CONFIG_FILE = ROOT / "benchmarks" / "configs" / "sdxl_unet_config.json"
# (name, config file, latent size): SD 1.5 samples 512 px (64 x 64 latents), SDXL 1024 px (128 x 128).
MODELS = [("sd15", SD15_UNET_CONFIG_FILE, 64), ("sdxl", SDXL_CONFIG_FILE, 128)]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENS = 77
TIMESTEP_BYTES = 8  # the per-row timestep the quantizers see, int64
TRAIN_STATE = 4  # AdaRound V, its gradient, Adam's two moments: float32 each, per weight
GIB = 2**30


def load_config(path: Path) -> dict[str, Any]:
    config = json.loads(Path(path).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def units_of(unet: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(name, kind, module) of every reconstruction unit, in module order (as `block_map` forms them)."""
    units, roots = [], []
    for name, m in unet.named_modules():
        if not name or any(name.startswith(r + ".") for r in roots):
            continue
        kind = None
        if isinstance(m, RESNET_TYPES):
            kind = "resnet"
        elif isinstance(m, BasicTransformerBlock):
            kind = "transformer"
        elif isinstance(m, Attention):
            kind = "attention"
        elif isinstance(m, Downsample2D | Upsample2D):
            kind = "sample"
        elif isinstance(m, nn.Conv2d | nn.Linear):
            kind = "layer"
        if kind is not None:
            roots.append(name)
            units.append((name, kind, m))
    return units


def _bytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
    return t.numel() * size


def unet_inputs(unet: UNet2DConditionModel, latent: int, tokens: int = TOKENS) -> dict[str, Any]:
    cfg = unet.config
    kwargs: dict[str, Any] = {
        "sample": torch.empty(1, cfg.in_channels, latent, latent),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.empty(1, tokens, cfg.cross_attention_dim),
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, text_dim), "time_ids": torch.empty(1, 6)}
    return kwargs


def measure(config: dict[str, Any], latent: int, cache_dtype: str, tokens: int = TOKENS) -> dict[str, Any]:
    """Per unit: cache bytes per calibration row, parameters, activation bytes per row (meta forward)."""
    dtype = DTYPES[cache_dtype]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        kwargs = unet_inputs(unet, latent, tokens)
    units = units_of(unet)
    rows: dict[str, dict[str, Any]] = {}
    handles = []
    for name, kind, module in units:
        row = rows[name] = {"unit": name, "kind": kind, "calls": 0}
        row["params"] = sum(p.numel() for p in module.parameters())

        def pre(mod: nn.Module, args: tuple, kw: dict, row: dict = row) -> None:
            leaves = [x for x in pytree.tree_leaves((args, kw)) if torch.is_tensor(x)]
            row["calls"] += 1
            row["input_bytes"] = sum(_bytes(x, dtype) for x in leaves)
            row["activation_bytes"] = 0

        def post(mod: nn.Module, args: tuple, out: Any, row: dict = row) -> None:
            out = out if torch.is_tensor(out) else out[0]
            row["output_bytes"] = _bytes(out, dtype)

        def inner(mod: nn.Module, args: tuple, out: Any, row: dict = row) -> None:
            tensors = [x for x in pytree.tree_leaves(out) if torch.is_tensor(x)]
            row["activation_bytes"] += sum(x.numel() * 4 for x in tensors)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
        for sub in module.modules():
            handles.append(sub.register_forward_hook(inner))
    with torch.no_grad():
        unet(**kwargs)
    for h in handles:
        h.remove()
    out = []
    for name, _, _ in units:
        row = rows[name]
        if row.pop("calls") != 1:
            continue  # never runs (or runs twice): not a unit reconstruction trains
        row["cache_bytes_per_row"] = row["input_bytes"] + row["output_bytes"] + TIMESTEP_BYTES
        out.append(row)
    params = sum(p.numel() for p in unet.parameters())
    return {"latent": latent, "cache_dtype": cache_dtype, "params": params, "units": out}


def settings(model: dict[str, Any], rows: int, batch_size: int, cache_max_gb: float) -> list[dict[str, Any]]:
    """Peak RAM / device memory (GiB) of each memory setting for `rows` calibration rows."""
    units = model["units"]
    unet_bytes = 4 * model["params"]
    cache = max(u["cache_bytes_per_row"] for u in units) * rows
    unit_bytes = max(
        4 * u["params"] * (1 + TRAIN_STATE)
        + batch_size * (u["cache_bytes_per_row"] * 2 + u["activation_bytes"])
        for u in units
    )
    state = max(4 * u["params"] * TRAIN_STATE for u in units)
    batch = max(batch_size * (u["cache_bytes_per_row"] * 2 + u["activation_bytes"]) for u in units)
    spilled = min(cache, cache_max_gb * GIB)
    out = []
    for offload in ("none", "cpu"):
        for spill in (False, True):
            ram = spilled if spill else cache
            device = unit_bytes if offload == "cpu" else unet_bytes + state + batch
            if offload == "cpu":
                ram += unet_bytes
            out.append(
                {
                    "offload": offload,
                    "cache_max_gb": cache_max_gb if spill else None,
                    "ram_gib": round(ram / GIB, 2),
                    "device_gib": round(device / GIB, 2),
                    "disk_gib": round(cache / GIB, 2) if spill and cache > cache_max_gb * GIB else 0.0,
                }
            )
    return out


def summarise(model: dict[str, Any], top: int) -> dict[str, Any]:
    units = sorted(model["units"], key=lambda u: -u["cache_bytes_per_row"])
    return {
        "params": model["params"],
        "units": len(model["units"]),
        "largest": [
            {k: u[k] for k in ("unit", "kind", "params", "cache_bytes_per_row", "activation_bytes")}
            for u in units[:top]
        ],
        "total_cache_bytes_per_row": sum(u["cache_bytes_per_row"] for u in units),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, action="append", help="a UNet config.json (repeatable)")
    parser.add_argument("--latent", type=int, action="append", help="latent size per --config")
    parser.add_argument("--cache-dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--rows", type=int, default=1024, help="calibration rows reconstruction uses")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-max-gb", type=float, default=4.0)
    parser.add_argument("--top", type=int, default=5, help="largest units listed per model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.config:
        latents = args.latent or [64] * len(args.config)
        if len(latents) != len(args.config):
            parser.error("give one --latent per --config")
        models = [(Path(c).parent.name or str(c), c, s) for c, s in zip(args.config, latents)]
    else:
        models = MODELS
    result: dict[str, Any] = {
        "cache_dtype": args.cache_dtype,
        "rows": args.rows,
        "batch_size": args.batch_size,
        "cache_max_gb": args.cache_max_gb,
        "models": {},
    }
    for name, path, latent in models:
        model = measure(load_config(path), latent, args.cache_dtype)
        entry = {"latent": latent, **summarise(model, args.top)}
        entry["settings"] = settings(model, args.rows, args.batch_size, args.cache_max_gb)
        result["models"][name] = entry
        mib = 2**20
        print(f"{name} ({latent}x{latent} latents, {model['params'] / 1e6:.1f} M parameters):")
        for u in entry["largest"]:
            print(f"  {u['unit']:50s} {u['cache_bytes_per_row'] / mib:8.2f} MiB per row")
        print(
            f"  total over {entry['units']} units: {entry['total_cache_bytes_per_row'] / mib:.1f} MiB per row"
        )
        for s in entry["settings"]:
            print(
                f"  offload={s['offload']:4s} cache_max_gb={s['cache_max_gb']!s:5s} "
                f"RAM {s['ram_gib']:7.2f} GiB  device {s['device_gib']:7.2f} GiB  "
                f"disk {s['disk_gib']:7.2f} GiB"
            )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
