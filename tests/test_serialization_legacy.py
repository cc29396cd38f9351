"""Checkpoints written before a recipe field existed load as they ran, not with today's defaults."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_ptq import PTQConfig, quantize_pipeline
from diffusers_ptq.serialization.quant_config import with_legacy_fields
from diffusers_ptq.tiny import tiny_ddim_pipeline
from serialization_helpers import FAST, SEARCH, edit_config, mixed_inputs

# What every checkpoint ran with before GPTQ, bias correction and mixed precision existed.
LEGACY = {
    "weights": {**SEARCH, "rounding": "nearest"},
    "bias_correction": "off",
    "layers": {"mixed_precision": {"mode": "off"}},
}


def _drop_new_fields(config: dict) -> None:
    recipe = config["ptq_config"]
    del recipe["weights"]["rounding"], recipe["bias_correction"], recipe["layers"]["mixed_precision"]


def test_a_recipe_without_the_new_fields_loads_as_it_ran(tmp_path):
    pipe = tiny_ddim_pipeline()
    quantize_pipeline(pipe, PTQConfig(weight_bits=8, act_bits=8, activations=SEARCH, **LEGACY), **FAST)
    pipe.unet.save_pretrained(tmp_path)
    edit_config(tmp_path, _drop_new_fields)
    loaded = UNet2DModel.from_pretrained(tmp_path)
    recipe = loaded.ptq_state.config
    assert recipe.weights.rounding == "nearest" and recipe.bias_correction == "off"
    assert not recipe.layers.mixed_precision.enabled
    x, t = mixed_inputs(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, pipe.unet(x, t).sample)


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ({}, ("nearest", "off", "off")),
        ({"weights": {"rounding": "gptq"}, "bias_correction": "output"}, ("gptq", "output", "off")),
        (
            {"layers": {"mixed_precision": {"mode": "max_layers", "max_layers": 2}}},
            ("nearest", "off", "max_layers"),
        ),
    ],
)
def test_legacy_fields_fill_only_what_is_missing(recipe, expected):
    filled = with_legacy_fields(recipe)
    got = (
        filled["weights"]["rounding"],
        filled["bias_correction"],
        filled["layers"]["mixed_precision"]["mode"],
    )
    assert got == expected
    assert (
        "rounding" not in recipe.get("weights", {}) or recipe["weights"]["rounding"] == "gptq"
    )  # not mutated
