"""Which reconstruction rows this rank caches, and the mini-batches every rank draws alike.

A reconstruction addresses its rows by position (0 .. rows - 1, the `select_rows` order), split once into
training and held-out positions. Under a torch.distributed group each rank caches only the positions it
owns: a contiguous share of the training positions and one of the held-out positions. Every rank draws the
same global mini-batch from one seeded generator and computes the loss of the rows it owns; gradients are
summed across ranks, so the optimiser sees the batch one process would (`trainer.py`).

Two batch samplers (`reconstruction.batch_sampling`):
- `random`: `batch_size` positions without replacement from all training positions (BRECQ's randperm).
  The ranks' shares of a batch vary from step to step (for 2 ranks and 32 rows, about 16 +- 3), and a step
  lasts as long as its largest share.
- `stratified`: the training positions are cut into `batch_size` contiguous strata and each batch takes
  one position from each. Rows are recorded trajectory by trajectory and step by step, so every batch
  spans the sampling schedule evenly. Ranks own whole strata, so every rank computes batch_size / world
  rows of every step.
With one process both are what they say; with N processes each gives the same batches as one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusers_ptq import distributed


def _shares(count: int, parts: int) -> list[range]:
    return distributed.split_evenly(count, parts, allow_empty=True)


@dataclass
class BatchSampler:
    """Global mini-batches (row positions) of one unit, identical on every rank for the same generator."""

    train: torch.Tensor  # sorted training positions
    batch_size: int
    mode: str = "random"

    def __post_init__(self) -> None:
        self.batch_size = min(self.batch_size, len(self.train))
        if self.mode == "stratified":
            strata = _shares(len(self.train), self.batch_size)
            self.starts = torch.tensor([s.start for s in strata])
            self.sizes = torch.tensor([len(s) for s in strata])

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        if self.mode == "stratified":
            u = torch.rand(self.batch_size, generator=generator, dtype=torch.float64)
            offsets = (u * self.sizes).long().clamp_(max=self.sizes - 1)
            return self.train[self.starts + offsets]
        return self.train[torch.randperm(len(self.train), generator=generator)[: self.batch_size]]


class RowShard:
    """The row positions one rank caches, and their indices in its cache."""

    def __init__(self, num_rows: int, owned: torch.Tensor) -> None:
        self.num_rows = num_rows
        self.owned = owned.sort().values
        self.local_of = torch.full((num_rows,), -1, dtype=torch.long)
        self.local_of[self.owned] = torch.arange(len(self.owned))
        self.world = distributed.world_size()

    @classmethod
    def whole(cls, num_rows: int) -> RowShard:
        return cls(num_rows, torch.arange(num_rows))

    @classmethod
    def plan(
        cls, num_rows: int, split: tuple[torch.Tensor, torch.Tensor], batch_size: int, mode: str
    ) -> RowShard:
        """This rank's rows: one process owns all; N ranks own contiguous shares of the training positions
        (whole strata with `stratified`) and of the held-out ones."""
        world = distributed.world_size()
        if world == 1:
            return cls.whole(num_rows)
        train, holdout = split
        me = distributed.rank()
        if mode == "stratified":
            strata = _shares(len(train), min(batch_size, len(train)))
            mine = _shares(len(strata), world)[me]
            first, last = (strata[mine.start].start, strata[mine.stop - 1].stop) if len(mine) else (0, 0)
        else:
            share = _shares(len(train), world)[me]
            first, last = share.start, share.stop
        held = _shares(len(holdout), world)[me]
        # With a single row it is both the training and the held-out row: one owner.
        owned = torch.unique(torch.cat([train[first:last], holdout[held.start : held.stop]]))
        return cls(num_rows, owned)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def local(self, positions: torch.Tensor) -> torch.Tensor:
        """Cache indices of the owned ones among `positions` (their order kept)."""
        local = self.local_of[positions]
        return local[local >= 0]
