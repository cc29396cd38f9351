"""Every timed row's output is checked against the float model's: a fast row with a wrong output is an error.

The reference is the float UNet's output (eager, the run's device and dtype) on the first step input; each
row's first, untimed call is compared with it. A row fails the check when its output has a non-finite value,
a different shape, or an SQNR against the reference below the floor for its bit width (`MIN_SQNR_DB`). The
floors sit well under what correct rows reach (float rows agree to rounding; W8A8 and W4A8 rows of the
benchmark's min/max recipe measured well above theirs on every model, see MIN_SQNR_DB) and well above a
broken one (an output of zeros scores 0 dB, a negated one -6 dB, an unrelated one about 0 dB or less).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffusers_ptq.benchmark.speed.settings import SpeedSettings
from diffusers_ptq.primitives import sqnr_db

# Minimum output SQNR against the float model, in dB: float rows (eager, compiled) and quantized rows by
# weight bits (activations are 8-bit in every quantized row).
# Measured (CPU, float32, the fake-quant and int8 rows): W8A8 25 dB (toy UNets), 29 dB (SD 1.5), 35 dB
# (Fashion); W4A8 14 dB (toy UNets, SD 1.5), 28 dB (Fashion). Float rows are bit-identical on CPU, and
# compiled or half-precision ones agree to rounding; optimum-quanto's W8A8 measured 36-51 dB.
MIN_SQNR_DB: dict[str | int, float] = {"float": 25.0, 8: 10.0, 4: 5.0}
FLOAT_ROWS = ("float", "float-compiled")
OTHER_LIBRARY_ROWS = ("torchao", "quanto")  # always W8A8, whatever --weight-bits says
SQNR_CAP_DB = 200.0  # recorded for an output identical to the reference (an infinite SQNR)


class RowOutputError(Exception):
    """A row whose output does not match the float model's; the message says how."""


def min_sqnr_db(row_id: str, settings: SpeedSettings) -> float:
    """The SQNR floor of row `row_id` under `settings`."""
    if row_id in FLOAT_ROWS:
        return MIN_SQNR_DB["float"]
    return MIN_SQNR_DB[8 if row_id in OTHER_LIBRARY_ROWS else settings.weight_bits]


def output_tensor(output: Any) -> torch.Tensor:
    """The noise prediction in a UNet's return value (diffusers' output class, a tuple or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise RowOutputError(f"the row returned {type(output).__name__}, not a UNet output")


def reference_output(output: Any) -> torch.Tensor:
    """The float model's output, kept as float32 on the CPU for every later comparison."""
    return output_tensor(output).detach().float().cpu()


def check_output(row_id: str, settings: SpeedSettings, output: Any, reference: torch.Tensor) -> float:
    """The SQNR (dB, capped at SQNR_CAP_DB) of the row's `output` against `reference`.

    Raises RowOutputError if the output is not finite, has another shape, or falls below the row's floor.
    """
    out = output_tensor(output).detach().float().cpu()
    if out.shape != reference.shape:
        raise RowOutputError(
            f"output shape {list(out.shape)} differs from the float model's {list(reference.shape)}"
        )
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise RowOutputError(f"output has {bad} non-finite values of {out.numel()}")
    sqnr = min(sqnr_db(reference, out), SQNR_CAP_DB)
    floor = min_sqnr_db(row_id, settings)
    if not math.isfinite(sqnr) or sqnr < floor:
        raise RowOutputError(
            f"output SQNR {sqnr:.1f} dB against the float model is below this row's {floor:g} dB"
        )
    return round(sqnr, 2)
