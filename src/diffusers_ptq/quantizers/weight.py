"""Uniform weight quantizer: per output channel, per tensor or per input group; scales from a range search."""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.primitives import compute_qparams, fake_quantize, search_range
from diffusers_ptq.quantizers.grid import GridMixin
from diffusers_ptq.quantizers.groups import expand_qparam, group_rows, layer_group_size


class WeightQuantizer(GridMixin, nn.Module):
    """Fake-quantizes a weight tensor whose dim 0 is the output channel.

    `scale`/`zero_point` are buffers of shape (C_out,) (per channel), (1,) (per tensor) or (C_out, G) (per
    group, G = in_features / group_size; see `quantizers.groups` for the column order); they are set by
    `calibrate(weight)` and saved with the model. 'auto' is resolved for `config.bits`. 'per_group' needs
    `in_features` (K, the weight's values per output channel); where group_size does not divide it,
    `layer_group_size` picks the layer's size: under 'auto' a divisor of K near group_size, else per-channel
    scales (`granularity` then says 'per_channel'; `plan_quantization` warns about such layers or refuses
    them when 'per_group' was asked for explicitly).
    """

    def __init__(self, config: WeightQuantConfig, out_channels: int, in_features: int | None = None) -> None:
        super().__init__()
        self.bits = config.bits
        self.symmetric = config.symmetric
        self.group_size: int | None = None
        granularity = config.granularity_in_effect()
        if granularity == "per_group":
            if in_features is None:
                if config.granularity == "per_group":  # 'auto' just keeps per-channel scales
                    raise ValueError("per_group weight scales need the layer's in_features (K)")
            else:
                nearest = config.granularity == "auto"
                self.group_size = layer_group_size(in_features, config.group_size, nearest)
        self.per_channel = granularity != "per_tensor"
        self.search = config.scale_search
        self.search_kwargs = {
            "lp_norm": config.lp_norm,
            "num_candidates": config.num_candidates,
            "percentile": config.percentile,
        }
        if self.group_size is not None:
            shape: tuple[int, ...] = (out_channels, in_features // self.group_size)
        else:
            shape = (out_channels if self.per_channel else 1,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.enabled = True
        self.calibrated = False

    def set_group_size(self, group_size: int | None, in_features: int) -> None:
        """Re-shape the (uncalibrated) scales for another group size: a checkpoint's, when loading."""
        if group_size is not None and (group_size < 1 or in_features % group_size or not self.per_channel):
            kind = self.granularity
            raise ValueError(f"groups of {group_size} do not fit {in_features} inputs ({kind} scales)")
        self.group_size = group_size
        out_channels = self.scale.shape[0] if self.per_channel else 1
        shape = (out_channels, in_features // group_size) if group_size else (out_channels,)
        device = self.scale.device
        self.scale = torch.ones(shape, device=device)
        self.zero_point = torch.zeros(shape, device=device)
        self.calibrated = False

    @property
    def granularity(self) -> str:
        """The granularity in effect: 'per_group', 'per_channel' (also per-group's fallback), 'per_tensor'."""
        if self.group_size is not None:
            return "per_group"
        return "per_channel" if self.per_channel else "per_tensor"

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        w = weight.detach()
        if self.group_size is not None:
            rows = group_rows(w, self.group_size)  # one range search per (channel, group)
        elif self.per_channel:
            rows = w.reshape(w.shape[0], -1)
        else:
            rows = w.reshape(1, -1)
        lo, hi = search_range(rows, self.bits, self.symmetric, self.search, **self.search_kwargs)
        scale, zero_point = compute_qparams(lo, hi, self.bits, self.symmetric)
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.calibrated = True

    def _broadcast(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Per-channel / per-tensor qparams only; `qparams(weight)` handles every granularity."""
        return t.reshape(-1, *([1] * (ndim - 1)))

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) broadcastable against `weight` (full size for per-group scales)."""
        return expand_qparam(self.scale, weight.shape), expand_qparam(self.zero_point, weight.shape)

    def column_qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) per element of `weight` viewed as (C_out, K), K = its other dims flattened.

        One layout for algorithms that walk a weight column by column (second-order rounding), whatever the
        granularity: column j is `weight.reshape(C_out, -1)[:, j]` (for a conv, (C_in, kh, kw) order).
        Per-group qparams are repeated over their group's columns; groups run along the integer kernels'
        (kh, kw, C_in) order (`quantizers.groups`), so in this order a conv's group is not one contiguous
        run of columns.
        """
        rows = weight.shape[0]
        scale, zero = self.qparams(weight)
        return (
            scale.expand(weight.shape).reshape(rows, -1),
            zero.expand(weight.shape).reshape(rows, -1),
        )

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        scale, zero_point = self.qparams(weight)
        out = fake_quantize(weight.float(), scale, zero_point, self.qmin, self.qmax)
        return out.to(weight.dtype)

    def extra_repr(self) -> str:
        kind = self.granularity
        if self.group_size is not None:
            kind += f" (group_size={self.group_size})"
        return f"bits={self.bits}, {kind}, symmetric={self.symmetric}, search={self.search}"
