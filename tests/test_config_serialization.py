"""PTQConfig: dict and JSON round trips, and the errors of malformed input."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from config_helpers import SECTIONS
from diffusers_ptq.config import (
    ActivationQuantConfig,
    CalibrationConfig,
    GroupSearchConfig,
    LayerSelectionConfig,
    PTQConfig,
    SelectionConfig,
    WeightQuantConfig,
)
from diffusers_ptq.methods import available_presets, get_preset
from diffusers_ptq.reconstruction import ReconstructionConfig


def _non_default_config() -> PTQConfig:
    return PTQConfig(
        method="my-recipe",
        weights=WeightQuantConfig(
            bits=3,
            granularity="per_tensor",
            group_size=128,
            strict_groups=True,
            symmetric=False,
            scale_search="percentile",
            lp_norm=3.0,
            num_candidates=50,
            percentile=99.5,
            rounding="nearest",
            gptq_damp=0.05,
            gptq_act_order=True,
            gptq_block_size=64,
        ),
        activations=ActivationQuantConfig(
            bits=6,
            symmetric=True,
            scale_search="minmax",
            lp_norm=2.0,
            num_candidates=20,
            percentile=99.0,
            timestep_groups=4,
            quantize_attention=False,
            softmax_bits=10,
            observer_samples=1024,
        ),
        calibration=CalibrationConfig(
            sampler="normal",
            selector="active",
            num_samples=33,
            num_inference_steps=25,
            step_interval=3,
            mean=0.3,
            std=0.25,
            skewness=1.5,
            guidance_scale=7.5,
            batch_size=4,
            seed=123,
        ),
        layers=LayerSelectionConfig(
            include=["down_blocks.*", "mid_block.*"],
            exclude=["*attn*"],
            special_layers="float",
            shortcut_split=False,
            mixed_precision={
                "mode": "avg_weight_bits",
                "avg_weight_bits": 4.5,
                "max_layers": 3,
                "high_bits": 6,
                "metric": "bias",
                "num_samples": 16,
            },
        ),
        selection=SelectionConfig(
            feature_module="down_blocks.1.attentions.0",
            feature_samples=8,
            density_radius=0.3,
            diversity_weight=5.0,
            active_round_size=4,
            active_score="code",
            active_eta=2.0,
            active_exclude_noisiest=30,
            active_search_epochs=2,
        ),
        group_search=GroupSearchConfig(
            enabled=True,
            init="contiguous",
            init_logit=0.0,
            target="float",
            num_images=16,
            epochs=3,
            batch_size=16,
            lr=1e-2,
            lr_min=0.0,
            entropy_weight=1.0,
            refit_scales=True,
        ),
        reconstruction=ReconstructionConfig(
            enabled=True,
            optimization="joint",
            weight_rounding="adaround",
            learn_act_scales=False,
            iterations=77,
            act_iterations=33,
            batch_size=5,
            batch_sampling="stratified",
            weight_lr=0.2,
            act_lr=1e-3,
            weight_lr_schedule="cosine",
            act_lr_schedule="constant",
            round_weight=0.1,
            beta_start=10.0,
            beta_end=3.0,
            warmup=0.1,
            loss_p=2.4,
            act_loss_p=2.2,
            layer_loss_weight=0.5,
            qdrop_prob=0.25,
            temporal_block=True,
            transformer_unit="model",
            num_samples=64,
            cache_dtype="float32",
            cache_batch_size=4,
            cache_max_gb=2.5,
            cache_dir="/tmp/ptq-cache",
            offload="cpu",
            offload_device="cuda:1",
            max_minutes=1.5,
            holdout=0.3,
            sampling_check=3,
            seed=9,
        ),
    )


# ------------------------------------------------------------------------------------------ serialisation


def _all_configs() -> list[tuple[str, PTQConfig]]:
    out = [("default", PTQConfig()), ("non_default", _non_default_config())]
    out += [(name, get_preset(name)) for name in available_presets()]
    out.append(("weight_only", PTQConfig(weight_bits=4, act_bits=None)))
    out.append(("per_step", PTQConfig(activations={"timestep_groups": "per_step"})))
    return out


# Fields that cannot all leave their defaults at once (the combination would leave nothing to do).
_EXCLUSIVE = {("reconstruction", "weight_rounding")}


def test_non_default_config_really_differs_everywhere():
    cfg, default = _non_default_config(), PTQConfig()
    for section in SECTIONS:
        for f in fields(SECTIONS[section]):
            if (section, f.name) in _EXCLUSIVE:
                continue
            assert getattr(getattr(cfg, section), f.name) != getattr(getattr(default, section), f.name), (
                f"{section}.{f.name}"
            )
    assert cfg.method != default.method


@pytest.mark.parametrize(("label", "cfg"), _all_configs(), ids=[label for label, _ in _all_configs()])
def test_dict_and_json_round_trip_exactly(label, cfg):
    data = cfg.to_dict()
    assert set(data) == {*SECTIONS, "method", "bias_correction"}
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    again = PTQConfig.from_dict(data)
    assert again == cfg
    assert again.to_dict() == data
    text = cfg.to_json()
    from_text = PTQConfig.from_json(text)
    assert from_text == cfg
    assert from_text.to_json() == text
    assert PTQConfig.from_json(cfg.to_json(indent=None)) == cfg
    assert from_text.tag == cfg.tag


def test_round_trip_with_tuple_patterns():
    cfg = PTQConfig(layers=LayerSelectionConfig(include=("down_blocks.*",), exclude=("*attn*",)))
    assert PTQConfig.from_dict(cfg.to_dict()) == cfg
    assert PTQConfig.from_json(cfg.to_json()) == cfg


def test_to_dict_is_a_copy():
    cfg = PTQConfig()
    data = cfg.to_dict()
    data["layers"]["include"].append("oops")
    data["weights"]["bits"] = 2
    assert cfg.layers.include == ["*"]
    assert cfg.weights.bits == 8


def test_from_dict_partial_keeps_defaults():
    cfg = PTQConfig.from_dict({"weights": {"bits": 4}, "method": "x"})
    assert cfg.weights.bits == 4
    assert cfg.weights.granularity == "auto"
    assert cfg.activations == ActivationQuantConfig()
    assert cfg.method == "x"
    assert PTQConfig.from_dict({}) == PTQConfig()


def test_from_dict_validates():
    with pytest.raises(ValueError, match=r"activations\.bits"):
        PTQConfig.from_dict({"activations": {"bits": 40}})
    with pytest.raises(ValueError, match=r"calibration\.sampler"):
        PTQConfig.from_json('{"calibration": {"sampler": "bogus"}}')


def test_unknown_top_level_key_is_named_with_valid_keys():
    with pytest.raises(ValueError) as info:
        PTQConfig.from_dict({"weights": {}, "wieghts": {"bits": 4}})
    msg = str(info.value)
    assert "wieghts" in msg
    for key in (*SECTIONS, "method"):
        assert key in msg


@pytest.mark.parametrize("section", list(SECTIONS))
def test_unknown_nested_key_is_named_with_valid_keys(section):
    with pytest.raises(ValueError) as info:
        PTQConfig.from_dict({section: {"no_such_field": 1}})
    msg = str(info.value)
    assert f"{section}.no_such_field" in msg
    for f in fields(SECTIONS[section]):
        assert f.name in msg


def test_unknown_nested_key_in_json_is_rejected():
    data = PTQConfig().to_dict()
    data["activations"]["bitz"] = 4
    with pytest.raises(ValueError, match=r"activations\.bitz"):
        PTQConfig.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["{", '{"weights": {"bits": 4}', "not json", '{"weights": }', ""])
def test_malformed_json_raises_value_error(text):
    with pytest.raises(ValueError, match="malformed"):
        PTQConfig.from_json(text)


def test_section_value_of_wrong_type_in_dict_is_rejected():
    with pytest.raises(ValueError, match="weights"):
        PTQConfig.from_dict({"weights": [8]})
