"""The default weight scales, granularity='auto': groups of `group_size` (64) inputs for layers at 4 bits or
fewer, one scale per output channel above; resolved per layer, so the special layers at 8 bits keep
per-channel scales; a layer whose input size K the groups do not tile gets the largest divisor of K between
half the group size and the group size, and per-channel scales where there is none, without the warning an
explicit 'per_group' gives (which keeps per-channel scales for every such layer).

Checkpoints, GPTQ and `convert` with the default at W4 run in the pipeline tests that use PTQConfig's
default weight scales (test_gptq_pipeline, test_mixed_precision, test_integer, test_hub).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from diffusers_ptq import PTQConfig
from diffusers_ptq.config import AUTO_GROUP_MAX_BITS, WeightQuantConfig
from diffusers_ptq.integer import Int8Conv2d
from diffusers_ptq.nn import QuantConv2d
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.prepare import group_fallbacks, install, plan_quantization
from diffusers_ptq.quantizers.groups import layer_group_size
from integer_helpers import KERNELS, MIXED_T, act_factory, assert_agrees, context_and_map


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


@pytest.mark.parametrize(
    ("k", "group_size", "auto", "expected"),
    [
        (576, 64, True, 64),  # 64 channels x 3x3: the asked size
        (144, 64, True, 48),  # 16 channels x 3x3
        (288, 64, True, 48),
        (864, 64, True, 54),  # 96 channels x 3x3
        (96, 64, True, 48),
        (48, 64, True, None),  # no divisor in [32, 64): one group would be the whole row, per-channel scales
        (27, 64, True, None),
        (144, 128, True, 72),
        (48, 128, True, None),
        (144, 64, False, None),  # explicit 'per_group': the configured size or per-channel scales
        (576, 64, False, 64),
    ],
)
def test_layer_group_size(k, group_size, auto, expected):
    assert layer_group_size(k, group_size, auto) == expected


def _reference_groups(weight: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Symmetric min/max fake quant over groups of `group_size` taken in (kh, kw, C_in) order, by hand."""
    c, kh, kw = weight.shape[1:]
    order = [(ci, i, j) for i in range(kh) for j in range(kw) for ci in range(c)]
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(weight)
    for o in range(weight.shape[0]):
        for g in range(0, len(order), group_size):
            index = order[g : g + group_size]
            values = torch.stack([weight[o, ci, i, j] for ci, i, j in index])
            scale = values.abs().max() / qmax
            codes = torch.clamp(torch.round(values / scale), -qmax - 1, qmax)
            for (ci, i, j), v in zip(index, codes * scale):
                out[o, ci, i, j] = v
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@torch.no_grad()
def test_near_groups_across_taps_quantize_like_a_reference_and_run_integer(kernel):
    """16 channels x 3x3 (K = 144) under 'auto' with groups of 64: groups of 48, three taps each."""
    context, group_map = context_and_map()
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    conv.weight.mul_(torch.rand(16).mul(4).add(0.1).reshape(1, -1, 1, 1))  # ranges differ per channel
    config = WeightQuantConfig(bits=4, scale_search="minmax")
    layer = QuantConv2d.from_float(conv, config, act_factory(context, group_map, 8, False, 0))
    layer.calibrate_weights()
    q = layer.weight_quantizers[0]
    assert q.group_size == 48 and q.scale.shape == (8, 3)
    expected = _reference_groups(conv.weight.detach(), 48, 4)
    assert torch.equal(layer.quantized_weight().detach(), expected)
    explicit = QuantConv2d.from_float(
        conv, WeightQuantConfig(bits=4, scale_search="minmax", granularity="per_group"), None
    )
    explicit.calibrate_weights()
    assert explicit.weight_quantizers[0].granularity == "per_channel"
    assert not torch.equal(explicit.quantized_weight(), expected)  # the groups do change the weight
    x = torch.randn(2, 16, 5, 5)
    with context.use(MIXED_T[:2]):
        new = Int8Conv2d(layer, kernel)
        assert new.weights[0].group_size == 48
        assert_agrees(new(x), layer(x))


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
                elif q.group_size is not None:  # a divisor of K near 64
                    k = part[0].numel()
                    assert 32 <= q.group_size < 64 and k % q.group_size == 0, (name, k, q.group_size)
                    assert not any(k % size == 0 for size in range(q.group_size + 1, 64)), name
                    assert name not in fallbacks and q.scale.shape == (part.shape[0], k // q.group_size)
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
