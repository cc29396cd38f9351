"""Per-timestep-group, per-channel sums over calibration samples: the statistics both corrections fit."""

from __future__ import annotations

import torch

from diffusers_ptq import distributed


def channel_rows(y: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, int]:
    """(rows, C) float64 view of `y` summed over everything but its leading and channel dims, and the number
    of elements each row's channel sum covers. `channel_dim` is 1 (NCHW) or -1 (channels last)."""
    y = y.detach().double()
    if channel_dim == 1:
        rows = y.reshape(y.shape[0], y.shape[1], -1)
        return rows, rows.shape[-1]
    rows = y.reshape(y.shape[0], -1, y.shape[-1]).transpose(1, 2)
    return rows, rows.shape[-1]


class GroupChannelSums:
    """Sums over samples (and spatial positions) of tensors per timestep group and channel, in float64.

    `add(name, y, groups)` accumulates Σy for each named quantity; `counts` holds, per group, how many
    elements each channel's sum covers (the same for every quantity added with the same tensors).
    """

    def __init__(self, num_groups: int, channels: int, device: torch.device) -> None:
        self.num_groups, self.channels, self.device = num_groups, channels, device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(num_groups, dtype=torch.float64, device=device)

    def add(self, name: str, rows: torch.Tensor, groups: torch.Tensor) -> None:
        """Add (B, C, n) float64 `rows` into group `groups[i]` of quantity `name` (no count update)."""
        total = self.sums.get(name)
        if total is None:
            total = self.sums[name] = torch.zeros(
                self.num_groups, self.channels, dtype=torch.float64, device=self.device
            )
        total.index_add_(0, groups.to(self.device), rows.sum(dim=-1).to(self.device))

    def count(self, groups: torch.Tensor, per_row: int) -> None:
        """Count `per_row` elements per channel for each sample of `groups`."""
        ones = torch.full((groups.shape[0],), float(per_row), dtype=torch.float64, device=self.device)
        self.counts.index_add_(0, groups.to(self.device), ones)

    def mean(self, name: str) -> torch.Tensor:
        """(G, C) mean of quantity `name`; 0 for groups without samples."""
        return self.sums[name] / self.counts.clamp_min(1.0)[:, None]

    def empty_groups(self) -> list[int]:
        return [g for g in range(self.num_groups) if self.counts[g] == 0]


def all_reduce(
    stats: list[GroupChannelSums],
    names: tuple[str, ...],
    stage: str,
    error: BaseException | None = None,
    counts: bool = True,
) -> None:
    """Sum the quantities `names` (and `counts`) of each of `stats` over every rank's samples (float64,
    one collective).

    A rank whose local pass raised passes its `error` and every rank raises it (see
    `distributed.all_reduce_sum`); a quantity a rank never added counts as zero there. No-op in one process
    (or raises `error`).
    """
    tensors = []
    for s in stats:
        for name in names:
            if name not in s.sums:
                s.sums[name] = torch.zeros(s.num_groups, s.channels, dtype=torch.float64, device=s.device)
        tensors += [*([s.counts] if counts else []), *(s.sums[name] for name in names)]
    distributed.all_reduce_sum(tensors, stage, error, torch.float64)
