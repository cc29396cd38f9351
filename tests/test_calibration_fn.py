"""`quantize_pipeline(..., calibration_fn=fn)`: the user runs the pipeline; every UNet call it makes is a
step the samplers choose among, checked against a planning run of the same function."""

from __future__ import annotations

import pytest
import torch

from diffusers_ptq import quantize_pipeline
from diffusers_ptq.tiny_variants import tiny_image, tiny_sd_img2img_pipeline
from pipeline_helpers import (
    FAST,
    PROMPTS,
    called_timesteps,
    image_sqnr,
    images,
    quantize_recording,
    w8a8,
)
from test_errors import _assert_untouched, _snapshot

CALL = {"prompt": PROMPTS[:2], "image": tiny_image(0), "strength": 0.8, "num_inference_steps": 5}


def _pipe():
    pipe = tiny_sd_img2img_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_calibration_fn_runs_the_pipeline_its_own_way(monkeypatch):
    pipe = _pipe()
    runs = []

    def calibrate(p):
        runs.append(1)
        seed = torch.Generator().manual_seed(len(runs))
        p(**CALL, guidance_scale=5.0, output_type="latent", generator=seed)

    reference = images(pipe, **CALL)
    called = called_timesteps(pipe, **CALL)
    config = w8a8(sampler="all")
    data = quantize_recording(pipe, monkeypatch, config, calibration_fn=calibrate, num_samples=24)
    assert data.step_timesteps.double().tolist() == called  # every UNet call of the function is a step
    assert data.timesteps.double().tolist() == [called[s] for s in data.step_index.tolist()]
    # 2 prompts with guidance: 4 rows a call, each its own trajectory; 24 samples over 4 steps need 6.
    assert data.guidance_halves == 1 and data.trajectory.unique().tolist() == list(range(6))
    assert len(runs) == 3  # the planning run and 2 capture runs
    assert pipe.unet.ptq_state.config.calibration.num_inference_steps == len(called)
    assert image_sqnr(reference, images(pipe, **CALL)) > 26.0


def test_calibration_fn_that_never_calls_the_unet():
    pipe = _pipe()
    snap = _snapshot(pipe.unet)
    with pytest.raises(ValueError, match="calibration_fn ran the pipeline but the UNet was never called"):
        quantize_pipeline(pipe, w8a8(), calibration_fn=lambda p: p.vae, **FAST)
    _assert_untouched(pipe.unet, snap)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"calibration_fn": "run"}, TypeError, "calibration_fn must be a callable"),
        ({"calibration_fn": print, "prompts": PROMPTS}, ValueError, "prompts is for the calls"),
        (
            {"calibration_fn": print, "pipeline_kwargs": {"strength": 0.5}},
            ValueError,
            "pipeline_kwargs is for",
        ),
    ],
)
def test_bad_calibration_fn_arguments(kwargs, error, match):
    pipe = _pipe()
    snap = _snapshot(pipe.unet)
    with pytest.raises(error, match=match):
        quantize_pipeline(pipe, w8a8(), **kwargs, **FAST)
    _assert_untouched(pipe.unet, snap)
