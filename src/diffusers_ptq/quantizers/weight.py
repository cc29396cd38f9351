"""Uniform weight quantizer: per output channel or per tensor, scales chosen by a range search."""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.primitives import compute_qparams, fake_quantize, search_range
from diffusers_ptq.quantizers.grid import GridMixin


class WeightQuantizer(GridMixin, nn.Module):
    """Fake-quantizes a weight tensor whose dim 0 is the output channel.

    `scale`/`zero_point` are buffers of shape (C_out,) (per channel) or (1,) (per tensor); they are set
    by `calibrate(weight)` and saved with the model.
    """

    def __init__(self, config: WeightQuantConfig, out_channels: int) -> None:
        super().__init__()
        self.bits = config.bits
        self.symmetric = config.symmetric
        self.per_channel = config.granularity == "per_channel"
        self.search = config.scale_search
        self.search_kwargs = {
            "lp_norm": config.lp_norm,
            "num_candidates": config.num_candidates,
            "percentile": config.percentile,
        }
        n = out_channels if self.per_channel else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n))
        self.enabled = True
        self.calibrated = False

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        rows = (
            weight.detach().reshape(weight.shape[0], -1)
            if self.per_channel
            else weight.detach().reshape(1, -1)
        )
        lo, hi = search_range(rows, self.bits, self.symmetric, self.search, **self.search_kwargs)
        scale, zero_point = compute_qparams(lo, hi, self.bits, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.calibrated = True

    def _broadcast(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.reshape(-1, *([1] * (ndim - 1)))

    def column_qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) per element of `weight` viewed as (C_out, K), K = its other dims flattened.

        One layout for algorithms that walk a weight column by column (second-order rounding), whatever the
        granularity: per-tensor and per-channel qparams are expanded to the full (C_out, K) matrix.
        """
        rows = weight.shape[0]
        cols = weight[0].numel()
        scale = (
            self.scale.reshape(-1, 1).expand(rows, cols)
            if self.per_channel
            else self.scale.expand(rows, cols)
        )
        zero = (
            self.zero_point.reshape(-1, 1).expand(rows, cols)
            if self.per_channel
            else self.zero_point.expand(rows, cols)
        )
        return scale, zero

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        scale = self._broadcast(self.scale, weight.ndim)
        zero_point = self._broadcast(self.zero_point, weight.ndim)
        out = fake_quantize(weight.float(), scale, zero_point, self.qmin, self.qmax)
        return out.to(weight.dtype)

    def extra_repr(self) -> str:
        kind = "per_channel" if self.per_channel else "per_tensor"
        return f"bits={self.bits}, {kind}, symmetric={self.symmetric}, search={self.search}"
