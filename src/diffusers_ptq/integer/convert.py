"""`convert`: swap every calibrated QuantLinear / QuantConv2d of a quantized UNet for its integer module.

Everything is checked before anything changes: the backend, the kernel, that the model is quantized and
not converted already. Layers that cannot run on int8 (weight-only, activations above 8 bits, quantization
switched off, soft AdaRound, grouped convs) keep their fake-quant forward and are listed with the reason.
All integer modules are built first and swapped in only when every one was built.

Attention matmuls keep the fake-quant path (quantized q, k, v; fused SDPA, or the float matmuls around a
quantized softmax). An int8 q.k^T would need k prepacked on every call (k changes with the input) and
replaces only one of the three steps that fused float SDPA (q.k^T, softmax, .v) does in one kernel, so the
float path stays. (Timings of that comparison were taken in an earlier session without a committed result
file, so they are not quoted here.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffusers_ptq.integer.base import IntegerLayer, UnsupportedLayerError
from diffusers_ptq.integer.conv import Int8Conv2d
from diffusers_ptq.integer.features import KERNELS, resolve_kernel
from diffusers_ptq.integer.linear import Int8Linear
from diffusers_ptq.integer.report import FP16_BYTES, ConversionReport, IntegerLayerInfo
from diffusers_ptq.nn import QuantAttnProcessor, QuantConv2d, QuantLinear
from diffusers_ptq.nn.layers import QuantLayerMixin

BACKENDS = ("int8",)
_INTEGER_MODULES = {QuantConv2d: Int8Conv2d, QuantLinear: Int8Linear}


def _find_unet(pipe_or_unet: Any) -> nn.Module:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not isinstance(unet, nn.Module):
        raise TypeError(
            f"convert expects a diffusers pipeline with a .unet or the UNet itself, got "
            f"{type(pipe_or_unet).__name__}"
        )
    return unet


def _check(unet: nn.Module, backend: str, kernel: str, low_memory: bool) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(repr(b) for b in BACKENDS)}")
    if not isinstance(low_memory, bool):
        raise TypeError(f"low_memory must be True or False, got {low_memory!r}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(repr(k) for k in KERNELS)}")
    modules = list(unet.modules())
    if any(isinstance(m, IntegerLayer) for m in modules):
        raise ValueError(
            "this UNet was already converted to integer kernels; load or quantize it again to convert anew"
        )
    if not any(isinstance(m, QuantLayerMixin) for m in modules):
        raise ValueError(
            f"{type(unet).__name__} is not quantized: run diffusers_ptq.quantize_pipeline(pipe, config) "
            "first, or load a diffusers-ptq checkpoint with from_pretrained (after `import diffusers_ptq`)"
        )


def _device(unet: nn.Module) -> torch.device:
    param = next(unet.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def _info(name: str, layer: QuantLayerMixin, new: IntegerLayer) -> IntegerLayerInfo:
    kind = "conv{}x{}".format(*layer.kernel_size) if isinstance(layer, nn.Conv2d) else "linear"
    code_bytes, constant_bytes = new.weight_nbytes()
    return IntegerLayerInfo(
        name=name,
        kind=kind,
        weight_bits=new.weight_bits,
        act_bits=new.act_bits,
        parts=len(new.weights),
        split_for_saturation=new.split_for_saturation,
        code_bytes=code_bytes,
        constant_bytes=constant_bytes,
        cache_bytes=new.cache_nbytes(),
        fp16_bytes=layer.weight.numel() * FP16_BYTES,
    )


@torch.no_grad()
def convert(
    pipe_or_unet: Any, backend: str = "int8", *, kernel: str = "auto", low_memory: bool = False
) -> ConversionReport:
    """Run the calibrated quantized layers of `pipe.unet` (or a UNet) on integer kernels, in place.

    `backend`: 'int8' (int8 x int8 -> int32 GEMMs; W<=4 weights stored two per byte). `kernel`: 'auto'
    (oneDNN on CPU when this torch has it; on CUDA 'triton' when triton is installed; else `torch._int_mm`),
    'onednn', 'int_mm' (exact everywhere; fast on CUDA, a slow reference loop on CPU), or 'triton' (kxk
    convs as a Triton implicit GEMM with the dequantisation fused, the other layers on `torch._int_mm`;
    CUDA, or Triton's CPU interpreter under TRITON_INTERPRET=1). `low_memory`: rebuild oneDNN's prepacked
    weight on every call instead of keeping it (resident weights stay at the stored codes' size, slower on
    small layers).

    Works on a freshly quantized UNet and on one loaded with `from_pretrained`; convert on the device you
    run on. Each layer's output matches its fake-quant forward up to float rounding. Returns a
    `ConversionReport` (also kept as `unet._ptq_integer_report`). A converted UNet is for inference: save
    the quantized checkpoint before converting (saving afterwards raises a CheckpointError).
    """
    unet = _find_unet(pipe_or_unet)
    _check(unet, backend, kernel, low_memory)
    resolved = resolve_kernel(kernel, _device(unet))
    report = ConversionReport(backend=backend, kernel=resolved)
    swaps: list[tuple[nn.Module, str, IntegerLayer]] = []
    for name, module in unet.named_modules():
        if not isinstance(module, QuantLayerMixin):
            continue
        cls = _INTEGER_MODULES.get(type(module))
        if cls is None:
            report.fallback.append((name, f"{type(module).__name__} has no integer module"))
            continue
        try:
            new = cls(module, resolved, low_memory)
        except UnsupportedLayerError as err:
            report.fallback.append((name, str(err)))
            continue
        parent_name, _, attr = name.rpartition(".")
        swaps.append((unet.get_submodule(parent_name) if parent_name else unet, attr, new))
        report.integer.append(_info(name, module, new))
    for parent, attr, new in swaps:
        setattr(parent, attr, new)
    for name, module in unet.named_modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, QuantAttnProcessor):
            path = "float softmax" if processor.softmax_quantizer is None else "quantized softmax"
            note = f"fake-quant q/k/v, float matmuls ({path}): fused float SDPA beats int8 q.k^T on CPU"
            report.attention.append((name, note))
    unet._ptq_integer_report = report
    return report
