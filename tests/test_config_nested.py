"""`layers.mixed_precision` given as a dict, on construction and in `replace` / preset overrides.

Its field defaults ('off') differ from the default recipe's (the 4 most sensitive layers float), so a dict
that only tunes the recipe (say, more sensitivity rows) must not switch mixed precision off.
"""

from __future__ import annotations

import pytest

from diffusers_ptq import PTQConfig
from diffusers_ptq.config import DEFAULT_MIXED_PRECISION, MixedPrecisionConfig


def test_a_dict_without_mode_tunes_the_default_budget():
    cfg = PTQConfig(layers={"mixed_precision": {"num_samples": 64}})
    assert cfg.layers.mixed_precision == MixedPrecisionConfig(**DEFAULT_MIXED_PRECISION, num_samples=64)
    assert cfg.layers.mixed_precision.enabled


def test_a_dict_with_mode_starts_from_the_field_defaults():
    layers = {"mixed_precision": {"mode": "max_layers", "max_layers": 2}}
    mixed = PTQConfig(weight_bits=4, layers=layers).layers.mixed_precision
    assert (mixed.max_layers, mixed.high_bits, mixed.num_samples) == (2, 8, 32)
    off = PTQConfig(layers={"mixed_precision": {"mode": "off", "num_samples": 4}}).layers.mixed_precision
    assert not off.enabled and off.num_samples == 4


def test_the_dataclass_itself_keeps_its_field_defaults():
    assert not MixedPrecisionConfig().enabled
    assert MixedPrecisionConfig.from_value({"mode": "off"}) == MixedPrecisionConfig()


def test_replace_overrides_only_the_named_nested_fields():
    layers = {"special_layers": "float", "mixed_precision": {"mode": "max_layers", "max_layers": 2}}
    base = PTQConfig(weight_bits=4, layers=layers)
    new = base.replace(layers={"mixed_precision": {"metric": "bias"}})
    mixed = new.layers.mixed_precision
    assert (mixed.mode, mixed.max_layers, mixed.high_bits, mixed.metric) == ("max_layers", 2, 8, "bias")
    assert new.layers.special_layers == "float"
    assert base.layers.mixed_precision.metric == "mse"  # a copy
    assert not base.replace(layers={"mixed_precision": {"mode": "off"}}).layers.mixed_precision.enabled


def test_preset_overrides_merge_into_the_presets_budget():
    cfg = PTQConfig.preset("ptq4dm", layers={"mixed_precision": {"num_samples": 8}})
    assert not cfg.layers.mixed_precision.enabled  # the preset's 'off' stays: the override names no mode
    assert cfg.layers.mixed_precision.num_samples == 8


def test_a_nested_dict_is_still_validated():
    with pytest.raises(ValueError, match=r"layers\.mixed_precision\.num_samples.*0"):
        PTQConfig(layers={"mixed_precision": {"num_samples": 0}})
    with pytest.raises(ValueError, match=r"layers\.mixed_precision\.max_layers.*0"):
        PTQConfig().replace(layers={"mixed_precision": {"max_layers": 0}})
    with pytest.raises(ValueError, match="unknown key"):
        PTQConfig(layers={"mixed_precision": {"budget": 3}})
