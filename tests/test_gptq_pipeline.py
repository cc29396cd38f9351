"""GPTQ in quantize_pipeline / quantize_unet: lower noise error than nearest, exact save/load, errors.

Failures restoring the UNet are tested in test_restore_on_failure.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_ptq import PTQConfig, convert, quantize_pipeline, quantize_unet
from diffusers_ptq.calibration import capture, get_pipeline_spec, planned_timesteps
from diffusers_ptq.gptq import gptq_quantize, release_float_weights
from diffusers_ptq.initialise import set_quant_state
from diffusers_ptq.reconstruction.inputs import weights_on_grid
from diffusers_ptq.tiny import tiny_unet2d
from integer_helpers import assert_unet_agrees, unet_inputs
from recipe_helpers import plain
from reconstruction_helpers import calibration_set

PROMPTS = ["a photo of a cat", "a red car", "a watercolor of a tree", "a city at night"]
FAST = {"num_samples": 8, "num_inference_steps": 4, "batch_size": 8, "progress": False}


def _config(rounding: str, **weights) -> PTQConfig:
    # The other data-dependent parts off (recipe_helpers.plain): the comparison is GPTQ against nearest alone.
    return plain(
        weight_bits=4,
        act_bits=8,
        weights={"num_candidates": 20, "symmetric": False, "rounding": rounding, **weights},
        activations={"num_candidates": 20, "timestep_groups": 2},
    )


def _fresh(pipe):
    return copy.deepcopy(pipe)


def _held_out(pipe, text: bool):
    """UNet inputs of two fresh trajectories (other prompts, other noise), every step: real inputs."""
    steps = FAST["num_inference_steps"]
    planned = planned_timesteps(pipe, steps)
    return capture(
        pipe,
        get_pipeline_spec(pipe),
        torch.ones(2, steps, dtype=torch.bool),
        planned,
        num_train_timesteps=pipe.scheduler.config.num_train_timesteps,
        num_inference_steps=steps,
        prompts=["a blue house", "a dog on a beach"] if text else None,
        guidance_scale=None,
        batch_size=2,
        generator=torch.Generator().manual_seed(123),
        progress=False,
    )


def _noise_error(unet, reference, data) -> float:
    with torch.no_grad():
        out = unet(**data.unet_kwargs(slice(None))).sample
    return float((out - reference).pow(2).mean())


@pytest.mark.parametrize(
    "kind",
    ["ddim_pipe", "sd_pipe", pytest.param("sdxl_pipe", marks=pytest.mark.slow)],  # SDXL: ~11 s
)
def test_gptq_lowers_noise_error_and_reloads_bit_exact(kind, request, tmp_path):
    pipe = request.getfixturevalue(kind)
    text = kind != "ddim_pipe"
    kwargs = {**FAST, "prompts": PROMPTS} if text else FAST
    held_out = _held_out(pipe, text)
    with torch.no_grad():
        reference = pipe.unet(**held_out.unet_kwargs(slice(None))).sample
    nearest = quantize_pipeline(_fresh(pipe), _config("nearest"), **kwargs)
    gptq = quantize_pipeline(_fresh(pipe), _config("gptq"), **kwargs)
    state = gptq.unet.ptq_state
    assert state.gptq["layers"] > 0 and state.report.gptq == state.gptq
    assert "GPTQ" in str(state.report) and nearest.unet.ptq_state.gptq is None
    assert weights_on_grid(gptq.unet) and not weights_on_grid(nearest.unet)
    assert not any("float_weight" in m.__dict__ for m in gptq.unet.modules())  # released after the job
    error = _noise_error(gptq.unet, reference, held_out)
    assert error < 0.9 * _noise_error(nearest.unet, reference, held_out)

    gptq.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    with torch.no_grad():
        expect = gptq.unet(**held_out.unet_kwargs(slice(None))).sample
        assert torch.equal(loaded.unet(**held_out.unet_kwargs(slice(None))).sample, expect)


def test_float_weights_stay_reachable_during_the_job():
    """With weights off the GPTQ'd layers compute with their float weights (float targets stay float)."""
    unet = tiny_unet2d(sample_size=8)
    data = calibration_set(unet, rows=10)
    x = data.unet_kwargs(slice(0, 4))
    quantize_unet(unet, _config("nearest"), data, progress=False)
    set_quant_state(unet, weights=False, acts=False)
    with torch.no_grad():
        float_out = unet(**x).sample
    gptq_quantize(unet, data, unet.ptq_state.config.weights, acts=True, progress=False)
    set_quant_state(unet, weights=False, acts=False)
    with torch.no_grad():
        assert torch.equal(unet(**x).sample, float_out)
        release_float_weights(unet)
        assert not torch.equal(unet(**x).sample, float_out)


def test_reconstruction_starts_from_gptq_weights():
    unet = tiny_unet2d(sample_size=8)
    data = calibration_set(unet, rows=10)
    recon = {"enabled": True, "iterations": 4, "act_iterations": 2, "batch_size": 4, "cache_dtype": "float32"}
    config = _config("gptq")
    config.reconstruction = type(config.reconstruction)(**recon)
    quantize_unet(unet, config, data, progress=False)
    state = unet.ptq_state
    assert state.gptq["layers"] > 0 and state.reconstruction["units"]
    first = state.reconstruction["units"][0]
    assert first["iterations"] > 0 and first["loss_before"] > 0
    assert weights_on_grid(unet)


def test_too_few_samples_names_the_layer_and_leaves_the_unet_float():
    unet = tiny_unet2d(sample_size=8)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    data = calibration_set(unet, rows=4)  # the time embedding's first linear sees one vector per row
    with pytest.raises(ValueError, match=r"time_embedding\.linear_1 .*4 calibration rows.*calibration rows"):
        quantize_unet(unet, _config("gptq", gptq_damp=0.0), data, progress=False)
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@torch.no_grad()
def test_gptq_weights_convert_to_integer_kernels(ddim_pipe):
    """The GPTQ codes are plain integer weights: `convert` runs them and agrees with fake quant."""
    pipe = quantize_pipeline(_fresh(ddim_pipe), _config("gptq"), **FAST)
    unet = pipe.unet
    inputs = unet_inputs(unet)
    ref, float_ref = unet(**inputs).sample, ddim_pipe.unet(**inputs).sample  # the float weights are gone
    report = convert(unet)
    assert report.integer and not report.fallback
    assert_unet_agrees(unet(**inputs).sample, ref, float_ref)


def test_weight_only_quantization_on_load_rounds_to_nearest_and_says_so(tmp_path):
    """No calibration inputs while loading: GPTQ falls back to nearest rounding, with a warning, and the
    loaded model's recipe says nearest (what was applied)."""
    from diffusers import UNet2DModel

    from diffusers_ptq import PTQQuantizationConfig
    from diffusers_ptq.serialization.loading import data_free_recipe

    unet = tiny_unet2d()
    unet.save_pretrained(tmp_path)
    config = PTQQuantizationConfig(PTQConfig(weight_bits=4, act_bits=None, weights={"rounding": "gptq"}))
    with pytest.warns(UserWarning, match=r"not applied: weights\.rounding='gptq' -> 'nearest'"):
        loaded = UNet2DModel.from_pretrained(tmp_path, quantization_config=config)
    assert loaded.ptq_state.config.weights.rounding == "nearest"
    recipe, _ = data_free_recipe(PTQConfig(weight_bits=4, act_bits=None))
    nearest = UNet2DModel.from_pretrained(tmp_path, quantization_config=PTQQuantizationConfig(recipe))
    inputs = unet_inputs(unet)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, nearest(**inputs).sample)
