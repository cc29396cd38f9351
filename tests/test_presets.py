"""Presets: published hyperparameters per method, overrides, validation, fresh objects."""

from __future__ import annotations

import dataclasses

import pytest

from config_helpers import SECTIONS
from diffusers_ptq.config import (
    LayerSelectionConfig,
    PTQConfig,
)
from diffusers_ptq.methods import available_presets, get_preset
from diffusers_ptq.reconstruction import ReconstructionConfig

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
