"""Checkpoints written before a recipe field existed load as they ran, not with today's defaults."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_ptq import PTQConfig, quantize_pipeline
from diffusers_ptq.serialization import CheckpointError
from diffusers_ptq.serialization.layout import META_PLAN
from diffusers_ptq.serialization.quant_config import with_legacy_fields
from diffusers_ptq.tiny import tiny_ddim_pipeline
from serialization_helpers import FAST, SEARCH, WEIGHTS, edit_config, mixed_inputs, read_checkpoint, rewrite

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


# -- per-layer group sizes -------------------------------------------------------------------------------


def _grouped(unet) -> dict[str, tuple]:
    return {
        n: tuple(q.group_size for q in m.weight_quantizers)
        for n, m in unet.named_modules()
        if hasattr(m, "weight_quantizers")
    }


def _w4(granularity: str) -> PTQConfig:
    weights = {**SEARCH, "rounding": "nearest", "granularity": granularity}
    layers = {"special_layers": "same"}  # every layer at 4 bits: 'auto' then means groups everywhere
    return PTQConfig(
        weight_bits=4, act_bits=8, weights=weights, activations=SEARCH, bias_correction="off", layers=layers
    )


def test_near_group_sizes_are_saved_per_layer_and_reload_bit_exact(tmp_path):
    pipe = tiny_ddim_pipeline()  # K = 144, 288, 432: groups of 48, 48 and 54 under 'auto'
    quantize_pipeline(pipe, _w4("auto"), **FAST)
    sizes = _grouped(pipe.unet)
    assert {48, 54} <= {g for parts in sizes.values() for g in parts}
    pipe.unet.save_pretrained(tmp_path)
    _, metadata = read_checkpoint(tmp_path / WEIGHTS)
    records = {r[0]: r for r in json.loads(metadata[META_PLAN])["layers"]}
    assert {n: tuple(r[-1]) for n, r in records.items()} == {n: sizes[n] for n in records}
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert _grouped(loaded) == sizes
    x, t = mixed_inputs(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, pipe.unet(x, t).sample)


def test_a_checkpoint_without_group_sizes_loads_with_the_rule_it_was_written_under(tmp_path):
    # Before per-layer sizes, 'auto' gave a layer the configured size where it divided K, else per-channel
    # scales: what an explicit 'per_group' still does. Such a file, with today's 'auto' rule, would not fit.
    pipe = tiny_ddim_pipeline()
    with pytest.warns(UserWarning, match="does not divide"):
        quantize_pipeline(pipe, _w4("per_group"), **FAST)
    pipe.unet.save_pretrained(tmp_path)

    def drop_sizes(tensors, metadata):
        plan = json.loads(metadata[META_PLAN])
        plan["layers"] = [record[:-1] for record in plan["layers"]]
        metadata[META_PLAN] = json.dumps(plan)

    rewrite(tmp_path / WEIGHTS, drop_sizes)
    edit_config(tmp_path, lambda q: q["ptq_config"]["weights"].update(granularity="auto"))
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert _grouped(loaded) == _grouped(pipe.unet)
    assert loaded.ptq_state.config.weights.granularity == "auto"
    x, t = mixed_inputs(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, pipe.unet(x, t).sample)


@pytest.mark.parametrize("bad", [50, 0])
def test_a_stored_group_size_that_does_not_divide_k_is_refused(tmp_path, bad):
    pipe = tiny_ddim_pipeline()
    quantize_pipeline(pipe, _w4("auto"), **FAST)
    pipe.unet.save_pretrained(tmp_path)

    def corrupt(tensors, metadata):
        plan = json.loads(metadata[META_PLAN])
        record = next(r for r in plan["layers"] if r[-1] == [48])
        record[-1] = [bad]
        metadata[META_PLAN] = json.dumps(plan)

    rewrite(tmp_path / WEIGHTS, corrupt)
    with pytest.raises(CheckpointError, match=f"groups of {bad} do not fit"):
        UNet2DModel.from_pretrained(tmp_path)
