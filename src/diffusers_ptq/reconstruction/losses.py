"""Reconstruction losses and schedules: lp output error, AdaRound's annealed regulariser, lr decay.

The output error is BRECQ's definition (docs/methods.md): |B_q - B_fp|^p summed over channels and
averaged over the batch (and over spatial positions / tokens). Channels are dim 1 of an NCHW feature map and
the last dim of (batch, tokens, channels) or (batch, channels) tensors. BRECQ's code sums dim 1 whatever it
holds, which for transformer outputs is the token axis; this only rescales the loss of those blocks.
"""

from __future__ import annotations

import math

import torch


def channel_dim(t: torch.Tensor) -> int:
    return 1 if t.ndim == 4 else t.ndim - 1


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """sum over channels of |pred - target|^p, averaged over everything else (float32)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    err = (pred.float() - target.float()).abs().pow(p)
    if err.ndim < 2:
        return err.mean()
    return err.sum(dim=channel_dim(err)).mean()


def output_loss(preds: list[torch.Tensor], targets: list[torch.Tensor], p: float) -> torch.Tensor:
    """Summed lp_loss over a unit's outputs (one for a block, one per time feature for the temporal block)."""
    if not preds:
        raise ValueError("a reconstruction unit produced no outputs")
    losses = [lp_loss(a, b, p) for a, b in zip(preds, targets, strict=True)]
    return losses[0] if len(losses) == 1 else torch.stack(losses).sum()


class BetaSchedule:
    """AdaRound's regulariser schedule (BRECQ's LinearTempDecay): off for the first `warmup` share of the
    iterations, then beta falls linearly from `start` to `end` over the rest."""

    def __init__(self, iterations: int, warmup: float, start: float, end: float) -> None:
        self.iterations = iterations
        self.warmup_steps = warmup * iterations
        self.start = start
        self.end = end

    def active(self, step: int) -> bool:
        """Whether the regulariser counts at (1-based) `step`."""
        return step >= self.warmup_steps

    def beta(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start
        span = max(self.iterations - self.warmup_steps, 1e-12)
        progress = (step - self.warmup_steps) / span
        return self.end + (self.start - self.end) * max(0.0, 1.0 - progress)


def lr_factor(schedule: str, step: int, iterations: int) -> float:
    """Multiplier of the base learning rate after `step` optimiser steps (cosine: decays to 0 at the end)."""
    if schedule == "constant" or iterations <= 0:
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, iterations) / iterations))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; valid: 'constant', 'cosine'")
