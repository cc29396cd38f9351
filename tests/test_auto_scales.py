"""The default weight scales, granularity='auto': groups of `group_size` (64) inputs for layers at 4 bits or
fewer, one scale per output channel above; resolved per layer, so the special layers at 8 bits keep
per-channel scales; layers whose input size the groups do not tile fall back to per-channel scales without
the warning an explicit 'per_group' gives.

Checkpoints, GPTQ and `convert` with the default at W4 run in the pipeline tests that use PTQConfig's
default weight scales (test_gptq_pipeline, test_mixed_precision, test_integer, test_hub).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from diffusers_ptq import PTQConfig
from diffusers_ptq.config import AUTO_GROUP_MAX_BITS, WeightQuantConfig
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.prepare import group_fallbacks, install, plan_quantization
from integer_helpers import context_and_map


@pytest.mark.parametrize("bits", range(2, 9))
def test_auto_resolves_by_bit_width_and_explicit_choices_stay(bits):
    weights = WeightQuantConfig(bits=bits)
    assert (weights.granularity, weights.group_size) == ("auto", 64)
    assert weights.granularity_in_effect() == ("per_group" if bits <= 4 else "per_channel")
    for explicit in ("per_channel", "per_tensor", "per_group"):
        assert WeightQuantConfig(bits=bits, granularity=explicit).granularity_in_effect() == explicit


def test_the_threshold_is_four_bits():
    assert AUTO_GROUP_MAX_BITS == 4  # BENCHMARKS.md §8: groups paid at W4A8 only


@pytest.mark.parametrize(
    ("weights", "text"),
    [
        ({"bits": 4}, "group 64 (auto)"),
        ({"bits": 8}, "per_channel (auto)"),
        ({"bits": 4, "group_size": 128}, "group 128 (auto)"),
        ({"bits": 4, "granularity": "per_group", "group_size": 128}, "group 128"),
        ({"bits": 8, "granularity": "per_group"}, "group 64"),
        ({"bits": 4, "granularity": "per_channel"}, "per_channel"),
        ({"bits": 4, "granularity": "per_tensor"}, "per_tensor"),
    ],
)
def test_describe_scales(weights, text):
    assert WeightQuantConfig(**weights).describe_scales() == text


def _installed(unet, config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'auto' falls back quietly
        plan = plan_quantization(unet, config)
    context, group_map = context_and_map()
    patch = install(unet, plan, config, context, group_map)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, QuantLayerMixin)}
    return plan, patch, layers


@torch.no_grad()
def test_auto_groups_the_4_bit_layers_of_a_unet_and_keeps_8_bit_ones_per_channel(sd_pipe):
    unet = sd_pipe.unet
    config = PTQConfig(weight_bits=4, act_bits=8)
    plan, patch, layers = _installed(unet, config)
    try:
        bits = {layer.name: layer.weight_bits for layer in plan.layers}
        fallbacks = {item.split(": K=")[0].split(" (")[0] for item in group_fallbacks(unet, plan, config)}
        assert "conv_in" not in fallbacks  # 8-bit special layer: per-channel by rule, not by fallback
        grouped = [n for n, m in layers.items() if m.weight_quantizers[0].group_size == 64]
        assert len(grouped) > 10
        for name, m in layers.items():
            for q, part in zip(m.weight_quantizers, m._weight_parts(m.weight)):
                if bits[name] > AUTO_GROUP_MAX_BITS:
                    assert q.granularity == "per_channel", name
                elif part[0].numel() % 64 == 0:
                    assert q.granularity == "per_group", name
                    assert q.scale.shape == (part.shape[0], part[0].numel() // 64)
                else:
                    assert name in fallbacks and q.granularity == "per_channel", name
        assert bits["conv_in"] == 8 and layers["conv_in"].weight_quantizers[0].granularity == "per_channel"
    finally:
        patch.restore()


def test_explicit_per_group_still_warns_where_auto_is_quiet(sd_pipe):
    unet = sd_pipe.unet
    config = PTQConfig(weight_bits=4, act_bits=8)
    plan = plan_quantization(unet, config)
    assert group_fallbacks(unet, plan, config)  # the tiny UNet has such layers ...
    with pytest.warns(UserWarning, match=r"weights\.group_size=64 does not divide"):
        plan_quantization(unet, config.replace(weights={"granularity": "per_group"}))


def test_weight_only_8_bit_default_has_no_groups(sd_pipe):
    config = PTQConfig(weight_bits=8, act_bits=None)
    plan = plan_quantization(sd_pipe.unet, config)
    assert group_fallbacks(sd_pipe.unet, plan, config) == []
