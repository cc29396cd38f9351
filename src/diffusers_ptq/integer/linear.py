"""Int8Linear: the input quantized per sample, an int8 x int8 GEMM, dequantised with bias after."""

from __future__ import annotations

import torch

from diffusers_ptq.integer.activation import quantize_rows
from diffusers_ptq.integer.base import IntegerLayer
from diffusers_ptq.nn.layers import QuantLinear


class Int8Linear(IntegerLayer):
    """Integer execution of a calibrated `QuantLinear` (same output up to float rounding)."""

    def __init__(self, layer: QuantLinear, kernel: str = "int_mm", low_memory: bool = False) -> None:
        """Build from a calibrated QuantLinear; raises UnsupportedLayerError saying why it cannot."""
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._init_parts(layer, kernel, low_memory, lambda codes: codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, b = x.shape[:-1], x.shape[0]
        x3 = x.reshape(b, -1, self.in_features).contiguous()
        scale, zero_point = self.part_qparams(0, x3)
        codes = quantize_rows(x3, scale, zero_point, self.code_lo, self.code_hi, self.code_dtype)
        y = self.part_output(0, codes.reshape(-1, self.in_features), scale, zero_point)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"W{self.weight_bits}A{self.act_bits}, kernel={self.kernel}"
        )
