"""Group-wise weight scales (weights.granularity='per_group'): fake quant against a reference written here,
the per-group range search, AdaRound on group grids, the per-channel fallback and its warning, and integer
execution (im2col / Linear path and the Triton conv) against fake quantization, W4 nibbles included.

Pipelines, checkpoints and `convert` of whole UNets: test_group_scales_pipeline.py.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn

from diffusers_ptq import PTQConfig, QuantConv2d, QuantLinear
from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.integer import Int8Conv2d, Int8Linear
from diffusers_ptq.prepare import plan_quantization, shortcut_splits
from diffusers_ptq.primitives import fake_quantize, search_range
from diffusers_ptq.quantizers import TimestepBiasTable, WeightQuantizer
from diffusers_ptq.reconstruction.rounding import bake_layers, wrap_layer
from integer_helpers import KERNELS, MIXED_T, act_factory, assert_agrees, context_and_map

# name: (float layer, split, input shape); K per part: 64 x 9 / 64 / (32 x 9, 16 x 9) / 96
LAYERS = {
    "conv3x3": (lambda: nn.Conv2d(64, 11, 3, padding=1), None, (4, 64, 5, 7)),
    "conv3x3_stride2_nobias": (
        lambda: nn.Conv2d(64, 70, 3, stride=2, padding=1, bias=False),
        None,
        (4, 64, 9, 7),
    ),
    "conv1x1": (lambda: nn.Conv2d(64, 11, 1), None, (4, 64, 5, 7)),
    "conv3x3_split": (lambda: nn.Conv2d(48, 11, 3, padding=1), 32, (4, 48, 5, 7)),  # 2nd half falls back
    "linear": (lambda: nn.Linear(96, 29), None, (4, 6, 96)),
}


def _config(bits: int = 4, symmetric: bool = True, group_size: int = 32, search: str = "minmax"):
    return WeightQuantConfig(
        bits=bits, symmetric=symmetric, granularity="per_group", group_size=group_size, scale_search=search
    )


def _layer(name: str, config: WeightQuantConfig, acts=None, seed: int = 0):
    build, split, shape = LAYERS[name]
    torch.manual_seed(seed)
    module = build()
    with torch.no_grad():  # channels of very different ranges, so per-group scales differ from per-channel
        module.weight.mul_(
            torch.rand(module.weight.shape[1]).mul(4).add(0.1).reshape(1, -1, *[1] * (module.weight.ndim - 2))
        )
    if isinstance(module, nn.Linear):
        layer = QuantLinear.from_float(module, config, acts)
    else:
        layer = QuantConv2d.from_float(module, config, acts, split)
    layer.calibrate_weights()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)) * 1.5
    return layer, x


# -- an independent reference: groups indexed by hand, min/max qparams by the textbook formulas ----------


def _group_indices(shape: tuple[int, ...], group_size: int | None) -> list[tuple]:
    """Index tuples (into one output channel's weight) of each group: `group_size` channels of one tap.

    `group_size` None: one group holding the whole output channel (per-channel scales).
    """
    if group_size is None:
        return [(slice(None),)]
    if len(shape) == 2:
        return [(slice(g, g + group_size),) for g in range(0, shape[1], group_size)]
    c, kh, kw = shape[1:]
    assert c % group_size == 0
    return [
        (slice(c0, c0 + group_size), i, j)
        for i in range(kh)
        for j in range(kw)
        for c0 in range(0, c, group_size)
    ]


def _reference_minmax(
    weight: torch.Tensor, bits: int, symmetric: bool, group_size: int | None
) -> torch.Tensor:
    out = torch.empty_like(weight)
    for o in range(weight.shape[0]):
        for index in _group_indices(tuple(weight.shape), group_size):
            w = weight[o][index]
            lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
            if symmetric:
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                scale = torch.tensor(max(hi, -lo), dtype=torch.float32) / qmax
                zero = torch.tensor(0.0)
            else:
                qmin, qmax = 0, 2**bits - 1
                scale = torch.tensor(hi - lo, dtype=torch.float32) / qmax
                zero = torch.clamp(torch.round(-torch.tensor(lo, dtype=torch.float32) / scale), qmin, qmax)
            codes = torch.clamp(torch.round(w / scale) + zero, qmin, qmax)
            out[o][index] = (codes - zero) * scale
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", ["conv3x3", "conv1x1", "linear", "conv3x3_split"])
def test_per_group_fake_quant_equals_the_reference(name, symmetric, bits):
    layer, _ = _layer(name, _config(bits, symmetric))
    weight = layer.weight.detach()
    if layer.split is None:
        expected = _reference_minmax(weight, bits, symmetric, 32)
    else:  # each half on its own: the first half (32 channels) in groups, the second (16) per channel
        s = layer.split
        first = _reference_minmax(weight[:, :s], bits, symmetric, 32)
        second = _reference_minmax(weight[:, s:], bits, symmetric, None)
        expected = torch.cat([first, second], dim=1)
    got = layer.quantized_weight().detach()
    assert torch.equal(got, expected)
    # Not trivially per-channel: one scale per output channel would quantize differently.
    per_channel = WeightQuantizer(
        WeightQuantConfig(bits=bits, symmetric=symmetric, scale_search="minmax"), weight.shape[0]
    )
    per_channel.calibrate(weight)
    assert not torch.allclose(per_channel(weight), expected, atol=1e-6)


@pytest.mark.parametrize("search", ["mse", "percentile"])
def test_range_search_runs_once_per_group(search):
    config = _config(bits=4, symmetric=False, search=search)
    config.num_candidates = 30
    layer, _ = _layer("conv3x3", config)
    weight = layer.weight.detach()
    q = layer.weight_quantizers[0]
    groups = _group_indices(tuple(weight.shape), 32)
    assert q.scale.shape == (weight.shape[0], len(groups))
    for o in (0, 7):
        for g, index in enumerate(groups):
            row = weight[o][index].reshape(1, -1)
            lo, hi = search_range(
                row, 4, False, search, lp_norm=config.lp_norm, num_candidates=30, percentile=config.percentile
            )
            ref = WeightQuantizer(WeightQuantConfig(bits=4, symmetric=False, scale_search="minmax"), 1)
            ref.calibrate(torch.stack([lo, hi], dim=1))  # minmax over {lo, hi} = the searched range
            assert torch.equal(q.scale[o, g].reshape(1), ref.scale)
            assert torch.equal(q.zero_point[o, g].reshape(1), ref.zero_point)


@pytest.mark.parametrize("name", ["conv3x3", "linear", "conv3x3_split"])
def test_column_qparams_reproduce_group_fake_quant(name):
    layer, _ = _layer(name, _config(4, False))
    for q, part in zip(layer.weight_quantizers, layer._weight_parts(layer.weight.detach())):
        scale, zero = q.column_qparams(part)
        rows = part.shape[0]
        assert scale.shape == zero.shape == (rows, part[0].numel())
        by_columns = fake_quantize(part.reshape(rows, -1), scale, zero, q.qmin, q.qmax)
        assert torch.equal(by_columns, q(part).reshape(rows, -1))


def test_quantizer_falls_back_to_per_channel_when_the_group_does_not_divide_k():
    q = WeightQuantizer(_config(group_size=64), 5, in_features=96)
    assert q.granularity == "per_channel" and q.scale.shape == (5,)
    q = WeightQuantizer(_config(group_size=32), 5, in_features=96)
    assert q.granularity == "per_group" and q.scale.shape == (5, 3)
    with pytest.raises(ValueError, match="in_features"):
        WeightQuantizer(_config(), 5)


def test_adaround_learns_and_bakes_on_the_group_grid():
    layer, _ = _layer("conv3x3_split", _config(4, False))
    nearest = layer.quantized_weight().detach().clone()
    wrappers = wrap_layer(layer)
    # Soft start: h(V) is frac(W / s) for the group's own s, so the soft weight is the float weight.
    soft = layer.quantized_weight().detach()
    inside = (soft - layer.weight).abs() < 1e-5
    assert inside.float().mean() > 0.9
    for q in wrappers:
        q.set_mode("hard")
    assert torch.equal(layer.quantized_weight(), nearest)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in wrappers:
            q.v.copy_(torch.randn(q.v.shape, generator=gen))
    learned = layer.quantized_weight().detach().clone()
    assert not torch.equal(learned, nearest)
    bake_layers([("layer", layer)])  # checks the plain quantizer rounds the baked weight to the learned codes
    assert not any(hasattr(q, "v") for q in layer.weight_quantizers)
    assert torch.equal(layer.quantized_weight(), learned)


# -- the fallback warning ------------------------------------------------------------------------------------


def _expected_fallbacks(unet: nn.Module, group_size: int) -> set[str]:
    splits = shortcut_splits(unet)
    found = set()
    for name, m in unet.named_modules():
        if type(m) not in (nn.Conv2d, nn.Linear):
            continue
        taps = m.weight[0, 0].numel()
        channels = (
            [m.weight.shape[1]] if name not in splits else [splits[name], m.weight.shape[1] - splits[name]]
        )
        for i, c in enumerate(channels):
            if (c * taps) % group_size:
                found.add(name if len(channels) == 1 else f"{name} (split part {i})")
    return found


@pytest.mark.parametrize("pipe_fixture", ["sd_pipe", "sdxl_pipe", "ddim_pipe"])
def test_one_warning_lists_every_layer_that_falls_back(pipe_fixture, request):
    unet = request.getfixturevalue(pipe_fixture).unet
    config = PTQConfig(weights={"granularity": "per_group", "group_size": 32})
    expected = _expected_fallbacks(unet, 32)
    assert "conv_in" in expected  # K = 4 x 9 or 3 x 9
    if pipe_fixture == "ddim_pipe":  # 16-channel skip halves: a shortcut split's part falls back alone
        assert any("(split part 1)" in name for name in expected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_quantization(unet, config)
    messages = [str(w.message) for w in caught if "group_size" in str(w.message)]
    assert len(messages) == 1
    listed = {item.rpartition(": K=")[0] for item in messages[0].split("instead: ", 1)[1].split("; ")}
    assert listed == expected
    with pytest.raises(ValueError, match=r"weights\.group_size=32 .*conv_in.*weights\.strict_groups=False"):
        plan_quantization(unet, config.replace(weights={"strict_groups": True}))


def test_no_warning_without_such_layers_or_without_groups(sd_pipe):
    unet = sd_pipe.unet
    names = sorted({name.split(" (")[0] for name in _expected_fallbacks(unet, 32)})
    grouped = PTQConfig(weights={"granularity": "per_group", "group_size": 32}, layers={"exclude": names})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_quantization(unet, grouped).layers
        assert plan_quantization(unet, PTQConfig(weights={"group_size": 32, "strict_groups": True})).layers


# -- integer execution ---------------------------------------------------------------------------------------


def _quant_layer(name: str, w_bits: int, w_sym: bool, group_size: int = 32):
    context, group_map = context_and_map()
    layer, x = _layer(name, _config(w_bits, w_sym, group_size), act_factory(context, group_map, 8, False, 0))
    return layer, x, context


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("w_sym", [True, False])
@pytest.mark.parametrize("name", list(LAYERS))
@torch.no_grad()
def test_integer_layer_applies_group_scales_like_fake_quant(name, w_sym, w_bits, kernel):
    layer, x, context = _quant_layer(name, w_bits, w_sym)
    cls = Int8Conv2d if isinstance(layer, nn.Conv2d) else Int8Linear
    with context.use(MIXED_T):
        new = cls(layer, kernel)
        assert new.weights[0].group_size == 32
        if w_bits == 4:
            assert new.weights[0].packed is not None  # W4: two codes per byte
        assert_agrees(new(x), layer(x))


def test_a_wrong_group_order_would_be_caught():
    """The agreement above can fail: groups read in the weight's own (C_in, kh, kw) order disagree."""
    layer, x, context = _quant_layer("conv3x3", 4, True)
    q = layer.weight_quantizers[0]
    with torch.no_grad(), context.use(MIXED_T):
        ref = layer(x)
        new = Int8Conv2d(layer, "int_mm")
        # Permute the group table as if groups ran along (C_in, kh, kw): same shape, other assignment.
        n, g = q.scale.shape
        new.weights[0].scale.copy_(q.scale.reshape(n, 9, 2).transpose(1, 2).reshape(n, g))
        assert not torch.allclose(new(x), ref, atol=1e-3)


TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@TRITON
@pytest.mark.parametrize(("w_bits", "w_sym", "group_size"), [(4, True, 32), (4, False, 64), (8, False, 32)])
@pytest.mark.parametrize("name", ["conv3x3", "conv3x3_stride2_nobias", "conv3x3_split"])
@torch.no_grad()
def test_triton_conv_applies_group_scales_in_its_k_loop(name, w_bits, w_sym, group_size):
    """On CUDA the compiled kernel; without a GPU Triton's CPU interpreter (conftest.py)."""
    layer, x, context = _quant_layer(name, w_bits, w_sym, group_size)
    layer, x = layer.to(DEVICE), x.to(DEVICE)
    with context.use(MIXED_T.to(DEVICE)):
        new = Int8Conv2d(layer, "triton")
        assert new.implicit_gemm
        out = new(x)
        assert_agrees(out, layer(x))
        assert_agrees(out, Int8Conv2d(layer, "int_mm")(x))


@TRITON
@torch.no_grad()
def test_triton_conv_leaves_groups_across_taps_to_the_im2col_path():
    """A group the kernel cannot tile (32 columns over two 16-channel taps of a 2x2 conv): im2col path."""
    context, group_map = context_and_map()
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 2, padding=1)
    layer = QuantConv2d.from_float(conv, _config(4, True, 32), act_factory(context, group_map, 8, False, 0))
    layer.calibrate_weights()
    x = torch.randn(2, 16, 5, 5)
    with context.use(MIXED_T[:2]):
        new = Int8Conv2d(layer, "triton")
        assert new.weights[0].group_size == 32 and not new.implicit_gemm
        assert_agrees(new(x), layer(x))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs CUDA and triton",
)
@pytest.mark.parametrize("group_size", [32, 128])
@torch.no_grad()
def test_compiled_triton_conv_with_group_scales_on_wide_layers(group_size):
    """The compiled kernel's own block sizes (BLOCK_K 64, several N tiles), never used by the interpreter."""
    context, group_map = context_and_map()
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 160, 3, padding=1)
    config = _config(4, False, group_size)
    layer = QuantConv2d.from_float(conv, config, act_factory(context, group_map, 8, False, 0)).cuda()
    layer.calibrate_weights()
    x = torch.randn(4, 256, 16, 16, device="cuda")
    with context.use(MIXED_T.cuda()):
        new = Int8Conv2d(layer, "triton")
        assert new.implicit_gemm
        assert_agrees(new(x), layer(x))


@pytest.mark.parametrize("kernel", [*KERNELS, *(["triton"] if importlib.util.find_spec("triton") else [])])
@pytest.mark.parametrize("name", ["conv3x3", "conv3x3_split"])
@torch.no_grad()
def test_group_scales_and_a_timestep_bias_table_together(name, kernel):
    """Both per-group weight scales and a per-sample bias row in one layer (a mixed-timestep batch)."""
    layer, x, context = _quant_layer(name, 4, False)
    layer.bias_table = TimestepBiasTable(context, context_and_map()[1], layer.weight.shape[0])
    layer.bias_table.table.copy_(torch.randn(layer.bias_table.table.shape) * 3)  # groups far apart
    with context.use(MIXED_T):
        new = Int8Conv2d(layer, kernel)
        assert new.weights[0].group_size == 32
        assert_agrees(new(x), layer(x))
