"""The gradient exchange of a data-parallel training step (one collective per step).

Each rank's loss covers its rows of the global mini-batch; the sum of the ranks' gradients is the
gradient of the global batch. The AdaRound regulariser depends on V alone, which is the same on every
rank, so every rank computes its gradient locally while the sum of the data gradients is in flight and
adds it afterwards: the ranks do equal work (no rank waits for another's extra backward), and the
collective's latency is hidden behind that backward.

A failure in the overlapped part is reported at the next collective (the next step's, or `finish` at the
end of the loop, which every rank calls), so every rank raises it.
"""

from __future__ import annotations

import torch

from diffusers_ptq import distributed


class GradientSum:
    """Sums `params`' gradients over the ranks; `stage` names the collective in errors."""

    def __init__(self, params: list[torch.Tensor], stage: str) -> None:
        self.params = params
        self.stage = stage
        self.deferred: BaseException | None = None

    def step(
        self,
        error: BaseException | None,
        regulariser: torch.Tensor | None = None,
        regularised: list[torch.Tensor] | None = None,
    ) -> None:
        """Sum the data gradients (a tensor no rank has a gradient for keeps none, so Adam skips it as one
        process would), then add the gradient of `regulariser` with respect to `regularised`."""
        params = self.params
        has = torch.tensor([float(p.grad is not None) for p in params])
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        reported, self.deferred = error or self.deferred, None
        pending = distributed.start_sum([*(p.grad for p in params), has], self.stage, reported)
        extra: tuple[torch.Tensor | None, ...] = ()
        if regulariser is not None and reported is None and regulariser.requires_grad:
            try:
                extra = torch.autograd.grad(regulariser, regularised or [], allow_unused=True)
            except Exception as err:  # reported by every rank at the next collective
                self.deferred = err
        pending.wait()
        for p, present in zip(params, has.tolist()):
            if present == 0:
                p.grad = None
        for p, grad in zip(regularised or [], extra):
            if grad is not None:
                p.grad = grad if p.grad is None else p.grad.add_(grad)

    def finish(self) -> None:
        """Raise, on every rank, a failure left from the last step (every rank must call this)."""
        reported, self.deferred = self.deferred, None
        distributed.all_reduce_sum([], self.stage, reported)
