"""WeightQuantizer.column_qparams: the (C_out, K) view that column-wise rounding algorithms walk."""

import pytest
import torch

from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.primitives import fake_quantize
from diffusers_ptq.quantizers.weight import WeightQuantizer


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 7)])
def test_column_qparams_reproduce_fake_quant(granularity, symmetric, shape):
    torch.manual_seed(0)
    weight = torch.randn(shape) * torch.linspace(0.1, 2.0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    config = WeightQuantConfig(bits=4, granularity=granularity, symmetric=symmetric)
    quantizer = WeightQuantizer(config, shape[0])
    quantizer.calibrate(weight)
    scale, zero = quantizer.column_qparams(weight)
    cols = weight[0].numel()
    assert scale.shape == zero.shape == (shape[0], cols)
    by_columns = fake_quantize(weight.reshape(shape[0], -1), scale, zero, quantizer.qmin, quantizer.qmax)
    assert torch.equal(by_columns, quantizer(weight).reshape(shape[0], -1))
