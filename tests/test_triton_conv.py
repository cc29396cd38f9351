"""The Triton implicit-GEMM int8 conv (`kernel="triton"`): agreement with fake quantization and with the
im2col + `torch._int_mm` path, bad input, and the whole-UNet conversion.

Without a GPU the kernel runs in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1 before
anything imports triton). On a CUDA machine the same tests run the compiled kernel on the GPU.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from diffusers_ptq import PTQConfig, QuantConv2d, convert, quantize_pipeline
from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.integer import Int8Conv2d, features
from diffusers_ptq.integer.triton_conv import conv2d_int8
from diffusers_ptq.tiny import tiny_ddim_pipeline
from integer_helpers import (
    FAST,
    GRIDS,
    LAYERS,
    MIXED_T,
    SEARCH,
    act_factory,
    assert_agrees,
    assert_unet_agrees,
    context_and_map,
    float_output,
    quant_layer,
    unet_inputs,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KXK = [name for name in LAYERS if name.startswith("conv3x3")]


def _to(layer: nn.Module, x: torch.Tensor, t: torch.Tensor = MIXED_T):
    return layer.to(DEVICE), x.to(DEVICE), t.to(DEVICE)


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize(("w_sym", "a_sym"), GRIDS)
@pytest.mark.parametrize("name", KXK)
@torch.no_grad()
def test_kxk_conv_matches_fake_quant(name, w_sym, a_sym, w_bits):
    """Stride, dilation, reflect padding, no bias, shortcut split; affine and symmetric grids; packed W4."""
    layer, x, context = quant_layer(name, w_bits, w_sym, 8, a_sym)
    layer, x, t = _to(layer, x)
    with context.use(t):
        new = Int8Conv2d(layer, "triton")
        assert new.implicit_gemm
        assert_agrees(new(x), layer(x))


def _wide_conv(w_bits: int, w_sym: bool, stride: int, in_channels: int = 80, out_channels: int = 70):
    """More channels than one K tile and more outputs than one N tile, with partial last tiles."""
    torch.manual_seed(3)
    context, group_map = context_and_map()
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
    weights = WeightQuantConfig(bits=w_bits, symmetric=w_sym, scale_search="minmax")
    layer = QuantConv2d.from_float(conv, weights, act_factory(context, group_map, 8, False, 3))
    layer.calibrate_weights()
    x = torch.randn(4, in_channels, 9, 11, generator=torch.Generator().manual_seed(4))
    return layer, x, context


@pytest.mark.parametrize(("w_bits", "w_sym", "stride"), [(8, True, 1), (8, False, 2), (4, False, 1)])
@torch.no_grad()
def test_multi_tile_conv_equals_the_im2col_path(w_bits, w_sym, stride):
    """Same integer products as im2col + `torch._int_mm`: equal to fp32 rounding of the epilogue."""
    layer, x, context = _wide_conv(w_bits, w_sym, stride)
    layer, x, t = _to(layer, x)
    with context.use(t):
        triton_out = Int8Conv2d(layer, "triton")(x)
        reference = Int8Conv2d(layer, "int_mm")(x)
        assert_agrees(triton_out, layer(x))
    torch.testing.assert_close(triton_out, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))


@torch.no_grad()
def test_half_input_gives_half_output():
    layer, x, context = quant_layer("conv3x3", 8, True, 8, False)
    layer, x, t = _to(layer, x)
    with context.use(t):
        out = Int8Conv2d(layer, "triton")(x.half())
        ref = layer(x.half().float()).half()
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)


@torch.no_grad()
def test_one_by_one_convs_stay_on_int_mm():
    layer, _, _ = quant_layer("conv1x1", 8, True, 8, False)
    assert not Int8Conv2d(layer.to(DEVICE), "triton").implicit_gemm


@torch.no_grad()
def test_kernel_rejects_a_weight_of_another_shape():
    layer, _, _ = quant_layer("conv3x3", 8, True, 8, False)
    new = Int8Conv2d(layer, "triton")
    codes = torch.zeros(1, 5, 5, 7, dtype=torch.int8)  # 7 channels, the weight expects 13
    with pytest.raises(ValueError, match=r"weight has K = 117, the conv needs 3 x 3 x 7"):
        conv2d_int8(codes, new.weights[0], (3, 3), (1, 1), (1, 1), torch.ones(1), torch.zeros(1), None)


def test_triton_kernel_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"kernel='triton' needs a CUDA model .*the model is on cpu"):
        features.resolve_kernel("triton", torch.device("cpu"))
    assert features.resolve_kernel("auto", torch.device("cpu")) in ("onednn", "int_mm")
    monkeypatch.setattr(features, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match="triton is not installed"):
        features.resolve_kernel("triton", torch.device("cuda"))
    assert features.resolve_kernel("auto", torch.device("cuda")) == "int_mm"


def test_auto_picks_triton_on_cuda():
    assert features.resolve_kernel("auto", torch.device("cuda")) == "triton"


@pytest.mark.slow  # ~7 s in Triton's CPU interpreter on 2 cores
@torch.no_grad()
def test_unet_converts_with_the_triton_kernel():
    pipe = tiny_ddim_pipeline()
    config = PTQConfig(
        weight_bits=8, act_bits=8, weights=SEARCH, activations={**SEARCH, "timestep_groups": 4}
    )
    quantize_pipeline(pipe, config, **FAST)
    unet = copy.deepcopy(pipe.unet).to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in unet_inputs(unet).items()}
    ref, float_ref = unet(**inputs).sample, float_output(unet, inputs)
    report = convert(unet, kernel="triton")
    assert report.kernel == "triton" and not report.fallback
    implicit = [m for m in unet.modules() if isinstance(m, Int8Conv2d) and m.implicit_gemm]
    assert implicit and all(m.kernel_size != (1, 1) for m in implicit)
    assert_unet_agrees(unet(**inputs).sample, ref, float_ref)


@pytest.mark.slow  # ~17 s on 2 CPU cores
@torch.no_grad()
def test_compiled_conv_runs_the_kernel_as_one_op_without_recompiles():
    """Under torch.compile the launch is an opaque custom op: same output, no recompile across timesteps."""
    layer, x, context = quant_layer("conv3x3_split", 8, False, 8, False)
    layer, x, _ = _to(layer, x)
    new = Int8Conv2d(layer, "triton")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(new, fullgraph=True, dynamic=False)
    for t in (950, 600, 10):
        with context.use(torch.full((x.shape[0],), t, device=DEVICE)):
            assert_agrees(compiled(x), layer(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
