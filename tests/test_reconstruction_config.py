"""ReconstructionConfig: published defaults, validation messages, dict round trips, schedules and losses."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from diffusers_ptq.reconstruction import ReconstructionConfig, plan_phases
from diffusers_ptq.reconstruction.losses import BetaSchedule, lp_loss, lr_factor


def test_defaults_are_brecq_q_diffusion_values():
    c = ReconstructionConfig()
    assert (c.iterations, c.act_iterations, c.batch_size) == (20000, 5000, 32)
    assert (c.round_weight, c.beta_start, c.beta_end, c.warmup) == (0.01, 20.0, 2.0, 0.2)
    assert c.act_lr == 4e-4 and c.optimization == "sequential" and c.weight_rounding == "adaround"
    assert c.layer_loss_weight == 0.0 and c.qdrop_prob == 0.0 and not c.temporal_block and not c.enabled
    assert all("help" in f.metadata for f in fields(c))
    assert [p.name for p in plan_phases(c)] == ["weights", "acts"]
    joint = plan_phases(c.replace(optimization="joint", qdrop_prob=0.5))
    assert [(p.name, p.learn_rounding, p.learn_scales, p.qdrop_prob) for p in joint] == [
        ("joint", True, True, 0.5)
    ]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("optimization", "both", "'sequential', 'joint'"),
        ("weight_rounding", "floor", "'adaround', 'nearest'"),
        ("cache_dtype", "int8", "'float16', 'bfloat16', 'float32'"),
        ("iterations", -1, "an integer >= 0"),
        ("batch_size", 0, "an integer >= 1"),
        ("qdrop_prob", 1.5, "a number in [0.0, 1.0]"),
        ("warmup", float("nan"), "a number in [0.0, 1.0]"),
        ("max_minutes", 0, "a number in (0.0"),
        ("temporal_block", "yes", "True or False"),
        ("enabled", 1, "True or False"),
        ("num_samples", 0, "an integer >= 1"),
        ("offload", "gpu", "'none', 'cpu'"),
        ("offload_device", "CUDA 0", "None or a device such as 'cuda'"),
        ("cache_max_gb", -1.0, "a number in [0.0, 1000000.0]"),
        ("cache_dir", "", "a folder path or None"),
    ],
)
def test_validation_names_field_value_and_choices(field, value, expected):
    with pytest.raises(ValueError) as err:
        ReconstructionConfig().replace(**{field: value})
    message = str(err.value)
    assert f"reconstruction.{field}={value!r}" in message and expected in message


def test_config_that_does_nothing_is_rejected():
    with pytest.raises(ValueError, match="nothing to reconstruct"):
        ReconstructionConfig(weight_rounding="nearest", learn_act_scales=False).validate()


def test_cache_dir_needs_cache_max_gb():
    with pytest.raises(
        ValueError, match=r"reconstruction.cache_dir='/x' is set but reconstruction.cache_max_gb"
    ):
        ReconstructionConfig(cache_dir="/x").validate()
    ReconstructionConfig(cache_max_gb=2.0).validate()  # no cache_dir: the system temporary folder


def test_dict_round_trip_and_unknown_keys():
    c = ReconstructionConfig(iterations=7, temporal_block=True, max_minutes=1.5, num_samples=64)
    memory = {"offload": "cpu", "offload_device": "cuda:1", "cache_max_gb": 0.5, "cache_dir": "/tmp/c"}
    assert ReconstructionConfig.from_dict(c.replace(**memory).to_dict()) == c.replace(**memory)
    assert ReconstructionConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unknown ReconstructionConfig key\(s\) \['iters'\]; valid keys"):
        ReconstructionConfig.from_dict({"iters": 3})
    with pytest.raises(TypeError, match="expects a dict"):
        ReconstructionConfig.from_dict([("iterations", 3)])


def test_beta_schedule_warmup_then_linear_anneal():
    s = BetaSchedule(iterations=100, warmup=0.2, start=20.0, end=2.0)
    assert not s.active(19) and s.active(20)
    assert s.beta(20) == 20.0 and s.beta(100) == 2.0
    assert s.beta(60) == pytest.approx(11.0)


def test_cosine_lr_decays_to_zero():
    assert lr_factor("constant", 50, 100) == 1.0
    assert lr_factor("cosine", 0, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_lp_loss_sums_channels_and_averages_the_rest():
    a = torch.zeros(2, 3, 4, 5)
    b = torch.ones(2, 3, 4, 5)
    assert float(lp_loss(a, b)) == 3.0  # NCHW: channels are dim 1
    tokens = torch.zeros(2, 7, 6)
    assert float(lp_loss(tokens, torch.full((2, 7, 6), 2.0))) == 6 * 4.0  # (B, L, C): channels last
    assert float(lp_loss(tokens, tokens + 2, p=3.0)) == pytest.approx(6 * 8.0)
    with pytest.raises(ValueError, match="differ in shape"):
        lp_loss(a, tokens)
    assert math.isclose(float(lp_loss(torch.zeros(4), torch.ones(4))), 1.0)
