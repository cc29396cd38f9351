"""Activation statistics per timestep group: exact extremes plus a bounded random subsample.

The subsample feeds the range search without holding every activation of the calibration set; each
batch's share of the kept values is proportional to its number of values, so the subsample stays an
(approximately) uniform draw over everything observed.
"""

from __future__ import annotations

import torch


class GroupObserver:
    """Statistics of one activation quantizer, one slot per timestep group."""

    def __init__(self, num_groups: int, max_values: int, generator: torch.Generator | None = None) -> None:
        self.num_groups = num_groups
        self.max_values = max_values
        self.generator = generator
        self.lo = torch.full((num_groups,), float("inf"))
        self.hi = torch.full((num_groups,), float("-inf"))
        self.seen = torch.zeros(num_groups, dtype=torch.long)
        self.values: list[torch.Tensor | None] = [None] * num_groups

    def _draw(self, n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator)[:k]

    def update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        """Record `x` (leading dim = samples) whose samples belong to `groups` (one group index each)."""
        x = x.detach().float()
        groups = groups.to(x.device)
        for g in torch.unique(groups).tolist():
            rows = x[groups == g].reshape(-1).cpu()
            if rows.numel() == 0:
                continue
            self.lo[g] = torch.minimum(self.lo[g], rows.min())
            self.hi[g] = torch.maximum(self.hi[g], rows.max())
            n_old, n_new = int(self.seen[g]), rows.numel()
            total = n_old + n_new
            keep_new = min(n_new, max(1, round(self.max_values * n_new / total)))
            new = rows[self._draw(n_new, keep_new)]
            old = self.values[g]
            if old is not None:
                keep_old = min(old.numel(), self.max_values - keep_new)
                new = torch.cat([old[self._draw(old.numel(), keep_old)], new])
            self.values[g] = new
            self.seen[g] = total

    def has_nonfinite(self) -> bool:
        observed = self.seen > 0
        return bool((~torch.isfinite(self.lo[observed])).any() or (~torch.isfinite(self.hi[observed])).any())

    def empty_groups(self) -> list[int]:
        return [g for g in range(self.num_groups) if self.seen[g] == 0]
