"""Block reconstruction: BRECQ/AdaRound (Q-Diffusion), fine-grained blocks (EDA-DM), temporal block (TFMQ-DM).

`reconstruct(unet, calibration_set, config)` runs it on a UNet quantized by `quantize_pipeline` /
`quantize_unet`; `ReconstructionConfig` holds every knob (defaults: BRECQ / Q-Diffusion's published values).

Only the config is imported eagerly (it needs nothing but the standard library), so `diffusers_ptq.config`
can import it as a PTQConfig section without an import cycle; everything else loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from diffusers_ptq.reconstruction.config import ReconstructionConfig

_LAZY = {
    "BlockCache": "cache",
    "build_cache": "cache",
    "ModuleUnit": "units",
    "Unit": "units",
    "ReconstructionReport": "report",
    "UnitReport": "report",
    "TemporalUnit": "temporal",
    "block_map": "blocks",
    "order_units": "blocks",
    "reconstruction_units": "blocks",
    "plan_phases": "runner",
    "reconstruct": "runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlockCache",
    "ModuleUnit",
    "ReconstructionConfig",
    "ReconstructionReport",
    "TemporalUnit",
    "Unit",
    "UnitReport",
    "block_map",
    "build_cache",
    "order_units",
    "plan_phases",
    "reconstruct",
    "reconstruction_units",
]
