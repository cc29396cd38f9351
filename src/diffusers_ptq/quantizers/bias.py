"""Timestep-aware corrections: a per-group bias table on a layer's output, and PTQD's noise correction.

Both are siblings of the activation scale table: a (G, ...) table indexed per sample through the same
timestep -> group map, so a batch may mix timesteps. They start as the identity (zeros) and are filled
by `diffusers_ptq.bias_correction` after calibration; as buffers they are saved with the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffusers_ptq.timestep import TimestepContext


class TimestepBiasTable(nn.Module):
    """A (G, C_out) table added to a quantized layer's output, looked up per sample by timestep group."""

    def __init__(self, context: TimestepContext, group_map: torch.Tensor, out_channels: int) -> None:
        super().__init__()
        self.context = context
        num_groups = int(group_map.max()) + 1
        self.register_buffer("group_map", group_map.clone().long())
        self.register_buffer("table", torch.zeros(num_groups, out_channels))
        self.enabled = True

    @property
    def num_groups(self) -> int:
        return self.table.shape[0]

    def groups_for(self, batch: int) -> torch.Tensor:
        """Group index of each of `batch` samples (a multiple of the UNet batch)."""
        return self.group_map[self.context.per_sample(batch)]

    def rows(self, batch: int) -> torch.Tensor:
        """(batch, C_out) fp32 correction of each sample."""
        return self.table[self.groups_for(batch)]

    def forward(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """`y` plus each sample's row; `channel_dim` is 1 for a conv (NCHW), -1 for a linear."""
        if not self.enabled:
            return y
        rows = self.rows(y.shape[0])
        shape = [1] * y.ndim
        shape[0], shape[channel_dim] = rows.shape[0], rows.shape[1]
        return (y.float() + rows.reshape(shape)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, channels={self.table.shape[1]}"


class OutputCorrection(nn.Module):
    """PTQD's correction of the noise prediction: eps = (eps_q - b[g]) / (1 + k[g]) per timestep group.

    `k` (G,) is the correlated part of the quantization noise (eps_q - eps ~ k eps + b), `b` (G, C) its
    per-channel mean; `residual_var` (G,) the variance left after removing both, stored for reports and
    for samplers that can absorb it (the UNet cannot: see docs/methods.md). Registered on the UNet as a
    submodule; `apply_output_correction` is the forward hook that runs it.
    """

    def __init__(self, context: TimestepContext, group_map: torch.Tensor, channels: int) -> None:
        super().__init__()
        self.context = context
        num_groups = int(group_map.max()) + 1
        self.register_buffer("group_map", group_map.clone().long())
        self.register_buffer("k", torch.zeros(num_groups))
        self.register_buffer("b", torch.zeros(num_groups, channels))
        self.register_buffer("residual_var", torch.zeros(num_groups))
        self.enabled = True

    @property
    def num_groups(self) -> int:
        return self.k.shape[0]

    def forward(self, eps_q: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return eps_q
        g = self.group_map[self.context.per_sample(eps_q.shape[0])]
        shape = (eps_q.shape[0], -1) + (1,) * (eps_q.ndim - 2)
        b = self.b[g].reshape(shape)
        k = self.k[g].reshape((-1,) + (1,) * (eps_q.ndim - 1))
        return ((eps_q.float() - b) / (1.0 + k)).to(eps_q.dtype)

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, channels={self.b.shape[1]}"


OUTPUT_CORRECTION_ATTR = "ptq_output_correction"


def apply_output_correction(module: nn.Module, args: tuple, output: Any) -> Any:
    """UNet forward hook: correct the noise prediction with the UNet's own `OutputCorrection`.

    A module-level function (no closure), so a deep copy of the UNet keeps a hook that reads the copy's
    submodule.
    """
    correction = getattr(module, OUTPUT_CORRECTION_ATTR, None)
    if not isinstance(correction, OutputCorrection) or not correction.enabled:
        return output
    if torch.is_tensor(output):
        return correction(output)
    if isinstance(output, tuple):
        return (correction(output[0]), *output[1:])
    output.sample = correction(output.sample)  # diffusers' UNet2DOutput / UNet2DConditionOutput
    return output
