"""PTQConfig: validation messages, serialisation round trips, presets and overrides, field docs."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import MISSING, fields, is_dataclass

import pytest

from diffusers_ptq.config import (
    GRANULARITIES,
    SAMPLE_SELECTORS,
    SCALE_SEARCHES,
    SPECIAL_LAYER_POLICIES,
    TIMESTEP_SAMPLERS,
    WEIGHT_ROUNDINGS,
    ActivationQuantConfig,
    CalibrationConfig,
    GroupSearchConfig,
    LayerSelectionConfig,
    PTQConfig,
    SelectionConfig,
    WeightQuantConfig,
    describe_fields,
)
from diffusers_ptq.config_search import ACTIVE_SCORES, SEARCH_INITS, SEARCH_TARGETS
from diffusers_ptq.methods import available_presets, get_preset
from diffusers_ptq.reconstruction import ReconstructionConfig

SECTIONS = {
    "weights": WeightQuantConfig,
    "activations": ActivationQuantConfig,
    "calibration": CalibrationConfig,
    "layers": LayerSelectionConfig,
    "selection": SelectionConfig,
    "group_search": GroupSearchConfig,
    "reconstruction": ReconstructionConfig,
}


def _non_default_config() -> PTQConfig:
    return PTQConfig(
        method="my-recipe",
        weights=WeightQuantConfig(
            bits=3,
            granularity="per_tensor",
            group_size=64,
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


# ---------------------------------------------------------------------------------------------- defaults


def test_defaults_validate_and_have_documented_values():
    cfg = PTQConfig()
    cfg.validate()
    assert cfg.weights.bits == 8
    # The default recipe (methods/default.py, BENCHMARKS.md): GPTQ, output correction, 4 layers float, G = 1.
    assert cfg.weights.rounding == "gptq" and cfg.weights.gptq_damp == 0.01
    assert cfg.bias_correction == "output" and cfg.activations.timestep_groups == 1
    mixed = cfg.layers.mixed_precision
    assert (mixed.mode, mixed.max_layers, mixed.high_bits, mixed.metric) == ("max_layers", 4, None, "mse")
    assert not cfg.weights.gptq_act_order and cfg.weights.gptq_block_size == 128
    assert cfg.activations.bits == 8
    assert cfg.activations.enabled
    assert cfg.method == "custom"
    assert cfg.tag == "w8a8"
    for section in SECTIONS:
        getattr(cfg, section).validate(section)


def test_bits_shortcuts_set_nested_fields_and_tag():
    cfg = PTQConfig(weight_bits=4, act_bits=8)
    assert cfg.weights.bits == 4
    assert cfg.activations.bits == 8
    assert cfg.tag == "w4a8"
    assert PTQConfig(weight_bits=8, act_bits=16).tag == "w8a16"


def test_act_bits_none_is_weight_only():
    cfg = PTQConfig(weight_bits=4, act_bits=None)
    assert cfg.activations.bits is None
    assert not cfg.activations.enabled
    assert cfg.tag == "w4"


def test_bits_shortcuts_are_validated():
    with pytest.raises(ValueError, match=r"weights\.bits"):
        PTQConfig(weight_bits=9)
    with pytest.raises(ValueError, match=r"activations\.bits"):
        PTQConfig(act_bits=1)


def test_sections_given_as_dicts_are_converted():
    cfg = PTQConfig(weights={"bits": 4, "granularity": "per_tensor"}, calibration={"num_samples": 5})
    assert isinstance(cfg.weights, WeightQuantConfig)
    assert cfg.weights.bits == 4 and cfg.weights.granularity == "per_tensor"
    assert isinstance(cfg.calibration, CalibrationConfig)
    assert cfg.calibration.num_samples == 5
    assert cfg.calibration.sampler == "uniform"  # the rest keeps its default


def test_default_lists_are_not_shared():
    a, b = PTQConfig(), PTQConfig()
    a.layers.include.append("x")
    a.layers.exclude.append("y")
    assert b.layers.include == ["*"]
    assert b.layers.exclude == []
    assert LayerSelectionConfig().include == ["*"]


# -------------------------------------------------------------------------------------------- validation

BAD_VALUES = [
    ("weights", "bits", 1, "[2, 8]"),
    ("weights", "bits", 9, "[2, 8]"),
    ("weights", "bits", True, "[2, 8]"),
    ("weights", "bits", 4.0, "[2, 8]"),
    ("weights", "bits", None, "[2, 8]"),
    ("weights", "granularity", "per_row", "per_channel"),
    ("weights", "group_size", 48, "32, 64, 128, 256, 512"),
    ("weights", "group_size", 1024, "32, 64, 128, 256, 512"),
    ("weights", "group_size", 64.0, "32, 64, 128, 256, 512"),
    ("weights", "group_size", True, "32, 64, 128, 256, 512"),
    ("weights", "strict_groups", 1, "True or False"),
    ("weights", "symmetric", "yes", "True"),
    ("weights", "scale_search", "kl", "minmax"),
    ("weights", "lp_norm", 0.0, "(0.0, 10.0]"),
    ("weights", "lp_norm", 11.0, "(0.0, 10.0]"),
    ("weights", "num_candidates", 0, "[1, 1000]"),
    ("weights", "num_candidates", 1001, "[1, 1000]"),
    ("weights", "percentile", 50.0, "(50.0, 100.0]"),
    ("weights", "percentile", 100.5, "(50.0, 100.0]"),
    ("weights", "percentile", float("nan"), "(50.0, 100.0]"),
    ("weights", "rounding", "adaround", "'nearest', 'gptq'"),
    ("weights", "gptq_damp", -0.01, "[0.0, 1.0]"),
    ("weights", "gptq_damp", 2.0, "[0.0, 1.0]"),
    ("weights", "gptq_act_order", 1, "True or False"),
    ("weights", "gptq_block_size", 0, "an integer >= 1"),
    ("activations", "bits", 1, "[2, 16]"),
    ("activations", "bits", 17, "[2, 16]"),
    ("activations", "bits", True, "[2, 16]"),
    ("activations", "bits", "8", "[2, 16]"),
    ("activations", "symmetric", None, "True"),
    ("activations", "scale_search", "entropy", "percentile"),
    ("activations", "lp_norm", -1.0, "(0.0, 10.0]"),
    ("activations", "num_candidates", 2.5, "[1, 1000]"),
    ("activations", "percentile", 10.0, "(50.0, 100.0]"),
    ("activations", "timestep_groups", 0, "'per_step'"),
    ("activations", "timestep_groups", 1001, "'per_step'"),
    ("activations", "timestep_groups", "foo", "'per_step'"),
    ("activations", "timestep_groups", True, "'per_step'"),
    ("activations", "timestep_groups", 2.0, "'per_step'"),
    ("activations", "quantize_attention", "no", "True"),
    ("activations", "softmax_bits", 1, "[2, 16]"),
    ("activations", "softmax_bits", 17, "[2, 16]"),
    ("activations", "observer_samples", 15, ">= 16"),
    ("calibration", "sampler", "bogus", "skew_normal"),
    ("calibration", "num_samples", 0, ">= 1"),
    ("calibration", "num_samples", -3, ">= 1"),
    ("calibration", "num_samples", True, ">= 1"),
    ("calibration", "num_inference_steps", 0, "[1, 10000]"),
    ("calibration", "num_inference_steps", 10001, "[1, 10000]"),
    ("calibration", "step_interval", 0, ">= 1"),
    ("calibration", "mean", -0.1, "[0.0, 1.0]"),
    ("calibration", "mean", 1.5, "[0.0, 1.0]"),
    ("calibration", "mean", "0.4", "[0.0, 1.0]"),
    ("calibration", "std", 0, "(0.0, 10.0]"),
    ("calibration", "std", -0.2, "(0.0, 10.0]"),
    ("calibration", "std", 11.0, "(0.0, 10.0]"),
    ("calibration", "skewness", 101.0, "[-100.0, 100.0]"),
    ("calibration", "guidance_scale", -1.0, "[0.0, 100.0]"),
    ("calibration", "batch_size", 0, ">= 1"),
    ("calibration", "seed", -1, ">= 0"),
    ("layers", "include", "x", "list of fnmatch"),
    ("layers", "include", ["ok", 3], "list of fnmatch"),
    ("layers", "include", None, "list of fnmatch"),
    ("layers", "exclude", "*attn*", "list of fnmatch"),
    ("layers", "special_layers", "x", "'8bit'"),
    ("layers", "special_layers", "16bit", "'float'"),
    ("layers", "shortcut_split", "true", "True"),
    ("calibration", "selector", "tdac", "'density_diversity'"),
    ("calibration", "selector", None, "'random'"),
    ("selection", "feature_module", "", "module name"),
    ("selection", "feature_module", 3, "module name"),
    ("selection", "feature_samples", 0, ">= 1"),
    ("selection", "density_radius", 0.0, "(0.0, 1000000000000.0]"),
    ("selection", "density_radius", float("inf"), "(0.0, 1000000000000.0]"),
    ("selection", "diversity_weight", -1.0, "[0.0, 1000000.0]"),
    ("selection", "active_round_size", 0, ">= 1"),
    ("selection", "active_score", "mixed", "'paper'"),
    ("selection", "active_eta", -0.5, "[0.0, 1000000.0]"),
    ("selection", "active_exclude_noisiest", -1, ">= 0"),
    ("selection", "active_search_epochs", 1.5, ">= 0"),
    ("group_search", "enabled", "yes", "True"),
    ("group_search", "init", "random", "'ranges'"),
    ("group_search", "init_logit", -1.0, "[0.0, 100.0]"),
    ("group_search", "target", "eps", "'noise'"),
    ("group_search", "num_images", 0, ">= 1"),
    ("group_search", "epochs", -1, ">= 0"),
    ("group_search", "batch_size", 0, ">= 1"),
    ("group_search", "lr", 0.0, "(0.0, 10.0]"),
    ("group_search", "lr", "1e-3", "(0.0, 10.0]"),
    ("group_search", "lr_min", -1e-5, "[0.0, 10.0]"),
    ("group_search", "entropy_weight", float("nan"), "[0.0, 1000000.0]"),
    ("group_search", "refit_scales", 1, "True"),
]


@pytest.mark.parametrize(
    ("section", "name", "bad", "expected"),
    BAD_VALUES,
    ids=[f"{s}.{n}={v!r}" for s, n, v, _ in BAD_VALUES],
)
def test_bad_value_names_field_value_and_allowed(section, name, bad, expected):
    with pytest.raises(ValueError) as info:
        PTQConfig(**{section: {name: bad}})
    msg = str(info.value)
    assert f"{section}.{name}" in msg
    assert repr(bad) in msg
    assert expected in msg
    # The same check through the section's own validate().
    obj = SECTIONS[section]()
    setattr(obj, name, bad)
    with pytest.raises(ValueError, match=re.escape(f"{section}.{name}")):
        obj.validate(section)


@pytest.mark.parametrize(
    ("section", "name", "choices"),
    [
        ("weights", "granularity", GRANULARITIES),
        ("weights", "scale_search", SCALE_SEARCHES),
        ("weights", "rounding", WEIGHT_ROUNDINGS),
        ("activations", "scale_search", SCALE_SEARCHES),
        ("calibration", "sampler", TIMESTEP_SAMPLERS),
        ("layers", "special_layers", SPECIAL_LAYER_POLICIES),
        ("selection", "active_score", ACTIVE_SCORES),
        ("group_search", "target", SEARCH_TARGETS),
        ("group_search", "init", SEARCH_INITS),
    ],
)
def test_choice_errors_list_every_choice_and_accept_each(section, name, choices):
    with pytest.raises(ValueError) as info:
        PTQConfig(**{section: {name: "not-a-choice"}})
    for choice in choices:
        assert repr(choice) in str(info.value)
    for choice in choices:
        assert getattr(getattr(PTQConfig(**{section: {name: choice}}), section), name) == choice


def test_selector_choices_are_listed_and_each_accepted():
    with pytest.raises(ValueError) as info:
        PTQConfig(calibration={"selector": "not-a-choice"})
    for choice in SAMPLE_SELECTORS:
        assert repr(choice) in str(info.value)
    search = {"enabled": True}
    for choice in SAMPLE_SELECTORS:  # 'active' scores steps by the group search: it comes with it
        cfg = PTQConfig(
            calibration={"selector": choice}, activations={"timestep_groups": 8}, group_search=search
        )
        assert cfg.calibration.selector == choice


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        ({"calibration": {"selector": "active"}}, "calibration.selector", "group_search.enabled=True"),
        ({"group_search": {"enabled": True}, "act_bits": None}, "group_search.enabled", "weight-only"),
        (
            {"group_search": {"enabled": True}, "activations": {"timestep_groups": "per_step"}},
            "group_search.enabled",
            "integer number of groups",
        ),
    ],
)
def test_cross_section_combinations_name_both_fields(overrides, field, expected):
    with pytest.raises(ValueError) as info:
        PTQConfig().replace(**overrides)
    assert field in str(info.value) and expected in str(info.value)


def test_lr_min_above_lr_is_rejected():
    with pytest.raises(ValueError, match=r"group_search\.lr_min=0\.1.*<= group_search\.lr=0\.01"):
        PTQConfig(group_search={"lr": 0.01, "lr_min": 0.1})


def test_group_search_with_one_group_is_allowed():
    # G = 1 is the ablation's baseline: only the scale is learned.
    cfg = PTQConfig(group_search={"enabled": True}, activations={"timestep_groups": 1})
    assert cfg.group_search.enabled


@pytest.mark.parametrize(
    ("section", "name", "good"),
    [
        ("weights", "bits", 2),
        ("weights", "bits", 8),
        ("weights", "group_size", 32),
        ("weights", "group_size", 512),
        ("activations", "bits", 2),
        ("activations", "bits", 16),
        ("activations", "bits", None),
        ("activations", "timestep_groups", 1000),
        ("activations", "timestep_groups", "per_step"),
        ("activations", "softmax_bits", 16),
        ("weights", "percentile", 100.0),
        ("weights", "lp_norm", 10.0),
        ("calibration", "mean", 0.0),
        ("calibration", "mean", 1.0),
        ("calibration", "mean", 1),
        ("calibration", "std", 10.0),
        ("calibration", "skewness", -100.0),
        ("calibration", "guidance_scale", 0.0),
        ("calibration", "num_inference_steps", None),
        ("calibration", "seed", 0),
        ("layers", "include", []),
        ("selection", "density_radius", 1e12),
        ("selection", "diversity_weight", 0.0),
        ("selection", "active_eta", 0.0),
        ("selection", "active_search_epochs", 0),
        ("group_search", "epochs", 0),
        ("group_search", "lr", None),
        ("group_search", "init_logit", 0.0),
        ("group_search", "entropy_weight", 0.0),
    ],
)
def test_boundary_values_are_accepted(section, name, good):
    cfg = PTQConfig(**{section: {name: good}})
    assert getattr(getattr(cfg, section), name) == good


@pytest.mark.parametrize(
    ("section", "name"),
    [
        ("weights", "symmetric"),
        ("weights", "strict_groups"),
        ("activations", "symmetric"),
        ("activations", "quantize_attention"),
        ("layers", "shortcut_split"),
        ("group_search", "enabled"),
        ("group_search", "refit_scales"),
    ],
)
@pytest.mark.parametrize("bad", [1, 0.0])
def test_bool_fields_reject_numbers(section, name, bad):
    with pytest.raises(ValueError, match=re.escape(f"{section}.{name}")):
        PTQConfig(**{section: {name: bad}})


def test_section_of_wrong_type_is_rejected():
    with pytest.raises(ValueError, match="weights"):
        PTQConfig(weights=8)
    with pytest.raises(ValueError, match="method"):
        PTQConfig(method=3)
    # Swapped sections are not accepted either.
    with pytest.raises(ValueError, match="WeightQuantConfig"):
        PTQConfig(weights=ActivationQuantConfig())


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
    assert cfg.weights.granularity == "per_channel"
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


# ----------------------------------------------------------------------------------------------- presets


def test_available_presets_lists_every_method():
    assert {"ptq4dm", "q-diffusion", "apq-dm", "eda-dm", "tfmq-dm"} <= set(available_presets())


@pytest.mark.parametrize("name", ["apq-dm", "APQ_DM"])
def test_apq_dm_preset_values(name):
    cfg = PTQConfig.preset(name)
    assert cfg.method == "apq-dm"
    assert cfg.activations.timestep_groups == 8  # G = 8
    assert cfg.activations.symmetric is False  # a (scale, zero-point) set per group
    assert cfg.calibration.selector == "active"
    assert cfg.calibration.num_samples == 1024
    assert cfg.selection.active_score == "paper"
    assert cfg.selection.active_eta == 1.5
    assert cfg.selection.active_round_size == 16
    search = cfg.group_search
    assert search.enabled is True
    assert search.entropy_weight == 0.8
    assert (search.epochs, search.batch_size, search.num_images) == (10, 64, 1024)
    assert search.lr is None and search.lr_min == 1e-5  # 5e-3 at 8 bits, 3e-3 below, decaying to 1e-5
    assert search.target == "auto"
    # Ablations switch parts through the config alone.
    ablation = PTQConfig.preset(
        name, calibration={"selector": "random", "num_samples": 64}, activations={"timestep_groups": 4}
    )
    assert ablation.calibration.selector == "random" and ablation.group_search.enabled
    no_search = PTQConfig.preset(
        name, calibration={"selector": "density_diversity"}, group_search={"enabled": False}
    )
    assert not no_search.group_search.enabled


def test_eda_dm_preset_values():
    from diffusers_ptq.methods.eda_dm import EDA_DM_DATASETS, eda_dm_config

    cfg = PTQConfig.preset("eda-dm")
    assert cfg.method == "eda-dm"
    assert cfg.calibration.selector == "density_diversity"
    assert cfg.calibration.num_samples == 1024
    assert (cfg.selection.density_radius, cfg.selection.diversity_weight) == (3.0, 1.2)
    assert cfg.selection.feature_module == "mid_block.attentions.0"
    assert cfg.activations.timestep_groups == 1  # one static scale for all timesteps
    assert cfg.weights.symmetric is True and cfg.activations.symmetric is True
    assert cfg.activations.softmax_bits == 8 and cfg.layers.special_layers == "8bit"
    assert cfg.group_search.enabled is False
    sd = eda_dm_config("sd")
    assert (sd.selection.density_radius, sd.selection.diversity_weight, sd.calibration.num_samples) == (
        0.3,
        5.0,
        256,
    )
    assert sd.selection.feature_samples == 8
    assert eda_dm_config("lsun").selection.diversity_weight == 1.0
    with pytest.raises(ValueError, match=r"dataset='coco'.*cifar"):
        eda_dm_config("coco")
    assert set(EDA_DM_DATASETS) == {"cifar", "imagenet", "lsun", "sd"}
    # FBR: joint rounding + step sizes, cosine decay, QDrop 0.5, gamma 0.8, 5,000 iterations, no regulariser.
    recon = cfg.reconstruction
    assert recon.enabled and recon.optimization == "joint"
    assert (recon.iterations, recon.batch_size, recon.round_weight) == (5000, 32, 0.0)
    assert (recon.weight_lr_schedule, recon.act_lr_schedule) == ("cosine", "cosine")
    assert (recon.layer_loss_weight, recon.qdrop_prob) == (0.8, 0.5)
    assert (recon.weight_lr, recon.act_lr) == (0.05, 1e-3)  # CIFAR W8A8
    assert eda_dm_config("lsun").reconstruction.layer_loss_weight == 1.0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, (0.05, 1e-3)),  # W8A8
        ({"weight_bits": 4}, (0.5, 5e-4)),  # CIFAR W4A8
        ({"weight_bits": 6, "act_bits": 6}, (0.5, 5e-4)),  # low-bit: the W4A8 pair
        ({"weight_bits": 4, "reconstruction": {"weight_lr": 0.1}}, (0.1, 5e-4)),  # explicit wins
        ({"weight_bits": 4, "reconstruction": {"act_lr": 2e-3}}, (0.5, 2e-3)),
    ],
)
def test_eda_dm_learning_rates_follow_the_weight_bits(overrides, expected):
    cfg = PTQConfig.preset("eda-dm", **overrides)
    assert (cfg.reconstruction.weight_lr, cfg.reconstruction.act_lr) == expected
    # A whole section is taken as given.
    whole = PTQConfig.preset("eda-dm", weight_bits=4, reconstruction=ReconstructionConfig(weight_lr=0.3))
    assert whole.reconstruction.weight_lr == 0.3


def test_tfmq_dm_preset_values():
    cfg = PTQConfig.preset("tfmq-dm")
    base = PTQConfig.preset("q-diffusion")
    assert cfg.method == "tfmq-dm"
    assert cfg.activations.timestep_groups == "per_step"  # FSC
    assert cfg.reconstruction.temporal_block is True  # TIAR
    assert cfg.reconstruction.replace(temporal_block=False) == base.reconstruction
    assert (cfg.weights, cfg.layers) == (base.weights, base.layers)
    assert cfg.calibration.step_interval == 1  # every step has samples for its own scales
    assert dataclasses.replace(cfg.calibration, step_interval=2) == base.calibration
    assert not cfg.group_search.enabled


def test_presets_without_reconstruction():
    assert not PTQConfig.preset("ptq4dm").reconstruction.enabled
    assert not PTQConfig.preset("apq-dm").reconstruction.enabled
    assert PTQConfig().reconstruction == ReconstructionConfig()


def test_weight_only_nearest_rounding_reconstruction_is_refused():
    with pytest.raises(ValueError, match=r"reconstruction\.weight_rounding.*'nearest'.*adaround"):
        PTQConfig(act_bits=None, reconstruction={"enabled": True, "weight_rounding": "nearest"})
    # Off, the combination is harmless.
    PTQConfig(act_bits=None, reconstruction={"weight_rounding": "nearest"})


@pytest.mark.parametrize("name", ["q-diffusion", "Q-Diffusion", "q_diffusion", "Q_DIFFUSION"])
def test_q_diffusion_preset_values(name):
    cfg = PTQConfig.preset(name)
    assert cfg.method == "q-diffusion"
    assert cfg.tag == "w8a8"
    # Asymmetric BRECQ-style quantizers with the lp (p = 2.4) search.
    assert cfg.weights.symmetric is False
    assert cfg.activations.symmetric is False
    assert cfg.weights.granularity == "per_channel"
    for section in (cfg.weights, cfg.activations):
        assert section.scale_search == "mse"
        assert section.lp_norm == 2.4
        assert section.num_candidates == 100
    assert cfg.activations.timestep_groups == 1
    assert cfg.activations.quantize_attention is True
    assert cfg.activations.softmax_bits == 16
    # Every 2nd step of the schedule, uniform.
    assert cfg.calibration.sampler == "uniform"
    assert cfg.calibration.step_interval == 2
    assert cfg.calibration.num_samples == 128 * 25
    # Everything quantized (conv_in/conv_out/time embedding at the same bits), shortcut-split on.
    assert cfg.layers.shortcut_split is True
    assert cfg.layers.special_layers == "same"
    # BRECQ: AdaRound with activations float, then LSQ step sizes (docs/methods.md, "Block reconstruction").
    recon = cfg.reconstruction
    assert recon.enabled and recon.optimization == "sequential" and recon.weight_rounding == "adaround"
    assert (recon.iterations, recon.act_iterations, recon.batch_size) == (20000, 5000, 32)
    assert (recon.weight_lr, recon.act_lr, recon.round_weight) == (1e-3, 4e-4, 0.01)
    assert (recon.beta_start, recon.beta_end, recon.warmup) == (20.0, 2.0, 0.2)
    assert recon.layer_loss_weight == 0.0 and recon.qdrop_prob == 0.0 and not recon.temporal_block
    cfg.validate()


@pytest.mark.parametrize("name", ["ptq4dm", "PTQ4DM", "Ptq4Dm"])
def test_ptq4dm_preset_values(name):
    cfg = PTQConfig.preset(name)
    assert cfg.method == "ptq4dm"
    assert cfg.tag == "w8a8"
    assert cfg.weights.symmetric is True
    assert cfg.weights.granularity == "per_channel"
    assert cfg.activations.symmetric is True
    for section in (cfg.weights, cfg.activations):
        assert section.scale_search == "mse"
        assert section.lp_norm == 2.4
        assert section.num_candidates == 100
    assert cfg.activations.timestep_groups == 1
    assert cfg.calibration.sampler == "skew_normal"
    assert cfg.calibration.num_samples == 1024
    assert cfg.calibration.mean == 0.4
    assert cfg.calibration.std == 0.4
    assert cfg.calibration.skewness < 0  # tail toward t = 0
    assert cfg.calibration.mean < 0.5  # mass below T/2
    assert cfg.layers.special_layers == "8bit"
    assert cfg.layers.shortcut_split is False
    cfg.validate()


@pytest.mark.parametrize("name", ["ptq4dm", "q-diffusion"])
def test_preset_overrides(name):
    base = PTQConfig.preset(name)
    cfg = PTQConfig.preset(name, weight_bits=4, act_bits=6, calibration={"num_samples": 8})
    assert cfg.weights.bits == 4
    assert cfg.activations.bits == 6
    assert cfg.tag == "w4a6"
    assert cfg.calibration.num_samples == 8
    # Partial section dicts leave the preset's other values alone.
    assert cfg.calibration.sampler == base.calibration.sampler
    assert cfg.calibration.step_interval == base.calibration.step_interval
    assert cfg.calibration.skewness == base.calibration.skewness
    assert cfg.weights.symmetric == base.weights.symmetric
    assert cfg.layers == base.layers
    assert cfg.method == name

    weight_only = PTQConfig.preset(name, act_bits=None)
    assert weight_only.tag == "w8"

    whole = PTQConfig.preset(name, layers=LayerSelectionConfig(special_layers="float"))
    assert whole.layers == LayerSelectionConfig(special_layers="float")

    renamed = PTQConfig.preset(name, method="mine", activations={"timestep_groups": 4})
    assert renamed.method == "mine"
    assert renamed.activations.timestep_groups == 4
    assert renamed.activations.symmetric == base.activations.symmetric


def test_preset_override_values_are_validated():
    with pytest.raises(ValueError, match=r"weights\.bits"):
        PTQConfig.preset("q-diffusion", weight_bits=1)
    with pytest.raises(ValueError, match=r"calibration\.num_samples"):
        PTQConfig.preset("ptq4dm", calibration={"num_samples": 0})
    with pytest.raises(ValueError, match=r"calibration\.nope"):
        PTQConfig.preset("ptq4dm", calibration={"nope": 0})
    with pytest.raises(ValueError, match="layers"):
        PTQConfig.preset("ptq4dm", layers="float")


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as info:
        PTQConfig.preset("brecq")
    msg = str(info.value)
    assert "brecq" in msg
    for name in available_presets():
        assert name in msg


def test_unknown_override_lists_valid_names():
    with pytest.raises(ValueError) as info:
        PTQConfig.preset("ptq4dm", wbits=4)
    msg = str(info.value)
    assert "wbits" in msg
    for name in ("weight_bits", "act_bits", "method", *SECTIONS):
        assert name in msg


def test_replace_returns_validated_copy():
    cfg = PTQConfig()
    new = cfg.replace(weight_bits=4)
    assert new.weights.bits == 4
    assert cfg.weights.bits == 8
    assert new.weights is not cfg.weights


@pytest.mark.parametrize("name", ["ptq4dm", "q-diffusion"])
def test_presets_are_fresh_objects(name):
    first = PTQConfig.preset(name)
    first.weights.bits = 2
    first.calibration.num_samples = 1
    first.layers.include.append("mutated")
    second = PTQConfig.preset(name)
    assert second.weights.bits == 8
    assert second.calibration.num_samples != 1
    assert second.layers.include == ["*"]
    assert second is not first
    assert get_preset(name) == second
    assert get_preset(name) is not get_preset(name)


# ------------------------------------------------------------------------------------------ field docs


def test_describe_fields_covers_every_field_with_help():
    rows = describe_fields()
    names = [name for name, _, _ in rows]
    expected = {"method", "bias_correction"}
    for s, cls in SECTIONS.items():
        for f in fields(cls):
            default = f.default_factory() if f.default is MISSING else f.default
            # A nested section (layers.mixed_precision) is described field by field.
            nested = [f"{s}.{f.name}.{g.name}" for g in fields(default)] if is_dataclass(default) else []
            expected |= set(nested) or {f"{s}.{f.name}"}
    assert set(names) == expected
    assert len(names) == len(set(names))
    default = PTQConfig()
    for name, value, help_text in rows:
        assert isinstance(help_text, str) and help_text.strip(), name
        if "." in name:
            owner = default
            *path, attr = name.split(".")
            for part in path:
                owner = getattr(owner, part)
            assert value == getattr(owner, attr), name
        else:
            assert value == getattr(default, name)
    by_name = {name: help_text for name, _, help_text in rows}
    for choice in TIMESTEP_SAMPLERS:
        assert choice in by_name["calibration.sampler"]
    for choice in SCALE_SEARCHES:
        assert choice in by_name["weights.scale_search"]


def test_describe_fields_of_one_section():
    rows = describe_fields(WeightQuantConfig, "weights.")
    assert [name for name, _, _ in rows] == [f"weights.{f.name}" for f in fields(WeightQuantConfig)]
