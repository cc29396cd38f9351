"""Quantized modules: Conv2d/Linear wrappers (with shortcut-split) and the attention-matmul processor."""

from diffusers_ptq.nn.attention import SOFTMAX_FLOAT_BITS, SUPPORTED_PROCESSORS, QuantAttnProcessor
from diffusers_ptq.nn.layers import QuantConv2d, QuantLayerMixin, QuantLinear

__all__ = [
    "SOFTMAX_FLOAT_BITS",
    "SUPPORTED_PROCESSORS",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLayerMixin",
    "QuantLinear",
]
