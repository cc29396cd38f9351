"""The gradient exchange of a data-parallel training step (block reconstruction, the group search).

Each rank's loss covers its rows of the global mini-batch, weighted by their share of it, so the sum of the
ranks' gradients is the gradient of the global batch: one collective per step, with a failure flag.
"""

from __future__ import annotations

import time

import torch

from diffusers_ptq import distributed


class GradientSum:
    """Sums `params`' gradients over the ranks; `stage` names the collective in errors."""

    def __init__(self, params: list[torch.Tensor], stage: str) -> None:
        self.params = params
        self.stage = stage
        self.seconds = 0.0  # spent in the exchange (waiting for the slowest rank included)

    def step(self, error: BaseException | None, also: tuple[torch.Tensor, ...] = ()) -> None:
        """Sum the gradients and the tensors `also` in place. A tensor no rank has a gradient for keeps
        none, so Adam skips it as one process would. `error`: this rank's failure, raised on every rank."""
        started = time.perf_counter()
        params = self.params
        has = torch.tensor([float(p.grad is not None) for p in params])
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.all_reduce_sum([*(p.grad for p in params), has, *also], self.stage, error)
        for p, present in zip(params, has.tolist()):
            if present == 0:
                p.grad = None
        self.seconds += time.perf_counter() - started
