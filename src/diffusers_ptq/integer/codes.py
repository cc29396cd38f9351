"""What a fake-quant layer holds, read as integers: weight codes per part, and whether it can run as int8.

The codes are the ones the fake-quant forward rounds to, so the integer layer computes the same products:
round-to-nearest for a `WeightQuantizer` (AdaRound weights are baked onto the grid, so they round back to
their learned codes), the learned rounding for an `AdaRoundQuantizer` that is hard or frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.quantizers import TimestepActQuantizer

MAX_INT_BITS = 8


def weight_parts(layer: QuantLayerMixin) -> list[tuple[nn.Module, torch.Tensor, slice]]:
    """(weight quantizer, weight slice, input-channel slice) of each part (two for a shortcut split)."""
    weight = layer.weight.detach()
    if layer.split is None:
        return [(layer.weight_quantizers[0], weight, slice(None))]
    s = layer.split
    return [
        (layer.weight_quantizers[0], weight[:, :s], slice(0, s)),
        (layer.weight_quantizers[1], weight[:, s:], slice(s, None)),
    ]


def _per_channel(t: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) per-channel values, or the (n, G) per-group table as it is (its columns in kernel order)."""
    return t.detach().float().reshape(-1).expand(n).clone() if t.numel() == 1 else t.detach().float()


@torch.no_grad()
def weight_codes(
    quantizer: nn.Module, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centred codes as int32, same shape as `weight`; scale; centred zero point).

    Scale and zero point are per channel (C_out,), or per group (C_out, G) with the groups along the
    kernels' K order (`quantizers.groups`). Centred: shifted by qmin + 2^(bits-1), so every grid lands in
    [-2^(bits-1), 2^(bits-1) - 1].
    """
    base = getattr(quantizer, "base", quantizer)  # AdaRound wraps the WeightQuantizer whose grid it uses
    n = weight.shape[0]
    scale = _per_channel(base.scale, n)
    zero_point = _per_channel(base.zero_point, n)
    if hasattr(quantizer, "codes"):
        codes = quantizer.codes(weight)
    else:
        full_scale, full_zero = base.qparams(weight)
        q = torch.round(weight.float() / full_scale) + full_zero
        codes = q.clamp(quantizer.qmin, quantizer.qmax)
    shift = quantizer.qmin + 2 ** (quantizer.bits - 1)
    return (codes - shift).to(torch.int32), scale, zero_point - shift


def unsupported_reason(layer: QuantLayerMixin) -> str | None:
    """Why `layer` cannot run on int8 kernels (it then keeps its fake-quant forward), or None."""
    acts: list[TimestepActQuantizer] = list(layer.act_quantizers)
    if not acts:
        return "weight-only quantization: the input is not quantized, so there is no int8 x int8 product"
    if acts[0].bits > MAX_INT_BITS:
        return f"{acts[0].bits}-bit activations do not fit int8"
    if layer.weight_bits > MAX_INT_BITS:
        return f"{layer.weight_bits}-bit weights do not fit int8"
    if not all(q.enabled for q in layer.weight_quantizers) or not all(q.enabled for q in acts):
        return "fake quantization is switched off (set_quant_state); the layer computes in float"
    if any(q.observer is not None or q.group_mixer is not None for q in acts):
        return "an activation quantizer is still observing or searching groups"
    if any(getattr(q, "mode", None) == "soft" for q in layer.weight_quantizers):
        return "AdaRound rounding is still soft (not hard or frozen): weights are off the integer grid"
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups})"
        if isinstance(layer.padding, str):
            return f"padding={layer.padding!r} given as a string"
    return None
