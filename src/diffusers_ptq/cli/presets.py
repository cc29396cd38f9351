"""`diffusers-ptq presets`: list the method presets and their recipes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from diffusers_ptq.config import PTQConfig
from diffusers_ptq.methods import available_presets
from diffusers_ptq.methods.default import WHY


def add_parser(sub: Any) -> None:
    p = sub.add_parser("presets", help="list the method presets and their recipes")
    p.add_argument("--full", action="store_true", help="print each preset's full PTQConfig JSON.")


def run(args: argparse.Namespace) -> int:
    # The default recipe first: it is what PTQConfig() and `quantize` without --preset use.
    names = ["default", *(n for n in available_presets() if n != "default")]
    for name in names:
        config = PTQConfig.preset(name)
        if args.full:
            print(f"{name}:\n{config.to_json()}")
            continue
        w, a, c = config.weights, config.activations, config.calibration
        summary = {
            "method": config.method,
            "weight_bits": w.bits,
            "act_bits": a.bits,
            "weights": f"{w.describe_scales()}, {'symmetric' if w.symmetric else 'asymmetric'}",
            "sampler": c.sampler,
            "num_samples": c.num_samples,
            "timestep_groups": a.timestep_groups,
            "special_layers": config.layers.special_layers,
            "rounding": w.rounding,
            "bias_correction": config.bias_correction,
            "mixed_precision": config.layers.mixed_precision.describe(),
        }
        print(f"{name:<14} {json.dumps(summary)}")
        if name == "default":
            print(f"{'':<14} why: {WHY}")
    return 0
