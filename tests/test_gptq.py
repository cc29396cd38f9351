"""GPTQ's pieces on single layers: unfolded conv columns, the column solver, the per-layer solve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.gptq import (
    HessianAccumulator,
    RankDeficientHessian,
    gptq_round,
    input_columns,
    solve_layer,
)
from diffusers_ptq.nn import QuantConv2d, QuantLinear
from diffusers_ptq.primitives import fake_quantize
from diffusers_ptq.quantizers import WeightQuantizer

BITS = [2, 3, 4, 8]


def _correlated(rows: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features (real activations are; GPTQ gains from that)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen) / features**0.5
    return torch.randn(rows, features, generator=gen) @ mix + 0.3 * torch.randn(features, generator=gen)


def _nearest(layer) -> torch.Tensor:
    return layer.quantized_weight().detach()


def _linear(bits: int, symmetric: bool, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    cfg = WeightQuantConfig(bits=bits, symmetric=symmetric, num_candidates=20)
    layer = QuantLinear.from_float(nn.Linear(48, 24), cfg, None)
    layer.calibrate_weights()
    return layer


def _conv(bits: int, symmetric: bool, split: int | None = None, padding_mode: str = "zeros") -> QuantConv2d:
    torch.manual_seed(1)
    cfg = WeightQuantConfig(bits=bits, symmetric=symmetric, num_candidates=20)
    conv = nn.Conv2d(6, 10, 3, padding=1, padding_mode=padding_mode)
    layer = QuantConv2d.from_float(conv, cfg, None, split)
    layer.calibrate_weights()
    return layer


def _solve(name: str, layer, x: torch.Tensor, **overrides) -> torch.Tensor:
    parts = [slice(None)] if layer.split is None else [slice(None, layer.split), slice(layer.split, None)]
    accs = []
    for part, w in zip(parts, layer._weight_parts(layer.weight)):
        acc = HessianAccumulator(w[0].numel(), x.device)
        acc.add(layer, x[:, part] if isinstance(layer, nn.Conv2d) else x)
        accs.append(acc)
    config = WeightQuantConfig(**{"bits": layer.weight_bits, **overrides})
    return solve_layer(name, layer, accs, config)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("padding", [1, "same", 0])
def test_unfolded_columns_reproduce_the_conv(padding, padding_mode):
    """H's column order is the weight's (C_out, C_in * kh * kw) order, padding included."""
    if padding == 0 and padding_mode == "reflect":
        pytest.skip("nothing to pad")
    conv = nn.Conv2d(5, 7, 3, padding=padding, padding_mode=padding_mode, dilation=1, bias=False)
    x = torch.randn(2, 5, 9, 8)
    cols = input_columns(conv, x)
    out = conv(x)
    expect = out.permute(0, 2, 3, 1).reshape(-1, 7)
    torch.testing.assert_close(cols @ conv.weight.reshape(7, -1).T, expect, rtol=1e-5, atol=1e-5)
    strided = nn.Conv2d(5, 7, 3, stride=2, dilation=2, padding=2, bias=False)
    expect = strided(x).permute(0, 2, 3, 1).reshape(-1, 7)
    torch.testing.assert_close(input_columns(strided, x) @ strided.weight.reshape(7, -1).T, expect)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_gptq_lowers_linear_output_error(bits, symmetric):
    layer = _linear(bits, symmetric)
    x = _correlated(256, 48, seed=bits)
    nearest = _nearest(layer)
    gptq = _solve("fc", layer, x)
    assert torch.equal(layer.weight_quantizers[0](gptq), gptq)  # on the layer's own grid
    err = lambda w: (x @ (layer.weight.detach() - w).T).norm()  # noqa: E731
    assert err(gptq) < 0.9 * err(nearest)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("split", [None, 2])
def test_gptq_lowers_conv_output_error(bits, symmetric, split):
    layer = _conv(bits, symmetric, split)
    gen = torch.Generator().manual_seed(bits)
    x = F.avg_pool2d(torch.randn(8, 6, 14, 14, generator=gen), 3, 1, 1) + 0.2  # spatially correlated
    nearest = _nearest(layer)
    gptq = _solve("conv", layer, x)
    for q, part in zip(layer.weight_quantizers, layer._weight_parts(gptq)):
        assert torch.equal(q(part), part)
    ref = F.conv2d(x, layer.weight.detach(), padding=1)
    err = lambda w: (F.conv2d(x, w, padding=1) - ref).norm()  # noqa: E731
    assert err(gptq) < 0.9 * err(nearest)


def test_act_order_and_small_blocks_still_beat_nearest_and_stay_on_grid():
    layer = _linear(3, False)
    x = _correlated(256, 48, seed=7)
    err = lambda w: (x @ (layer.weight.detach() - w).T).norm()  # noqa: E731
    base = _solve("fc", layer, x)
    ordered = _solve("fc", layer, x, gptq_act_order=True, gptq_block_size=5)
    assert torch.equal(layer.weight_quantizers[0](ordered), ordered)
    assert not torch.equal(ordered, base)  # the order really changed what was solved
    assert err(ordered) < 0.9 * err(_nearest(layer))


@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_block_size_does_not_change_the_result(block_size):
    """Lazy batching is an implementation detail: the same columns, the same error spreading."""
    layer = _linear(4, True)
    x = _correlated(128, 48, seed=3)
    reference = _solve("fc", layer, x, gptq_block_size=48)
    torch.testing.assert_close(_solve("fc", layer, x, gptq_block_size=block_size), reference, atol=0, rtol=0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_identity_hessian_is_nearest_rounding(bits, symmetric):
    q = WeightQuantizer(WeightQuantConfig(bits=bits, symmetric=symmetric, num_candidates=20), 16)
    w = torch.randn(16, 40)
    q.calibrate(w)
    scale, zero = q.column_qparams(w)
    out = gptq_round(w, torch.eye(40), scale, zero, q.qmin, q.qmax, block_size=16)
    assert torch.equal(out, q(w))


def test_dead_inputs_keep_nearest_rounding():
    q = WeightQuantizer(WeightQuantConfig(bits=4), 8)
    w = torch.randn(8, 6)
    q.calibrate(w)
    scale, zero = q.column_qparams(w)
    h = torch.zeros(6, 6)
    out = gptq_round(w, h, scale, zero, q.qmin, q.qmax)
    assert torch.equal(out, fake_quantize(w, scale, zero, q.qmin, q.qmax))


def test_singular_hessian_without_damping_is_rejected():
    q = WeightQuantizer(WeightQuantConfig(bits=4), 4)
    w = torch.randn(4, 8)
    q.calibrate(w)
    scale, zero = q.column_qparams(w)
    with pytest.raises(RankDeficientHessian):
        gptq_round(w, torch.ones(8, 8), scale, zero, q.qmin, q.qmax, damp=0.0)


def test_too_few_inputs_name_the_layer_and_the_samples_needed():
    layer = _linear(4, True)
    x = _correlated(10, 48, seed=0)  # 10 input vectors for 48 columns
    with pytest.raises(ValueError, match=r"down\.fc .*10 input vectors.*48.*48 calibration rows"):
        _solve("down.fc", layer, x, gptq_damp=0.0)
    conv = _conv(4, True)
    x = torch.randn(1, 6, 2, 2)  # 4 patches per sample for 54 columns -> 14 samples
    with pytest.raises(ValueError, match=r"up\.conv .*54 x 54.*about 14 calibration rows"):
        _solve("up.conv", conv, x, gptq_damp=0.0)
    # Cholesky itself failing (rank-deficient despite enough vectors) gives the same error.
    x = torch.ones(100, 48)
    with pytest.raises(ValueError, match=r"down\.fc .*singular"):
        _solve("down.fc", layer, x, gptq_damp=0.0)
    assert _solve("down.fc", layer, x).shape == layer.weight.shape  # dampening makes it solvable


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_dtype_weights_land_on_the_grid_the_forward_uses(dtype):
    layer = _linear(8, False)
    with torch.no_grad():  # far from zero: grid points need more mantissa than bfloat16 has
        layer.weight.add_(1.0)
    layer.calibrate_weights()
    layer.to(dtype)
    x = _correlated(256, 48, seed=5)
    out = _solve("fc", layer, x)
    assert out.dtype == dtype
    assert torch.equal(layer.weight_quantizers[0](out), out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("split", [None, 2])
def test_gptq_on_cuda_matches_the_cpu_solve(split):
    """H accumulated and solved on the GPU: the same codes as on the CPU, but for float-rounding ties."""
    layer = _conv(4, False, split)
    gen = torch.Generator().manual_seed(3)
    x = F.avg_pool2d(torch.randn(8, 6, 14, 14, generator=gen), 3, 1, 1) + 0.2
    cpu = _solve("conv", layer, x)
    gpu = _solve("conv", layer.cuda(), x.cuda())
    assert gpu.is_cuda
    steps = torch.cat([q.scale.detach().flatten() for q in layer.weight_quantizers]).min().cpu()
    moved = (gpu.cpu() - cpu).abs() > 0.5 * steps
    assert moved.float().mean() < 0.01  # a handful of codes may flip on rounding ties
