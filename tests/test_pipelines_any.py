"""Any pipeline whose denoiser is a UNet2DModel / UNet2DConditionModel calibrates through its own loop.

Each case quantizes at W8A8 with the pipeline's own call arguments, checks that the plan and every recorded
step are the timesteps the float pipeline really calls (truncated img2img schedules, LCM's few-step one),
and requires the quantized images to stay close to float.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusers_ptq import supported_pipelines
from diffusers_ptq.calibration import get_pipeline_spec
from diffusers_ptq.calibration.pipelines import spec_for_class_name
from diffusers_ptq.tiny import tiny_ddpm_pipeline, tiny_sd_pipeline
from diffusers_ptq.tiny_variants import (
    tiny_controlnet_pipeline,
    tiny_depth2img_pipeline,
    tiny_image,
    tiny_inpaint_pipeline,
    tiny_lcm_pipeline,
    tiny_sample_prediction_pipeline,
    tiny_sd_img2img_pipeline,
    tiny_sdxl_img2img_pipeline,
    tiny_upscale_pipeline,
    tiny_v_prediction_pipeline,
)
from pipeline_helpers import PROMPTS, called_timesteps, image_sqnr, images, quantize_recording, w8a8


class MyPipeline(StableDiffusionPipeline):
    """A user's own subclass: driven from its signature like its parent."""


def _subclass_pipeline():
    return MyPipeline(**tiny_sd_pipeline().components, requires_safety_checker=False)


IMAGE, MASK = tiny_image(0), tiny_image(1, "mask")
DEPTH = torch.linspace(0.0, 1.0, 32 * 32).reshape(
    1, 32, 32
)  # a depth ramp, given as the pipeline's depth_map
# name: (builder, pipeline_kwargs, UNet inputs the capture must record, image SQNR bound in dB)
# Bounds sit a few dB under the measured values; ControlNet's fails (24 dB) without its residuals replayed.
CASES = {
    "sd_img2img": (tiny_sd_img2img_pipeline, {"image": IMAGE, "strength": 0.6}, set(), 25.0),  # 28.8
    "sd_inpaint": (tiny_inpaint_pipeline, {"image": IMAGE, "mask_image": MASK}, set(), 25.0),  # 29.0
    "sd_controlnet": (
        tiny_controlnet_pipeline,
        {"image": IMAGE},
        {"down_block_additional_residuals", "mid_block_additional_residual"},
        33.0,  # 37.8
    ),
    "sdxl_img2img": (
        tiny_sdxl_img2img_pipeline,
        {"image": IMAGE, "strength": 0.6},
        {"added_cond_kwargs"},
        29.0,  # 33.1
    ),
    "lcm": (tiny_lcm_pipeline, {}, {"timestep_cond"}, 30.0),  # 34.2
    "v_prediction": (tiny_v_prediction_pipeline, {}, set(), 26.0),  # 30.4
    # The upscaler takes one image per prompt: a per-trajectory list, one trajectory per call.
    "sd_upscale": (  # 7-channel UNet, the noise level as class_labels
        tiny_upscale_pipeline,
        [{"image": IMAGE.resize((16, 16))}],
        {"class_labels"},
        28.0,  # 31.7
    ),
    "subclass": (_subclass_pipeline, {}, set(), 27.0),  # 30.7
    # x0 prediction: the UNet's error reaches the image undamped (random weights), hence the lower bound
    "sample_prediction": (tiny_sample_prediction_pipeline, {}, set(), 16.0),  # 18.8
    "sd_depth2img": (
        tiny_depth2img_pipeline,
        {"image": IMAGE, "depth_map": DEPTH, "strength": 0.7},
        set(),
        20.0,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_calibrates_through_its_own_loop(name, monkeypatch):
    build, kwargs, recorded, bound = CASES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    per_call = kwargs[0] if isinstance(kwargs, list) else kwargs
    call = {"prompt": PROMPTS[: 1 if isinstance(kwargs, list) else 2], "num_inference_steps": 4, **per_call}
    reference = images(pipe, **call)
    called = called_timesteps(pipe, **call)
    # Three prompts for more trajectories than that: cycled with fresh noise.
    data = quantize_recording(pipe, monkeypatch, prompts=PROMPTS[:3], pipeline_kwargs=kwargs or None)
    assert data.step_timesteps.double().tolist() == called  # the plan is what the pipeline called
    steps = data.step_index.tolist()
    assert data.timesteps.double().tolist() == [called[s] for s in steps]
    present = set(data.inputs) | set(data.extra_inputs)
    present |= {"added_cond_kwargs"} if data.added_cond_kwargs else set()
    assert recorded <= present
    # Inpainting (9) and upscaler (7) UNets: the recorded input is what the UNet takes, extra channels too.
    assert data.inputs["sample"].shape[1] == pipe.unet.config.in_channels
    report = pipe.unet.ptq_state.report
    assert report.pipeline == type(pipe).__name__ and report.distinct_prompts == 3
    out = images(pipe, **call)
    assert image_sqnr(reference, out) > bound


def test_spec_is_read_from_the_call_signature():
    sd, ddpm = get_pipeline_spec(tiny_sd_pipeline()), get_pipeline_spec(tiny_ddpm_pipeline())
    assert (sd.text_conditioned, sd.output_type, sd.batch_arg) == (True, "latent", "prompt")
    assert (ddpm.text_conditioned, ddpm.output_type, ddpm.batch_arg) == (False, "np", "batch_size")
    assert get_pipeline_spec(_subclass_pipeline()).name == "MyPipeline"
    img2img = spec_for_class_name("StableDiffusionImg2ImgPipeline")
    assert img2img is not None and img2img.accepts("strength")
    assert spec_for_class_name("NotAPipeline") is None
    assert spec_for_class_name("FluxPipeline") is None  # a transformer denoiser, no unet
    assert "StableDiffusionControlNetPipeline" in supported_pipelines()


def test_fewer_prompts_than_trajectories_are_cycled(monkeypatch):
    pipe = tiny_sd_pipeline()
    config = w8a8(sampler="all")
    # Every step recorded: 9 samples over 4 steps need 3 trajectories from 2 prompts.
    data = quantize_recording(pipe, monkeypatch, config, prompts=["a", "b"], num_samples=9)
    assert data.trajectory.unique().tolist() == [0, 1, 2]
    first = (data.step_index == 0).nonzero().flatten()  # [uncond, cond] rows of trajectories 0, 1, 2
    rows = {int(data.trajectory[i]): i for i in first.tolist() if data.guidance_halves}
    cond = {t: data.inputs["encoder_hidden_states"][i] for t, i in rows.items()}
    assert torch.equal(cond[0], cond[2]) and not torch.equal(cond[0], cond[1])  # prompt "a" again
    sample = {t: data.inputs["sample"][i] for t, i in rows.items()}
    assert not torch.equal(sample[0], sample[2])  # with fresh noise
    assert pipe.unet.ptq_state.report.distinct_prompts == 2
    assert pipe.unet.ptq_state.num_prompts == 2
