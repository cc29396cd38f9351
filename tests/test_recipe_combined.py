"""The issue-15 parts together on one UNet: GPTQ on group-wise scales, layer bias tables and mixed
precision in one recipe. Each part is tested alone in its own file; this checks they compose: GPTQ still
beats nearest rounding on the group grid, the result sits on that grid, reloads bit-exact with stock
`from_pretrained`, and `convert` agrees with fake quant on a mixed-timestep batch."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_ptq import PTQConfig, convert, quantize_pipeline
from diffusers_ptq.reconstruction.inputs import weights_on_grid
from diffusers_ptq.tiny import tiny_sd_pipeline
from integer_helpers import assert_unet_agrees, float_output, unet_inputs
from recipe_helpers import plain
from serialization_helpers import FAST, PROMPTS, SEARCH

GROUPED = {**SEARCH, "granularity": "per_group", "group_size": 32, "symmetric": False}


def _config(rounding: str, **extra) -> PTQConfig:
    return plain(
        weight_bits=4,
        act_bits=8,
        weights={**GROUPED, "rounding": rounding},
        activations={**SEARCH, "timestep_groups": 2},
        **extra,
    )


def _quantize(config: PTQConfig):
    pipe = tiny_sd_pipeline()
    with pytest.warns(UserWarning, match=r"group_size=32"):
        quantize_pipeline(pipe, config, prompts=PROMPTS, **FAST)
    return pipe


@pytest.fixture(scope="module")
def float_pipe():
    return tiny_sd_pipeline()


@torch.no_grad()
def _noise_error(unet, float_unet, inputs) -> float:
    return float((unet(**inputs).sample - float_unet(**inputs).sample).pow(2).mean())


@pytest.mark.slow  # ~12 s on 2 CPU cores
def test_gptq_beats_nearest_on_the_group_grid(float_pipe):
    # One torch thread: CPU kernels round differently with another thread count, and the margin on this
    # tiny random-weight UNet (4.4 % at one thread, more at two) should not depend on the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = unet_inputs(float_pipe.unet, seed=1)
        nearest = _quantize(_config("nearest"))
        gptq = _quantize(_config("gptq"))
        assert weights_on_grid(gptq.unet)
        error = _noise_error(gptq.unet, float_pipe.unet, inputs)
        assert error < 0.97 * _noise_error(nearest.unet, float_pipe.unet, inputs)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # ~24 s on 2 CPU cores
@torch.no_grad()
def test_gptq_group_scales_bias_tables_and_mixed_precision_compose(tmp_path):
    mixed = {"mode": "max_layers", "max_layers": 2, "high_bits": 8}
    pipe = _quantize(_config("gptq", bias_correction="layer", layers={"mixed_precision": mixed}))
    unet, state = pipe.unet, pipe.unet.ptq_state
    assert state.gptq["layers"] > 0 and state.bias_correction is not None
    promoted = state.report.mixed_precision["promoted"]
    assert len(promoted) == 2 and all(bits == 8 for _, bits in promoted)
    assert weights_on_grid(unet)

    inputs = unet_inputs(unet)  # a batch mixing timesteps from both groups
    expect = unet(**inputs).sample
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert torch.equal(loaded.unet(**inputs).sample, expect)

    integer = copy.deepcopy(unet)
    float_ref = float_output(unet, inputs)
    report = convert(integer, kernel="int_mm")
    assert not report.fallback
    assert_unet_agrees(integer(**inputs).sample, expect, float_ref)
