"""Real integer execution of a quantized UNet: int8 x int8 -> int32 GEMMs with timestep-group scales.

`convert(pipe, backend="int8")` swaps each calibrated QuantLinear / QuantConv2d for an `Int8Linear` /
`Int8Conv2d` whose output equals the fake-quant layer's up to float rounding.
"""

from diffusers_ptq.integer.base import IntegerLayer, UnsupportedLayerError
from diffusers_ptq.integer.conv import Int8Conv2d
from diffusers_ptq.integer.convert import BACKENDS, convert
from diffusers_ptq.integer.features import KERNELS, cpu_has_vnni, onednn_available
from diffusers_ptq.integer.linear import Int8Linear
from diffusers_ptq.integer.report import ConversionReport, IntegerLayerInfo
from diffusers_ptq.integer.weight import IntegerWeight

__all__ = [
    "BACKENDS",
    "KERNELS",
    "ConversionReport",
    "Int8Conv2d",
    "Int8Linear",
    "IntegerLayer",
    "IntegerLayerInfo",
    "IntegerWeight",
    "UnsupportedLayerError",
    "convert",
    "cpu_has_vnni",
    "onednn_available",
]
