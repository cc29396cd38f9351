"""PTQConfig: defaults, validation messages naming field, value and choices, field docs."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields, is_dataclass

import pytest

from config_helpers import SECTIONS
from diffusers_ptq.config import (
    GRANULARITIES,
    SAMPLE_SELECTORS,
    SCALE_SEARCHES,
    SPECIAL_LAYER_POLICIES,
    TIMESTEP_SAMPLERS,
    WEIGHT_ROUNDINGS,
    ActivationQuantConfig,
    CalibrationConfig,
    LayerSelectionConfig,
    PTQConfig,
    WeightQuantConfig,
    describe_fields,
)
from diffusers_ptq.config_search import ACTIVE_SCORES, SEARCH_INITS, SEARCH_TARGETS

# ---------------------------------------------------------------------------------------------- defaults


def test_defaults_validate_and_have_documented_values():
    cfg = PTQConfig()
    cfg.validate()
    assert cfg.weights.bits == 8
    # The default recipe (methods/default.py, BENCHMARKS.md): GPTQ, output correction, layers float (five at
    # 4-bit weights, four above), G = 1.
    assert cfg.weights.rounding == "gptq" and cfg.weights.gptq_damp == 0.01
    assert cfg.bias_correction == "output" and cfg.activations.timestep_groups == 1
    mixed = cfg.layers.mixed_precision
    assert (mixed.mode, mixed.max_layers, mixed.high_bits, mixed.metric) == (
        "max_layers",
        "auto",
        None,
        "mse",
    )
    assert [mixed.resolved(bits).max_layers for bits in (2, 4, 5, 6, 8)] == [5, 5, 4, 4, 4]
    assert mixed.describe(4) == "5 layers float (mse)" and mixed.describe(8) == "4 layers float (mse)"
    assert mixed.describe().startswith("auto (5 at <= 4 bits, else 4) layers float")
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
