"""Shared pieces of the integer-execution tests: calibrated layers of every type, agreement bounds."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from diffusers_ptq import QuantConv2d, QuantLinear, set_quant_state
from diffusers_ptq.config import ActivationQuantConfig, WeightQuantConfig
from diffusers_ptq.integer import Int8Conv2d, Int8Linear, onednn_available
from diffusers_ptq.primitives import sqnr_db
from diffusers_ptq.quantizers import TimestepActQuantizer, contiguous_group_map
from diffusers_ptq.timestep import TimestepContext

PROMPTS = ["a photo of a cat", "a red car", "a watercolor of a tree", "a city at night"]
FAST = {"num_samples": 8, "num_inference_steps": 4, "batch_size": 8, "progress": False}
SEARCH = {"num_candidates": 10}
GROUPS = 3
MIXED_T = torch.tensor([950, 600, 250, 10])  # spans all three groups; samples 2 and 3 share one
KERNELS = [
    "int_mm",
    pytest.param("onednn", marks=pytest.mark.skipif(not onednn_available(), reason="no oneDNN")),
]


# -- layer-level helpers ------------------------------------------------------------------------------------


def context_and_map() -> tuple[TimestepContext, torch.Tensor]:
    return TimestepContext(1000), contiguous_group_map(1000, GROUPS)


def act_factory(context, group_map, bits: int, symmetric: bool, seed: int):
    """Activation quantizers with a different, deterministic range per timestep group."""
    gen = torch.Generator().manual_seed(seed)

    def make(name: str) -> TimestepActQuantizer:
        config = ActivationQuantConfig(bits=bits, symmetric=symmetric)
        q = TimestepActQuantizer(config, context, group_map, bits=bits, name=name)
        with torch.no_grad():
            for g in range(GROUPS):
                lo = -float(torch.rand(1, generator=gen)) * (1 + g)
                hi = float(torch.rand(1, generator=gen)) * 2 + 0.5 * g + 0.1
                if symmetric:
                    q.scale[g] = max(-lo, hi) / (2 ** (bits - 1) - 1)
                else:
                    q.scale[g] = (hi - lo) / (2**bits - 1)
                    q.zero_point[g] = round(-lo / float(q.scale[g]))
        return q

    return make


LAYERS = {
    # name: (builder(weight_config, act_factory), input shape)
    "linear_2d": (lambda w, a: QuantLinear.from_float(nn.Linear(37, 29), w, a), (4, 37)),
    "linear_3d": (lambda w, a: QuantLinear.from_float(nn.Linear(37, 29), w, a), (4, 6, 37)),
    "conv1x1": (lambda w, a: QuantConv2d.from_float(nn.Conv2d(13, 11, 1), w, a), (4, 13, 5, 7)),
    "conv3x3": (lambda w, a: QuantConv2d.from_float(nn.Conv2d(13, 11, 3, padding=1), w, a), (4, 13, 5, 7)),
    "conv3x3_stride2": (
        lambda w, a: QuantConv2d.from_float(nn.Conv2d(13, 11, 3, stride=2, padding=1), w, a),
        (4, 13, 9, 7),
    ),
    "conv3x3_dilated_nobias": (
        lambda w, a: QuantConv2d.from_float(nn.Conv2d(13, 11, 3, padding=2, dilation=2, bias=False), w, a),
        (4, 13, 6, 6),
    ),
    "conv3x3_reflect": (
        lambda w, a: QuantConv2d.from_float(nn.Conv2d(13, 11, 3, padding=1, padding_mode="reflect"), w, a),
        (4, 13, 5, 7),
    ),
    "conv1x1_split": (
        lambda w, a: QuantConv2d.from_float(nn.Conv2d(13, 11, 1), w, a, split=5),
        (4, 13, 5, 7),
    ),
    "conv3x3_split": (
        lambda w, a: QuantConv2d.from_float(nn.Conv2d(13, 11, 3, padding=1), w, a, split=8),
        (4, 13, 5, 7),
    ),
}
GRIDS = [  # (weights symmetric, activations symmetric)
    (True, False),  # the default recipe
    (False, False),  # Q-Diffusion: affine weights
    (True, True),
    (False, True),
]


def quant_layer(name: str, w_bits: int, w_sym: bool, a_bits: int, a_sym: bool, seed: int = 0):
    torch.manual_seed(seed)
    context, group_map = context_and_map()
    build, shape = LAYERS[name]
    # Per-channel scales: the int8 GEMM paths these layers test (group scales: test_group_scales.py).
    weights = WeightQuantConfig(
        bits=w_bits, symmetric=w_sym, scale_search="minmax", granularity="per_channel"
    )
    layer = build(weights, act_factory(context, group_map, a_bits, a_sym, seed))
    layer.calibrate_weights()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)) * 1.5
    return layer, x, context


def integer_layer(layer, kernel: str):
    return (Int8Conv2d if isinstance(layer, nn.Conv2d) else Int8Linear)(layer, kernel)


def assert_agrees(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float rounding: far below one output step of any 8-bit grid."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    err = float((out - ref).abs().max())
    assert err <= tol, f"max |integer - fake quant| = {err:.3g} > {tol:.3g}"


def unet_inputs(unet, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    inputs = {
        "sample": torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen),
        "timestep": MIXED_T,
    }
    if isinstance(unet, UNet2DConditionModel):
        inputs["encoder_hidden_states"] = torch.randn(4, 6, cfg.cross_attention_dim, generator=gen)
    return inputs


def float_output(unet, inputs: dict) -> torch.Tensor:
    float_unet = copy.deepcopy(unet)
    set_quant_state(float_unet, weights=False, acts=False)
    return float_unet(**inputs).sample


def assert_unet_agrees(out: torch.Tensor, ref: torch.Tensor, float_ref: torch.Tensor) -> None:
    """Integer vs fake-quant UNet: far closer than the quantization error itself.

    Each layer agrees to float rounding, but a last-ulp difference can move a downstream activation across
    a rounding boundary (one code), and the tiny random UNets (8-bit softmax included) carry that on. The
    fake-quant UNet itself moves about as much when only its memory layout changes (channels_last input:
    35 dB on the SD UNet), so the bound is relative to the quantization error: >= 12 dB below it, and
    >= 25 dB SQNR (measured: 40 dB UNet2DModel W8A8, 30-32 dB SD W4A8; quantization error 9.5 / 12.5 dB).
    """
    agreement, quantization = sqnr_db(ref, out), sqnr_db(float_ref, ref)
    assert agreement >= 25.0 and agreement >= quantization + 12.0, (agreement, quantization)
