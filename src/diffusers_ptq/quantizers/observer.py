"""Activation statistics per timestep group: exact extremes plus a bounded uniform subsample.

The subsample feeds the range search without holding every activation of the calibration set. Every
observed value gets a pseudo-random 62-bit key drawn from its identity (calibration row, position in the
row's activation), salted per quantizer and seed; a group keeps the `max_values` values of smallest key, in
key order. That is a uniform draw without replacement over everything observed, and it does not depend on
the order or the split of the batches: observers of disjoint row shares (one per rank) merge into exactly
the subsample one process keeps (`merge_observers`).
"""

from __future__ import annotations

import zlib

import torch

from diffusers_ptq import distributed

_KEY_HIGH = 1 << 62
_SEED_MOD = 1 << 63


def element_keys(lead_ids: torch.Tensor, per: int, salt: int) -> torch.Tensor:
    """(len(lead_ids), per) int64 keys, uniform in [0, 2^62): row e's keys are the first `per` draws of a
    generator seeded by (salt, lead_ids[e]), so they depend on the element's identity alone."""
    keys = torch.empty(len(lead_ids), per, dtype=torch.long)
    generator = torch.Generator()
    for row, lead in zip(keys, lead_ids.tolist()):
        generator.manual_seed((salt * 0x9E3779B97F4A7C15 + (lead + 1) * 0xBF58476D1CE4E5B9) % _SEED_MOD)
        torch.randint(0, _KEY_HIGH, (per,), generator=generator, out=row)
    return keys


def observer_salt(seed: int, name: str) -> int:
    """The salt of one quantizer's keys: independent draws per quantizer, reproducible per seed."""
    return zlib.crc32(f"{seed}/{name}".encode()) & 0x7FFFFFFF


def _smallest(values: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (at most) `k` entries of smallest key, sorted by key."""
    if keys.numel() > k:
        index = torch.topk(keys, k, largest=False, sorted=False).indices
        values, keys = values[index], keys[index]
    order = torch.argsort(keys)
    return values[order], keys[order]


class GroupObserver:
    """Statistics of one activation quantizer, one slot per timestep group.

    `salt` seeds the keys (see `observer_salt`); `generator`, when given without a salt, is only read for its
    seed.
    """

    def __init__(
        self,
        num_groups: int,
        max_values: int,
        generator: torch.Generator | None = None,
        salt: int | None = None,
    ) -> None:
        self.num_groups = num_groups
        self.max_values = max_values
        if salt is None:
            salt = generator.initial_seed() if generator is not None else 0
        self.salt = int(salt)
        self.lo = torch.full((num_groups,), float("inf"))
        self.hi = torch.full((num_groups,), float("-inf"))
        self.seen = torch.zeros(num_groups, dtype=torch.long)
        self.values: list[torch.Tensor | None] = [None] * num_groups
        self.keys: list[torch.Tensor | None] = [None] * num_groups
        self.next_id = 0  # identities of leading elements when the caller gives none

    def update(self, x: torch.Tensor, groups: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Record `x` (leading dim = samples) whose samples belong to `groups` (one group index each).

        `ids`: one distinct non-negative integer per leading element, the same whoever observes it (the
        calibration row it comes from); None numbers them in the order this observer sees them.
        """
        x = x.detach().float().cpu()
        lead, per = x.shape[0], x[0].numel() if x.ndim > 1 else 1
        if ids is None:
            ids = torch.arange(self.next_id, self.next_id + lead)
            self.next_id += lead
        keys = element_keys(ids.cpu().long(), per, self.salt).reshape(x.shape)
        groups = groups.cpu()
        for g in torch.unique(groups).tolist():
            mask = groups == g
            rows, row_keys = x[mask].reshape(-1), keys[mask].reshape(-1)
            if rows.numel() == 0:
                continue
            self.lo[g] = torch.minimum(self.lo[g], rows.min())
            self.hi[g] = torch.maximum(self.hi[g], rows.max())
            self.seen[g] += rows.numel()
            kept = self.keys[g]
            if kept is not None and kept.numel() == self.max_values:  # only keys below the largest kept
                below = row_keys < kept[-1]
                rows, row_keys = rows[below], row_keys[below]
            self._keep(g, *_smallest(rows, row_keys, self.max_values))

    def _keep(self, g: int, values: torch.Tensor, keys: torch.Tensor) -> None:
        if self.values[g] is not None:
            values = torch.cat([self.values[g], values])
            keys = torch.cat([self.keys[g], keys])
        self.values[g], self.keys[g] = _smallest(values, keys, self.max_values)

    def has_nonfinite(self) -> bool:
        observed = self.seen > 0
        return bool((~torch.isfinite(self.lo[observed])).any() or (~torch.isfinite(self.hi[observed])).any())

    def empty_groups(self) -> list[int]:
        return [g for g in range(self.num_groups) if self.seen[g] == 0]


def merge_observers(observers: list[GroupObserver]) -> None:
    """Merge every rank's statistics into each of `observers`, in place, alike on every rank.

    Each rank observed its own share of the calibration rows (with row identities, see `update`): extremes
    and counts add up exactly, and the values of smallest key over all ranks are the subsample one process
    keeps. Without a process group nothing changes.
    """
    if not distributed.is_initialized():
        return
    mine = [(o.lo, o.hi, o.seen, o.values, o.keys) for o in observers]
    every = distributed.exchange("activation statistics", mine)
    for i, obs in enumerate(observers):
        parts = [rank_stats[i] for rank_stats in every]
        obs.lo = torch.stack([p[0] for p in parts]).amin(dim=0)
        obs.hi = torch.stack([p[1] for p in parts]).amax(dim=0)
        obs.seen = torch.stack([p[2] for p in parts]).sum(dim=0)
        obs.values, obs.keys = [None] * obs.num_groups, [None] * obs.num_groups
        for part in parts:
            for g in range(obs.num_groups):
                if part[3][g] is not None:
                    obs._keep(g, part[3][g], part[4][g])
