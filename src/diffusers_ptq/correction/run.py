"""`correct_bias`: run the bias correction a recipe asks for, after calibration and reconstruction."""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.correction.layer import correct_layers
from diffusers_ptq.correction.output import correct_output

MODES = {"layer": correct_layers, "output": correct_output}


def correct_bias(
    unet: nn.Module, data: CalibrationSet, mode: str, batch_size: int, acts: bool, progress: bool = True
) -> dict[str, Any]:
    """Estimate the `mode` ('layer' or 'output') correction of `unet` on `data`; returns its summary."""
    if mode not in MODES:
        valid = ", ".join(map(repr, MODES))
        raise ValueError(f"bias_correction={mode!r} is invalid; expected one of {valid}.")
    if len(data) == 0:
        raise ValueError("bias correction needs calibration samples; the calibration set is empty")
    start = time.perf_counter()
    summary = MODES[mode](unet, data, batch_size, acts, progress)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary
