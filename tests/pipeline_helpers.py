"""Helpers of the any-pipeline tests: a cheap W8A8 recipe, what the pipeline called, float vs quantized."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import diffusers_ptq.api as api
from diffusers_ptq import quantize_pipeline
from diffusers_ptq.primitives import sqnr_db
from recipe_helpers import plain

PROMPTS = ["a photo of a cat", "a red car", "a watercolor of a tree", "a city at night"]
FAST = {"num_samples": 8, "num_inference_steps": 4, "batch_size": 4, "progress": False}
SEARCH = {"num_candidates": 20}


def w8a8(**calibration: Any) -> Any:
    """W8A8, nearest rounding, no bias correction or mixed precision: fast, and only calibration matters."""
    return plain(weight_bits=8, act_bits=8, weights=SEARCH, activations=SEARCH, calibration=calibration)


def called_timesteps(pipe: Any, **call: Any) -> list[float]:
    """The timestep of every UNet call one float run of `pipe(**call)` makes."""
    seen: list[float] = []

    def hook(module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        seen.append(float(torch.as_tensor(t).reshape(-1)[0]))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        handle.remove()
    return seen


def images(pipe: Any, **call: Any) -> np.ndarray:
    return pipe(**call, generator=torch.Generator().manual_seed(123), output_type="np").images


def quantize_recording(pipe: Any, monkeypatch: Any, config: Any = None, **kwargs: Any) -> Any:
    """`quantize_pipeline(pipe, ...)` at W8A8 (FAST unless overridden); returns the CalibrationSet it used."""
    seen = []
    select = api.select_calibration

    def spy(request, feedback=None):
        selection = select(request, feedback)
        seen.append(selection.data)
        return selection

    monkeypatch.setattr(api, "select_calibration", spy)
    quantize_pipeline(pipe, config or w8a8(), **{**FAST, **kwargs})
    return seen[0]


def image_sqnr(reference: np.ndarray, output: np.ndarray) -> float:
    return sqnr_db(torch.from_numpy(reference).double(), torch.from_numpy(output).double())
