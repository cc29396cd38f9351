"""optimum-quanto's own W8A8, for side-by-side rows in the speed and quality benchmarks.

quanto's recipe, as its documentation gives it: `quantize(model, weights=qint8, activations=qint8)`, then
forward passes inside `Calibration()` (activation ranges as running min/max), then `freeze(model)` (the
weights become int8). Nothing of diffusers-ptq takes part: no timestep groups, no scale search.

In the quality benchmark the forward passes are the calibration pipeline calls of the q-diffusion row: the
same trajectories (count, noise seeds, batches) and DDIM steps. quanto observes every UNet call of those
trajectories, where q-diffusion keeps every second step.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffusers_ptq.calibration import get_pipeline_spec, planned_timesteps, recording_mask
from diffusers_ptq.calibration.capture import quiet_pipeline
from diffusers_ptq.calibration.pipelines import inference_steps
from diffusers_ptq.config import CalibrationConfig

QUANTO_ROW = "quanto W8A8"
QUANTO_METHOD = "optimum-quanto"  # the quality row's `preset` field: the method that quantized it
INSTALL_HINT = "pip install 'diffusers-ptq[compare]'"


def quanto_unavailable_reason() -> str | None:
    """None when optimum-quanto imports; otherwise why not, with the install hint."""
    try:
        importlib.import_module("optimum.quanto")
    except ImportError as err:
        return f"optimum-quanto is not installed ({err}); {INSTALL_HINT}"
    except Exception as err:  # an installed but broken build (e.g. an incompatible torch): say so
        return f"optimum-quanto cannot be imported: {type(err).__name__}: {err}"
    return None


def quanto_w8a8(model: nn.Module, calibrate: Callable[[], None]) -> None:
    """Quantize `model` in place with quanto (int8 weights and activations); `calibrate()` runs the
    forward passes quanto observes. Raises ImportError (with the install hint) without optimum-quanto."""
    reason = quanto_unavailable_reason()
    if reason is not None:
        raise ImportError(reason)
    from optimum.quanto import Calibration, freeze, qint8, quantize

    quantize(model, weights=qint8, activations=qint8)
    with torch.no_grad(), Calibration():
        calibrate()
    freeze(model)


def quanto_pipeline_quantizer(calibration: CalibrationConfig) -> Callable[[Any], dict[str, Any]]:
    """`quantize(pipe) -> info`: quanto W8A8 on `pipe.unet`, calibrated through `pipe(...)` over the
    trajectories `calibration` records (generator seeded as diffusers-ptq's capture seeds it)."""

    def quantize(pipe: Any) -> dict[str, Any]:
        spec = get_pipeline_spec(pipe)
        steps = inference_steps(pipe, calibration.num_inference_steps)
        num_train = int(pipe.scheduler.config.num_train_timesteps)
        step_timesteps = planned_timesteps(pipe, steps)
        mask_gen = torch.Generator().manual_seed(calibration.seed)
        trajectories = recording_mask(calibration, step_timesteps, num_train, mask_gen).shape[0]
        generator = torch.Generator().manual_seed(calibration.seed)
        calls = 0

        def count(module: nn.Module, args: tuple) -> None:
            nonlocal calls
            calls += 1

        def calibrate() -> None:
            with quiet_pipeline(pipe):
                for start in range(0, trajectories, calibration.batch_size):
                    n = min(calibration.batch_size, trajectories - start)
                    spec.run(pipe, n, steps, None, generator)

        start = time.perf_counter()
        handle = pipe.unet.register_forward_pre_hook(count)
        try:
            quanto_w8a8(pipe.unet, calibrate)
        finally:
            handle.remove()
        return {
            "method": QUANTO_METHOD,
            "weights": "qint8",
            "activations": "qint8",
            "trajectories": trajectories,
            "num_inference_steps": steps,
            "unet_calls": calls,
            "seconds": round(time.perf_counter() - start, 2),
        }

    return quantize
