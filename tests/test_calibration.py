"""Calibration capture records exactly the steps the sampler chose from the pipeline's own schedule."""

from __future__ import annotations

import pytest
import torch

from diffusers_ptq.calibration import capture, get_pipeline_spec, planned_timesteps, recording_mask
from diffusers_ptq.config import CalibrationConfig
from diffusers_ptq.tiny import tiny_sd_pipeline


def _capture(pipe, calib: CalibrationConfig, steps: int, prompts=None, guidance_scale=None):
    spec = get_pipeline_spec(pipe)
    planned = planned_timesteps(pipe, steps)
    mask = recording_mask(calib, planned, 1000, torch.Generator().manual_seed(calib.seed))
    data = capture(
        pipe,
        spec,
        mask,
        planned,
        num_train_timesteps=1000,
        num_inference_steps=steps,
        prompts=prompts,
        guidance_scale=guidance_scale,
        batch_size=calib.batch_size,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    return data, mask, planned


def _seen_timesteps(pipe, steps, prompts=None):
    """The timesteps the pipeline really passes to its UNet, read with an independent hook."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: seen.append(float(a[1])), with_kwargs=True)
    try:
        if prompts is None:
            pipe(batch_size=1, num_inference_steps=steps, output_type="np")
        else:
            pipe(prompts[:1], num_inference_steps=steps, output_type="latent")
    finally:
        handle.remove()
    return torch.tensor(seen, dtype=torch.float64)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_karras", "dpm", "pndm"])
def test_recorded_steps_match_sampler_and_schedule(scheduler, prompts):
    pipe = tiny_sd_pipeline(scheduler=scheduler)
    steps = 6
    calib = CalibrationConfig(sampler="uniform", step_interval=2, num_samples=7, batch_size=3)
    data, mask, planned = _capture(pipe, calib, steps, prompts=prompts)
    # The plan is the schedule the pipeline really runs (Euler/Karras timesteps are floats).
    torch.testing.assert_close(planned.double(), _seen_timesteps(pipe, steps, prompts))
    expected = sorted((int(j), int(i)) for j, i in mask.nonzero())
    assert len(expected) == 7
    got = sorted(zip(data.trajectory.tolist()[::2], data.step_index.tolist()[::2]))
    assert got == expected
    # Every row's timestep is the planned timestep of its step; both guidance halves are recorded.
    torch.testing.assert_close(data.timesteps.double(), planned[data.step_index].double())
    assert data.guidance_halves == 2 and len(data) == 14
    torch.testing.assert_close(data.train_timesteps, planned[data.step_index].double().round().long())


def test_unconditional_records_only_planned_rows(ddim_pipe):
    calib = CalibrationConfig(sampler="normal", num_samples=10, batch_size=4, seed=3)
    data, mask, _ = _capture(ddim_pipe, calib, steps=20)
    assert len(data) == 10 and data.guidance_halves == 1
    assert sorted(zip(data.trajectory.tolist(), data.step_index.tolist())) == sorted(
        (int(j), int(i)) for j, i in mask.nonzero()
    )
    assert data.inputs["sample"].shape == (10, 3, 16, 16)
    assert data.inputs["sample"].device.type == "cpu"


def test_staggered_capture_records_its_offset_steps_on_separate_trajectories(ddim_pipe):
    calib = CalibrationConfig(sampler="staggered", step_interval=3, num_samples=11, batch_size=4, seed=1)
    data, mask, _ = _capture(ddim_pipe, calib, steps=9)
    assert mask.shape[0] == 4 and len(data) == 11
    got = sorted(zip(data.trajectory.tolist(), data.step_index.tolist()))
    assert got == [(0, 0), (0, 3), (0, 6), (1, 1), (1, 4), (1, 7), (2, 2), (2, 5), (2, 8), (3, 0), (3, 3)]
    # Each trajectory is its own noise draw: the same step on two trajectories holds different inputs.
    first = data.inputs["sample"][(data.trajectory == 0) & (data.step_index == 0)]
    fourth = data.inputs["sample"][(data.trajectory == 3) & (data.step_index == 0)]
    assert not torch.equal(first, fourth)


def test_recorded_inputs_equal_the_pipeline_unet_inputs(ddim_pipe):
    """Rows hold exactly the tensors the UNet saw at that step (not a re-implemented sampler)."""
    calib = CalibrationConfig(sampler="all", num_samples=5, batch_size=1)
    data, _, _ = _capture(ddim_pipe, calib, steps=5)
    seen = []
    handle = ddim_pipe.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append(a[0].clone()), with_kwargs=True
    )
    try:
        ddim_pipe(
            batch_size=1, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np"
        )
    finally:
        handle.remove()
    torch.testing.assert_close(data.inputs["sample"], torch.cat(seen))


def test_capture_stops_the_run_after_the_last_needed_step(ddim_pipe):
    calls = []
    handle = ddim_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        calib = CalibrationConfig(sampler="uniform", step_interval=100, num_samples=1, batch_size=1)
        _capture(ddim_pipe, calib, steps=50)  # only step 0 is needed
    finally:
        handle.remove()
    assert len(calls) == 0  # the pre-hook stopped the run before the first forward completed


def test_sdxl_records_added_conditioning(sdxl_pipe, prompts):
    calib = CalibrationConfig(sampler="all", num_samples=4, batch_size=2)
    data, _, _ = _capture(sdxl_pipe, calib, steps=2, prompts=prompts)
    assert set(data.added_cond_kwargs) == {"text_embeds", "time_ids"}
    assert data.added_cond_kwargs["time_ids"].shape[0] == len(data) == 8
    kwargs = data.unet_kwargs(slice(0, 3))
    with torch.no_grad():
        out = sdxl_pipe.unet(**kwargs).sample
    assert out.shape == data.inputs["sample"][:3].shape


def _stop_loop_after(pipe, steps: int) -> None:
    """Make `pipe`'s sampling loop end after `steps` steps, as a callback that stops it would."""
    pipe.progress_bar = lambda iterable=None, total=None: iter(list(iterable)[:steps])


@pytest.mark.parametrize("stop_after", [0, 3])
def test_a_run_that_ends_early_is_an_error(ddim_pipe, stop_after):
    _stop_loop_after(ddim_pipe, stop_after)
    calib = CalibrationConfig(sampler="all", num_samples=5, batch_size=1)
    with pytest.raises(RuntimeError, match=rf"planned 5 UNet input rows .* recorded {stop_after}\b"):
        _capture(ddim_pipe, calib, steps=5)


def test_a_run_that_ends_after_the_last_needed_step_is_fine(ddim_pipe):
    _stop_loop_after(ddim_pipe, 2)  # the capture itself stops the run after step 1
    calib = CalibrationConfig(sampler="uniform", step_interval=4, num_samples=1, batch_size=1)
    data, _, _ = _capture(ddim_pipe, calib, steps=8)
    assert len(data) == 1


def test_quantize_pipeline_plans_the_calls_a_loop_really_makes(ddim_pipe):
    from diffusers_ptq import PTQConfig, quantize_pipeline

    # The plan comes from a run of the pipeline itself: a loop that always stops after 2 steps is planned
    # (and calibrated) as 2 steps; a run that then ends earlier than planned is still refused (see above).
    _stop_loop_after(ddim_pipe, 2)
    config = PTQConfig(weights={"num_candidates": 10}, activations={"num_candidates": 10})
    quantize_pipeline(ddim_pipe, config, num_samples=8, num_inference_steps=6, progress=False)
    assert ddim_pipe.unet.ptq_state.config.calibration.num_inference_steps == 6
    assert sum(ddim_pipe.unet.ptq_state.selection["samples_per_step"]) == 8
    assert len(ddim_pipe.unet.ptq_state.selection["samples_per_step"]) == 2


def test_feature_pass_refuses_a_run_that_ends_early(ddim_pipe):
    from diffusers_ptq.calibration.features import step_feature_grams

    _stop_loop_after(ddim_pipe, 3)
    with pytest.raises(RuntimeError, match="made 3 UNet calls but its scheduler planned 5"):
        step_feature_grams(
            ddim_pipe,
            get_pipeline_spec(ddim_pipe),
            "mid_block.attentions.0",
            num_trajectories=2,
            num_inference_steps=5,
            num_steps=5,
            prompts=None,
            guidance_scale=None,
            batch_size=2,
            generator=torch.Generator().manual_seed(0),
            progress=False,
        )
