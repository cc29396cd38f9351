"""The Hessian of a layer's output error with respect to its weight: H = 2 X Xᵀ over its inputs.

X holds one column per input vector the weight multiplies: a Linear's input rows, a Conv2d's unfolded
patches (F.unfold order, channel-major then kernel row and column, which is the order of the weight viewed
as (C_out, C_in * kh * kw) that the integer kernels use).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def input_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` (a slice of the layer's input channels) as rows of length K, one per vector the weight sees."""
    if isinstance(layer, nn.Conv2d):
        # Pad as the conv does (any padding mode, 'same' included), then unfold without padding.
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class HessianAccumulator:
    """Sums X Xᵀ in float32 on `device` over the calls it sees; `hessian()` is 2 X Xᵀ / (vectors seen)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.columns = columns
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.vectors = 0
        self.samples = 0

    def add(self, layer: nn.Module, x: torch.Tensor) -> None:
        rows = input_columns(layer, x.detach().to(self.sum.device, torch.float32))
        if rows.shape[1] != self.columns:
            raise ValueError(f"input of {rows.shape[1]} columns for a Hessian of {self.columns}")
        self.sum.addmm_(rows.T, rows)
        self.vectors += rows.shape[0]
        self.samples += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.vectors == 0:
            raise RuntimeError("no inputs were accumulated")
        return self.sum.mul_(2.0 / self.vectors)  # in place: one K x K matrix per accumulator

    def samples_needed(self) -> int:
        """Calibration samples whose input vectors would reach K, the least a full-rank H needs."""
        per_sample = max(self.vectors // max(self.samples, 1), 1)
        return -(-self.columns // per_sample)
