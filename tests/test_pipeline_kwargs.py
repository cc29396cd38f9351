"""`quantize_pipeline(..., pipeline_kwargs=...)`: the pipeline's own call arguments reach every calibration
call (a dict for all, a list cycled one trajectory per call); bad ones fail before any model runs."""

from __future__ import annotations

import functools

import pytest
from diffusers import StableDiffusionImg2ImgPipeline

from diffusers_ptq import quantize_pipeline
from diffusers_ptq.tiny import tiny_sd_pipeline
from diffusers_ptq.tiny_variants import tiny_controlnet_pipeline, tiny_image
from pipeline_helpers import FAST, PROMPTS, called_timesteps, image_sqnr, images, quantize_recording, w8a8
from test_errors import _assert_untouched, _snapshot


class LoggingImg2Img(StableDiffusionImg2ImgPipeline):
    """Img2img that logs the init image and strength of every call (its signature is its parent's)."""

    calls: list

    @functools.wraps(StableDiffusionImg2ImgPipeline.__call__)
    def __call__(self, *args, **kwargs):
        self.calls.append((kwargs.get("image"), kwargs.get("strength"), len(kwargs["prompt"])))
        return super().__call__(*args, **kwargs)


def _img2img():
    pipe = LoggingImg2Img(**tiny_sd_pipeline().components, requires_safety_checker=False)
    pipe.calls = []
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_dict_reaches_every_call_with_batched_trajectories(monkeypatch):
    pipe = _img2img()
    kwargs = {"image": tiny_image(0), "strength": 0.5}
    data = quantize_recording(pipe, monkeypatch, prompts=PROMPTS, pipeline_kwargs=kwargs)
    assert pipe.calls and all(image is kwargs["image"] and s == 0.5 for image, s, _ in pipe.calls)
    assert max(n for _, _, n in pipe.calls) > 1  # trajectories still batched per call
    assert data.step_timesteps.double().tolist() == called_timesteps(
        pipe, prompt=PROMPTS[:1], num_inference_steps=4, **kwargs
    )


def test_a_list_is_cycled_one_trajectory_per_call(monkeypatch):
    pipe = _img2img()
    per_trajectory = [{"image": tiny_image(i), "strength": 0.75} for i in range(3)]
    call = {"prompt": PROMPTS[:1], "num_inference_steps": 4, **per_trajectory[1]}
    reference = images(pipe, **call)
    pipe.calls.clear()
    data = quantize_recording(pipe, monkeypatch, prompts=PROMPTS, pipeline_kwargs=per_trajectory)
    capture_calls = pipe.calls[1:]  # after the planning run
    assert all(n == 1 for _, _, n in capture_calls)
    n_traj = int(data.trajectory.max()) + 1
    assert [image for image, _, _ in capture_calls] == [per_trajectory[i % 3]["image"] for i in range(n_traj)]
    assert image_sqnr(reference, images(pipe, **call)) > 29.0  # measured 32.8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompt": "x"}, ValueError, r"'prompt', which calibration sets itself; use prompts="),
        ({"num_inference_steps": 3}, ValueError, r"use num_inference_steps="),
        ({"generator": None}, ValueError, r"use generator="),
        ({"output_type": "pil"}, ValueError, r"'output_type'.*stops the pipeline before decoding"),
        ({"guidance_scale": 2.0}, ValueError, r"use guidance_scale="),
        ({"num_images_per_prompt": 2}, ValueError, r"use num_samples="),
        ({"mask_image": 1}, TypeError, r"'mask_image', but LoggingImg2Img.__call__ takes no argument"),
        ([{"strength": 0.5}, {"strength": 0.5, "eta": 0.0}], ValueError, r"pipeline_kwargs\[1\] has keys"),
        ([], TypeError, r"non-empty list of dicts"),
        ("strength=0.5", TypeError, r"must be a dict"),
    ],
)
def test_bad_pipeline_kwargs_fail_before_any_model_runs(kwargs, error, match):
    pipe = _img2img()
    snap = _snapshot(pipe.unet)
    with pytest.raises(error, match=match):
        quantize_pipeline(pipe, w8a8(), prompts=PROMPTS, pipeline_kwargs=kwargs, **FAST)
    assert pipe.calls == []  # the pipeline never ran
    _assert_untouched(pipe.unet, snap)


def test_controlnet_without_a_control_image_is_the_pipelines_own_error():
    pipe = tiny_controlnet_pipeline()
    snap = _snapshot(pipe.unet)
    with pytest.raises((TypeError, ValueError), match="image"):
        quantize_pipeline(pipe, w8a8(), prompts=PROMPTS, **FAST)
    _assert_untouched(pipe.unet, snap)


def test_per_trajectory_kwargs_that_change_the_schedule_are_refused():
    pipe = _img2img()
    snap = _snapshot(pipe.unet)
    per_trajectory = [{"image": tiny_image(0), "strength": s} for s in (0.5, 1.0)]
    with pytest.raises(RuntimeError, match="must be the same for every trajectory"):
        quantize_pipeline(pipe, w8a8(), prompts=PROMPTS, pipeline_kwargs=per_trajectory, **FAST)
    _assert_untouched(pipe.unet, snap)
