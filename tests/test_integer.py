"""Integer execution (`diffusers_ptq.convert`): agreement with fake quantization, storage, errors, compile."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

import diffusers_ptq
from diffusers_ptq import PTQConfig, QuantConv2d, QuantLinear, convert, quantize_pipeline
from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.integer import (
    ConversionReport,
    Int8Conv2d,
    Int8Linear,
    UnsupportedLayerError,
    features,
    gemm,
    onednn_available,
)
from diffusers_ptq.integer.packing import pack_int4, unpack_int4
from diffusers_ptq.tiny import tiny_ddim_pipeline, tiny_sd_pipeline
from integer_helpers import (
    FAST,
    GRIDS,
    KERNELS,
    LAYERS,
    MIXED_T,
    PROMPTS,
    SEARCH,
    act_factory,
    assert_agrees,
    assert_unet_agrees,
    context_and_map,
    float_output,
    integer_layer,
    quant_layer,
    unet_inputs,
)
from recipe_helpers import QUICK_LAYERS

# -- agreement per layer type -------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize(("w_sym", "a_sym"), GRIDS)
@pytest.mark.parametrize("name", list(LAYERS))
@torch.no_grad()
def test_layer_matches_fake_quant(name, w_sym, a_sym, w_bits, kernel):
    layer, x, context = quant_layer(name, w_bits, w_sym, 8, a_sym)
    with context.use(MIXED_T):
        ref = layer(x)
        out = integer_layer(layer, kernel)(x)
    assert_agrees(out, ref)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("w_bits", "a_bits"), [(6, 7), (8, 6), (3, 5), (2, 8)])
@torch.no_grad()
def test_other_bit_widths_match(w_bits, a_bits, kernel):
    layer, x, context = quant_layer("conv3x3", w_bits, False, a_bits, False, seed=3)
    with context.use(MIXED_T):
        assert_agrees(integer_layer(layer, kernel)(x), layer(x))


@pytest.mark.parametrize("kernel", KERNELS)
@torch.no_grad()
def test_extreme_codes_do_not_saturate(kernel):
    """Every product at its largest (u = 255, |w| = 127, same sign): oneDNN's int16 pair sums would
    saturate without VNNI; the layer must split such weights and stay exact."""
    context, group_map = context_and_map()
    linear = nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.weight[1].fill_(-0.5)
    layer = QuantLinear.from_float(
        linear,
        WeightQuantConfig(bits=8, scale_search="minmax"),
        act_factory(context, group_map, 8, False, 0),
    )
    layer.calibrate_weights()
    x = torch.full((4, 64), 100.0)  # clamps to the top code in every group
    with context.use(MIXED_T):
        ref = layer(x)
        new = integer_layer(layer, kernel)
        out = new(x)
    assert_agrees(out, ref)
    if kernel == "onednn":
        assert new.split_for_saturation == (not features.cpu_has_vnni())


@pytest.mark.parametrize("kernel", KERNELS)
@torch.no_grad()
def test_uniform_batch_and_fp16_input(kernel):
    """One timestep for the whole batch (ordinary sampling) and a half-precision input."""
    layer, x, context = quant_layer("conv3x3", 8, True, 8, False, seed=5)
    with context.use(torch.tensor([500])):
        assert_agrees(integer_layer(layer, kernel)(x), layer(x))
    linear, xl, context = quant_layer("linear_3d", 8, True, 8, False, seed=6)
    with context.use(torch.tensor([500])):
        out, ref = integer_layer(linear, kernel)(xl.half()), linear(xl.half().float()).half()
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


# -- kernels and packing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rules", ["cpu", "cuda"])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (3, 5, 7), (17, 9, 15), (16, 16, 16), (33, 17, 9)])
def test_int_mm_padding_handles_odd_shapes(monkeypatch, rules, m, k, n):
    """On CPU `torch._int_mm` takes any shape; CUDA needs M > 16 and K, N multiples of 8 (padded here)."""
    monkeypatch.setattr(
        gemm, "int_mm_padding", lambda m_, k_, n_, _: features.int_mm_padding(m_, k_, n_, rules)
    )
    gen = torch.Generator().manual_seed(m * 100 + k)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    out = gemm.int_mm(a, w)
    assert out.dtype == torch.int32
    assert torch.equal(out, (a.long() @ w.long().t()).int())


def test_cuda_int_mm_padding_rules():
    assert features.int_mm_padding(3, 5, 7, "cuda") == (17, 8, 8)
    assert features.int_mm_padding(32, 16, 24, "cuda") == (32, 16, 24)
    assert features.int_mm_padding(3, 5, 7, "cpu") == (3, 5, 7)


@pytest.mark.parametrize("k", [1, 6, 7])
def test_int4_packing_round_trips(k):
    codes = torch.randint(-8, 8, (5, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), codes)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[9]]))


def test_unknown_kernel_names_valid_choices():
    with pytest.raises(ValueError, match="'auto', 'onednn', 'int_mm'"):
        features.resolve_kernel("cutlass", torch.device("cpu"))


# -- storage ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("w_bits", "target"), [(8, 0.5), (4, 0.25)])
def test_weight_bytes_at_realistic_sizes(w_bits, target):
    """Stored codes are exactly 0.5x (W8) / 0.25x (W4) of float16; the per-channel constants (fp32 scale,
    and for `int_mm` the zero-point correction) add 8 bytes per output channel: at most 0.003x here."""
    context, group_map = context_and_map()
    acts = act_factory(context, group_map, 8, False, 0)
    weights = WeightQuantConfig(bits=w_bits, granularity="per_channel", scale_search="minmax")
    layers = [
        QuantConv2d.from_float(nn.Conv2d(320, 320, 3, padding=1), weights, acts),  # SD-1.5 resnet conv
        QuantLinear.from_float(nn.Linear(1280, 320), weights, acts),  # SD-1.5 feed-forward out
    ]
    for layer in layers:
        layer.calibrate_weights()
        fp16 = layer.weight.numel() * 2
        for kernel in ("int_mm", "onednn") if onednn_available() else ("int_mm",):
            codes, constants = integer_layer(layer, kernel).weight_nbytes()
            assert codes == target * fp16
            assert (codes + constants) / fp16 <= target + 0.0035, (kernel, constants / fp16)


# -- whole UNets --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_ddim():
    """UNet2DModel at W8A8 with 4 timestep groups, shortcut-split and attention quantizers."""
    pipe = tiny_ddim_pipeline()
    config = PTQConfig(
        weight_bits=8, act_bits=8, weights=SEARCH, activations={**SEARCH, "timestep_groups": 4}
    )
    quantize_pipeline(pipe, config, **FAST)
    return pipe


@pytest.fixture(scope="module")
def quantized_sd():
    """UNet2DConditionModel at W4A8 (packed weights), affine weights, two groups, 8-bit softmax."""
    pipe = tiny_sd_pipeline()
    config = PTQConfig(
        weight_bits=4,
        act_bits=8,
        weights={**SEARCH, "symmetric": False},
        activations={**SEARCH, "timestep_groups": 2},
        layers=QUICK_LAYERS,
    )
    quantize_pipeline(pipe, config, prompts=PROMPTS, **FAST)
    return pipe


@torch.no_grad()
def test_unet2d_model_converts_and_matches(quantized_ddim):
    unet = copy.deepcopy(quantized_ddim.unet)
    inputs = unet_inputs(unet)
    ref, float_ref = unet(**inputs).sample, float_output(unet, inputs)
    report = convert(unet)
    assert isinstance(report, ConversionReport)
    assert report.integer and not report.fallback
    assert any(info.parts == 2 for info in report.integer)  # the shortcut-split convs run split
    assert {info.kind for info in report.integer} >= {"linear", "conv1x1", "conv3x3"}
    assert not any(isinstance(m, QuantConv2d | QuantLinear) for m in unet.modules())
    assert report.attention and "fake-quant" in report.attention[0][1]
    assert_unet_agrees(unet(**inputs).sample, ref, float_ref)
    assert "layers on int8 kernels" in str(report)


@torch.no_grad()
def test_unet2d_condition_model_and_pipeline_convert(quantized_sd):
    pipe = copy.copy(quantized_sd)
    pipe.unet = copy.deepcopy(quantized_sd.unet)
    inputs = unet_inputs(pipe.unet, seed=1)
    ref, float_ref = pipe.unet(**inputs).sample, float_output(pipe.unet, inputs)
    report = diffusers_ptq.convert(pipe, backend="int8")
    packed = [info for info in report.integer if info.weight_bits == 4]  # special layers stay at 8 bits
    assert packed and all(info.code_bytes <= 0.26 * info.fp16_bytes for info in packed)
    assert_unet_agrees(pipe.unet(**inputs).sample, ref, float_ref)
    image = pipe("a cat", num_inference_steps=2, output_type="np").images
    assert image.shape[0] == 1 and float(abs(image).max()) <= 1.0


@torch.no_grad()
def test_convert_loaded_checkpoint(quantized_ddim, tmp_path):
    quantized_ddim.unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DModel.from_pretrained(tmp_path / "unet")
    inputs = unet_inputs(loaded, seed=2)
    ref, float_ref = loaded(**inputs).sample, float_output(loaded, inputs)
    report = convert(loaded)
    assert report.integer and not report.fallback
    assert_unet_agrees(loaded(**inputs).sample, ref, float_ref)


# -- what falls back, and bad input -------------------------------------------------------------------------


@torch.no_grad()
def test_layers_that_cannot_run_int8_fall_back_with_a_reason():
    context, group_map = context_and_map()
    weights = WeightQuantConfig(bits=8, scale_search="minmax")
    model = nn.ModuleDict(
        {
            "ok": QuantLinear.from_float(
                nn.Linear(8, 8), weights, act_factory(context, group_map, 8, False, 0)
            ),
            "weight_only": QuantLinear.from_float(nn.Linear(8, 8), weights, None),
            "wide_acts": QuantLinear.from_float(
                nn.Linear(8, 8), weights, act_factory(context, group_map, 12, False, 0)
            ),
            "off": QuantLinear.from_float(
                nn.Linear(8, 8), weights, act_factory(context, group_map, 8, False, 1)
            ),
            "grouped": QuantConv2d.from_float(
                nn.Conv2d(4, 4, 3, groups=2), weights, act_factory(context, group_map, 8, False, 2)
            ),
        }
    )
    for m in model.values():
        m.calibrate_weights()
    model["off"].set_quant_state(weights=True, acts=False)
    report = convert(model)
    reasons = dict(report.fallback)
    assert [i.name for i in report.integer] == ["ok"]
    assert "weight-only" in reasons["weight_only"]
    assert "12-bit activations" in reasons["wide_acts"]
    assert "switched off" in reasons["off"]
    assert "grouped convolution" in reasons["grouped"]
    assert isinstance(model["ok"], Int8Linear) and isinstance(model["weight_only"], QuantLinear)
    x = torch.randn(2, 8)
    with context.use(torch.tensor([100, 900])):
        assert model["weight_only"](x).shape == (2, 8)  # the fake-quant forward still runs
    with pytest.raises(UnsupportedLayerError, match="weight-only"):
        Int8Linear(QuantLinear.from_float(nn.Linear(8, 8), weights, None))


def test_bad_input_errors_before_any_change(quantized_ddim):
    unet = copy.deepcopy(quantized_ddim.unet)
    with pytest.raises(ValueError, match="unknown backend 'int4'; valid: 'int8'"):
        convert(unet, backend="int4")
    with pytest.raises(ValueError, match="unknown kernel 'fast'; valid: 'auto', 'onednn', 'int_mm'"):
        convert(unet, kernel="fast")
    with pytest.raises(TypeError, match="low_memory"):
        convert(unet, low_memory="yes")
    assert not any(isinstance(m, Int8Linear | Int8Conv2d) for m in unet.modules())
    with pytest.raises(TypeError, match=r"pipeline with a \.unet or the UNet"):
        convert(42)
    with pytest.raises(ValueError, match=r"is not quantized: run diffusers_ptq\.quantize_pipeline"):
        convert(tiny_ddim_pipeline())
    convert(unet, kernel="int_mm")
    with pytest.raises(ValueError, match="already converted"):
        convert(unet)


@torch.no_grad()
def test_copy_of_a_converted_unet_runs_without_the_original(quantized_ddim):
    import gc

    unet = copy.deepcopy(quantized_ddim.unet)
    convert(unet)
    inputs = unet_inputs(unet, seed=3)
    expected = unet(**inputs).sample
    clone = copy.deepcopy(unet)
    del unet
    gc.collect()
    assert torch.equal(clone(**inputs).sample, expected)


@torch.no_grad()
def test_saving_a_converted_unet_fails_clearly(quantized_ddim, tmp_path):
    """Save the quantized checkpoint before converting; after, the serializer names the replaced layer."""
    unet = copy.deepcopy(quantized_ddim.unet)
    convert(unet)
    with pytest.raises(diffusers_ptq.CheckpointError, match="Int8"):
        unet.save_pretrained(tmp_path / "unet")


def test_convert_is_exported():
    assert "convert" in diffusers_ptq.__all__ and diffusers_ptq.convert is convert


@torch.no_grad()
def test_low_memory_keeps_no_prepacked_copy():
    if not onednn_available():
        pytest.skip("no oneDNN")
    layer, x, context = quant_layer("conv3x3", 4, True, 8, False, seed=7)
    lean, kept = Int8Conv2d(layer, "onednn", low_memory=True), Int8Conv2d(layer, "onednn")
    with context.use(MIXED_T):
        assert_agrees(lean(x), layer(x))
        assert_agrees(kept(x), layer(x))
    assert lean.cache_nbytes() == 0 and kept.cache_nbytes() > 0
    assert lean.weights[0]._cache is None and kept.weights[0]._cache is not None


# -- torch.compile and GPU ----------------------------------------------------------------------------------


class _Stack(nn.Module):
    """3x3 conv, shortcut-split 1x1 conv and W4 linear behind a timestep pre-hook, as in a UNet."""

    def __init__(self) -> None:
        super().__init__()
        context, group_map = context_and_map()
        w8, w4 = WeightQuantConfig(bits=8, scale_search="minmax"), WeightQuantConfig(bits=4, symmetric=False)
        self.conv = QuantConv2d.from_float(
            nn.Conv2d(6, 8, 3, padding=1), w8, act_factory(context, group_map, 8, False, 0)
        )
        self.split = QuantConv2d.from_float(
            nn.Conv2d(8, 8, 1), w8, act_factory(context, group_map, 8, True, 1), split=3
        )
        self.linear = QuantLinear.from_float(
            nn.Linear(8, 5), w4, act_factory(context, group_map, 8, False, 2)
        )
        for m in (self.conv, self.split, self.linear):
            m.calibrate_weights()
        context.attach(self)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        y = self.split(self.conv(sample))
        return self.linear(y.flatten(2).transpose(1, 2))


def _compiled_calls(module: nn.Module, backend: str, call) -> tuple[list, list[int]]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, backend=backend)
    pairs, graphs = [], []
    try:
        for t in (900, 600, 250, 20, 3):  # spans every timestep group
            pairs.append((call(compiled, t), call(module, t)))
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()
    assert graphs[0] > 0 and graphs == [graphs[0]] * len(graphs), f"graphs after each call: {graphs}"
    return pairs, graphs


@pytest.mark.parametrize("kernel", KERNELS)
@torch.no_grad()
def test_compiled_integer_layers_do_not_recompile_across_timesteps(kernel):
    stack = _Stack()
    x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(0))
    expected = {t: stack(x, torch.tensor(t)) for t in (900, 20)}
    convert(stack, kernel=kernel)
    pairs, _ = _compiled_calls(stack, "eager", lambda m, t: m(x, torch.tensor(t)))
    for compiled_out, eager_out in pairs:
        torch.testing.assert_close(compiled_out, eager_out)
    assert_agrees(stack(x, torch.tensor(900)), expected[900])
    assert_agrees(stack(x, torch.tensor(20)), expected[20])


@pytest.mark.slow
@torch.no_grad()
def test_compiled_converted_unet_does_not_recompile_across_timesteps(quantized_ddim):
    """The whole tiny UNet under dynamo: ~15 s on 2 CPU cores, so marked slow."""
    unet = copy.deepcopy(quantized_ddim.unet)
    convert(unet)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pairs, _ = _compiled_calls(unet, "eager", lambda m, t: m(x, torch.tensor(t)).sample)
    for compiled_out, eager_out in pairs:
        torch.testing.assert_close(compiled_out, eager_out)


@pytest.mark.slow
@torch.no_grad()
def test_inductor_runs_the_integer_layers():
    """Inductor fuses the quantize/dequantize arithmetic around the (opaque) oneDNN op."""
    stack = _Stack()
    convert(stack)
    x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(0))
    pairs, _ = _compiled_calls(stack, "inductor", lambda m, t: m(x, torch.tensor(t)))
    for compiled_out, eager_out in pairs:
        # A fused kernel may flip a rounding tie in an activation code: the bulk must agree.
        close = torch.isclose(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
        assert close.float().mean() > 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_int_mm_matches_fake_quant():
    for name in ("linear_3d", "conv3x3", "conv1x1_split"):
        layer, x, context = quant_layer(name, 8, True, 8, False)
        layer, x = layer.cuda(), x.cuda()
        context_t = MIXED_T.cuda()
        with context.use(context_t):
            new = integer_layer(layer, features.resolve_kernel("auto", x.device))
            assert_agrees(new(x), layer(x))
