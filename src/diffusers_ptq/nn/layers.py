"""Quantized Conv2d and Linear: the float layer's own parameters, plus weight and input quantizers.

They subclass the float layers, so `isinstance(m, nn.Conv2d)` still holds and the parameter names
(`weight`, `bias`) stay where diffusers expects them. A conv may split its input channels in two
(Q-Diffusion's shortcut-split): each part gets its own activation quantizer and its own weight quantizer
on the matching input-channel slice (per-group weight scales are grouped within each slice).

While a quantization job runs, second-order rounding (GPTQ) gives a layer a new on-grid `weight` and
keeps the float one as the plain attribute `float_weight` (not a parameter: never saved), which the layer
uses when its weight quantizers are off, so float targets stay float; the job drops it when it ends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.quantizers import TimestepActQuantizer, TimestepBiasTable, WeightQuantizer

ActFactory = Callable[[str], TimestepActQuantizer]


class QuantLayerMixin:
    """Shared state switch and quantizer bookkeeping of QuantConv2d / QuantLinear."""

    weight_quantizers: nn.ModuleList
    act_quantizers: nn.ModuleList
    split: int | None
    # Set by `install` with bias_correction='layer': per-timestep-group output correction.
    bias_table: TimestepBiasTable | None

    def _init_quantizers(
        self, weight_config: WeightQuantConfig, act_factory: ActFactory | None, split: int | None
    ) -> None:
        self.split = split
        self.bias_table = None
        parts = 1 if split is None else 2
        out_channels = self.weight.shape[0]
        # Each part gets its own K (a split conv's halves), so per-group scales never straddle the halves.
        self.weight_quantizers = nn.ModuleList(
            WeightQuantizer(weight_config, out_channels, part[0].numel())
            for part in self._weight_parts(self.weight)
        )
        acts = (
            []
            if act_factory is None
            else [act_factory(f"input{i}" if parts > 1 else "input") for i in range(parts)]
        )
        self.act_quantizers = nn.ModuleList(acts)

    def set_quant_state(self, weights: bool, acts: bool) -> None:
        """Turn weight and/or input fake quantization on or off."""
        for q in self.weight_quantizers:
            q.enabled = weights
        for q in self.act_quantizers:
            q.enabled = acts
        if self.bias_table is not None:  # it corrects the quantized layer: off when the layer runs float
            self.bias_table.enabled = weights or acts

    @torch.no_grad()
    def calibrate_weights(self) -> None:
        for q, w in zip(self.weight_quantizers, self._weight_parts(self.weight)):
            q.calibrate(w)

    def _weight_parts(self, weight: torch.Tensor) -> list[torch.Tensor]:
        if self.split is None:
            return [weight]
        return [weight[:, : self.split], weight[:, self.split :]]

    def quantized_weight(self) -> torch.Tensor:
        float_weight = self.__dict__.get("float_weight")
        if float_weight is not None and not any(q.enabled for q in self.weight_quantizers):
            return float_weight  # weights off means the float model, also after GPTQ rebound `weight`
        parts = [q(w) for q, w in zip(self.weight_quantizers, self._weight_parts(self.weight))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.act_quantizers) == 0:
            return x
        if self.split is None:
            return self.act_quantizers[0](x)
        return torch.cat(
            [self.act_quantizers[0](x[:, : self.split]), self.act_quantizers[1](x[:, self.split :])], dim=1
        )

    @property
    def weight_bits(self) -> int:
        return self.weight_quantizers[0].bits

    @property
    def act_bits(self) -> int | None:
        return self.act_quantizers[0].bits if len(self.act_quantizers) else None


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """nn.Conv2d with fake-quantized weights and timestep-aware fake-quantized input."""

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_config: WeightQuantConfig,
        act_factory: ActFactory | None,
        split: int | None = None,
    ) -> QuantConv2d:
        if split is not None and not 0 < split < conv.in_channels:
            raise ValueError(f"shortcut split {split} must lie inside the {conv.in_channels} input channels")
        if split is not None and conv.groups != 1:
            raise ValueError("shortcut split needs a conv with groups=1")
        with torch.device("meta"):
            new = cls(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
                padding_mode=conv.padding_mode,
            )
        new.weight = conv.weight
        new.bias = conv.bias
        new._init_quantizers(weight_config, act_factory, split)
        new.to(conv.weight.device)
        new.train(conv.training)  # a swapped-in layer keeps the mode of the one it replaces
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)
        return y if self.bias_table is None else self.bias_table(y, 1)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """nn.Linear with fake-quantized weights and timestep-aware fake-quantized input."""

    @classmethod
    def from_float(
        cls, linear: nn.Linear, weight_config: WeightQuantConfig, act_factory: ActFactory | None
    ) -> QuantLinear:
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_quantizers(weight_config, act_factory, None)
        new.to(linear.weight.device)
        new.train(linear.training)  # a swapped-in layer keeps the mode of the one it replaces
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)
        return y if self.bias_table is None else self.bias_table(y, -1)
