"""Optimise one unit on its cache: AdaRound variables and/or activation step sizes, with Adam.

Loss = sum_outputs |B_q - B_fp|^p  (+ gamma * sum_inner |y_l^q - y_l^fp|^p, EDA-DM FBR)
       (+ lambda * sum (1 - |2h(V) - 1|^beta) after the warm-up, AdaRound).
Mini-batches (`shard.BatchSampler`) come from a generator seeded per (seed, phase, unit), so a unit trains
identically whether or not the run was interrupted before it. Under a torch.distributed group every rank
draws the same global batch, computes the loss of the rows it caches (`shard.RowShard`) weighted by their
share of the batch, and the gradients are summed across ranks before the optimiser steps
(`diffusers_ptq.gradsum`), so every rank takes the step one process would (up to float summation order).
QDrop masks are drawn per rank: the same distribution as one process's, not the same draws.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusers_ptq import distributed
from diffusers_ptq.gradsum import GradientSum
from diffusers_ptq.optim import adam
from diffusers_ptq.quantizers.adaround import AdaRoundQuantizer
from diffusers_ptq.reconstruction.cache import BlockCache, CacheBatch
from diffusers_ptq.reconstruction.config import ReconstructionConfig
from diffusers_ptq.reconstruction.losses import BetaSchedule, lp_loss, lr_factor, output_loss
from diffusers_ptq.reconstruction.lsq import (
    clamp_scales,
    disable_scale_learning,
    enable_scale_learning,
    qdrop,
)
from diffusers_ptq.reconstruction.rounding import wrap_layer
from diffusers_ptq.reconstruction.safeguard import StartingPoint, split_rows
from diffusers_ptq.reconstruction.shard import BatchSampler, RowShard

EVAL_ROWS = 64
PROBE_STEPS = 3
MAX_ROUNDING_LR = 1.0


@dataclass(frozen=True)
class Phase:
    """What one pass over the units optimises."""

    name: str  # "weights" | "acts" | "joint"
    learn_rounding: bool
    learn_scales: bool
    acts_on: bool
    loss_p: float
    qdrop_prob: float = 0.0


@dataclass
class TrainResult:
    iterations: int
    loss_before: float  # block loss on up to EVAL_ROWS training rows, hard rounding
    loss_after: float
    rounding_binary: float | None
    seconds: float  # the whole call
    train_seconds: float  # the optimisation steps alone
    status: str = "trained"  # "trained" (kept) | "reverted" (held-out loss not lower) | "skipped" (0 steps)
    holdout_before: float | None = None  # the same on the held-out rows: what decides kept / reverted
    holdout_after: float | None = None
    holdout_rows: int = 0
    exchange_seconds: float = 0.0  # of train_seconds, waiting for the ranks' gradient sums (process group)


def seeded(seed: int, *parts: object) -> int:
    """A stable 31-bit seed from `seed` and names (Python's str hash is salted per process)."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


class _Step:
    """One forward of the unit on a cached mini-batch and its loss terms."""

    def __init__(
        self,
        unet: nn.Module,
        cache: BlockCache,
        phase: Phase,
        gamma: float,
        device: torch.device | None,
        shard: RowShard,
    ) -> None:
        self.unet = unet
        self.cache = cache
        self.shard = shard
        self.unit = cache.unit
        self.phase = phase
        self.gamma = gamma
        param = next(unet.parameters())
        self.device, self.dtype = device or param.device, param.dtype
        self.context = unet.ptq_state.context

    def batch(self, index: torch.Tensor) -> CacheBatch:
        """The cached rows of cache indices `index`."""
        return self.cache.batch(index, self.device, self.dtype)

    def losses(self, batch: CacheBatch, inner: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(output loss, output loss + gamma * inner-layer losses)."""
        with self.context.use(batch.timesteps):
            outputs, inner_out = self.unit.run(self.unet, batch.args, batch.kwargs, inner=inner)
        out_loss = output_loss(outputs, batch.targets, self.phase.loss_p)
        total = out_loss
        if inner and self.gamma > 0:
            for name, target in batch.inner.items():
                total = total + self.gamma * lp_loss(inner_out[name], target, self.phase.loss_p)
        return out_loss, total

    @torch.no_grad()
    def evaluate(self, rows: torch.Tensor, chunk: int) -> float:
        """Output loss over the row positions `rows` with hard rounding and no QDrop (the unit as it will be
        deployed); each rank sums the rows it caches, the ranks add their sums."""
        local = self.shard.local(rows)
        total, error = 0.0, None
        try:
            for start in range(0, len(local), chunk):
                index = local[start : start + chunk]
                out_loss, _ = self.losses(self.batch(index), inner=False)
                total += float(out_loss) * len(index)
        except Exception as err:
            if not self.shard.sharded:
                raise
            error = err
        if self.shard.sharded:
            summed = torch.tensor([total])
            distributed.all_reduce_sum([summed], f"reconstruction: evaluating {self.unit.name}", error)
            total = float(summed)
        return total / max(len(rows), 1)


def _set_mode(quantizers: list[AdaRoundQuantizer], mode: str) -> None:
    for q in quantizers:
        q.set_mode(mode)


def train_unit(
    unet: nn.Module,
    cache: BlockCache,
    phase: Phase,
    config: ReconstructionConfig,
    iterations: int | Callable[[float], int],
    *,
    configured: int | None = None,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
    desc: str = "",
    progress: bool = True,
    device: torch.device | None = None,
    shard: RowShard | None = None,
) -> TrainResult:
    """Optimise `cache.unit` for `iterations` steps (or as many as the callback allows given the measured
    seconds per step), then keep the result only if the held-out block loss went down (`safeguard.py`).
    `split` is (training rows, held-out rows) of the cache; None: `config.holdout` of them, seeded.

    Every schedule (warm-up, beta, learning-rate decay) spans the iterations actually run. When they are
    fewer than `configured` (the pass's configured iterations, cut by a time budget), the AdaRound learning
    rate is raised (`rounding_lr`). Step-size learning rates are not (an Adam step moves a step size by
    about its learning rate in absolute units). With zero iterations the unit is not started. AdaRound
    roundings are frozen and step sizes fixed on return. `device`: where the unit's modules are and its
    mini-batches go (CPU offload moves only the unit there); None: the UNet's device. `shard`: the row
    positions this rank caches (None: one process, the cache holds every row).
    """
    start_time = time.perf_counter()
    unit = cache.unit
    layers = [unet.get_submodule(name) for name in unit.layers] if phase.learn_rounding else []
    scales_owned = [unet.get_submodule(n) for n in unit.act_quantizers] if phase.learn_scales else []
    start = StartingPoint(layers, scales_owned)
    shard = RowShard.whole(len(cache)) if shard is None else shard
    step = _Step(unet, cache, phase, config.layer_loss_weight, device, shard)
    inner = config.layer_loss_weight > 0 and bool(unit.inner_layers)
    n = shard.num_rows
    if split is None:
        split = split_rows(n, config.holdout, torch.Generator().manual_seed(seeded(config.seed, "holdout")))
    train_rows, holdout = split
    sampler = BatchSampler(train_rows, config.batch_size, config.batch_sampling)
    drop = unit.executed_act_quantizers(unet) if phase.qdrop_prob > 0 else []

    eval_gen = torch.Generator().manual_seed(seeded(config.seed, "eval", unit.name))
    eval_rows = train_rows[torch.randperm(len(train_rows), generator=eval_gen)[:EVAL_ROWS]]
    chunk = config.cache_batch_size
    # The starting point, measured before any wrapping: what a reverted unit goes back to.
    loss_before, holdout_before = step.evaluate(eval_rows, chunk), step.evaluate(holdout, chunk)
    rounding: list[AdaRoundQuantizer] = [q for layer in layers for q in wrap_layer(layer)]
    groups = [
        {
            "params": [q.v for q in rounding],
            "lr": config.weight_lr,
            "schedule": config.weight_lr_schedule,
            "rounding": True,
        },
        {
            "params": enable_scale_learning(scales_owned),
            "lr": config.act_lr,
            "schedule": config.act_lr_schedule,
        },
    ]
    groups = [g for g in groups if g["params"]]
    kept = False
    binary = None
    loss_after, holdout_after = loss_before, holdout_before
    train_seconds = exchange_seconds = 0.0
    try:
        loop = _Loop(step, config, phase, rounding, scales_owned, drop, sampler, inner)
        if callable(iterations):
            iterations = iterations(_probe(loop, groups))
        if not groups:
            iterations = 0
        configured = iterations if configured is None else configured
        if iterations > 0:
            base_lrs = [
                rounding_lr(g["lr"], iterations, configured) if g.get("rounding") else g["lr"] for g in groups
            ]
            loop_start = time.perf_counter()
            loop.run(
                iterations,
                groups,
                base_lrs,
                torch.Generator().manual_seed(seeded(config.seed, phase.name, unit.name)),
                torch.Generator(device=step.device).manual_seed(seeded(config.seed, "qdrop", unit.name)),
                desc,
                progress,
            )
            train_seconds = time.perf_counter() - loop_start
            exchange_seconds = loop.gradients.seconds if loop.gradients is not None else 0.0
            if rounding:
                fractions = [(q.binary_fraction(), q.v.numel()) for q in rounding]
                binary = sum(f * k for f, k in fractions) / sum(k for _, k in fractions)
            _set_mode(rounding, "hard")
            loss_after, holdout_after = step.evaluate(eval_rows, chunk), step.evaluate(holdout, chunk)
            kept = holdout_after < holdout_before
    finally:
        for q in rounding:
            q.freeze()
        disable_scale_learning(scales_owned)
        if not kept:
            start.restore()
    status = "trained" if kept else ("reverted" if iterations > 0 else "skipped")
    return TrainResult(
        iterations=iterations,
        loss_before=loss_before,
        loss_after=loss_after,
        rounding_binary=binary,
        seconds=time.perf_counter() - start_time,
        train_seconds=train_seconds,
        status=status,
        holdout_before=holdout_before,
        holdout_after=holdout_after,
        holdout_rows=len(holdout),
        exchange_seconds=exchange_seconds,
    )


def rounding_lr(lr: float, iterations: int, configured: int) -> float:
    """AdaRound learning rate of a schedule of `iterations` steps cut from `configured`.

    An Adam step moves V by about the learning rate, so the product iterations x lr is how far V can travel
    towards binary rounding; it is kept at the configured schedule's, with each step at most MAX_ROUNDING_LR
    (h(V) is binary beyond |V| = ln 11 = 2.4: a larger step jumps across the whole soft range).
    """
    if iterations <= 0 or configured <= iterations:
        return lr
    return max(lr, min(lr * configured / iterations, MAX_ROUNDING_LR))


class _Loop:
    """The optimisation steps of one unit (shared by the timing probe and the real run)."""

    def __init__(
        self,
        step: _Step,
        config: ReconstructionConfig,
        phase: Phase,
        rounding: list[AdaRoundQuantizer],
        scales: list,
        drop: list,
        sampler: BatchSampler,
        inner: bool,
    ) -> None:
        self.step, self.config, self.phase = step, config, phase
        self.rounding, self.scales, self.drop = rounding, scales, drop
        self.sampler, self.inner = sampler, inner
        self.regularise = phase.learn_rounding and config.round_weight > 0
        self.shard = step.shard
        # The regulariser depends on V alone: each rank adds the gradient of its contiguous part of every V,
        # so the sum over ranks holds each element's once and the ranks share that work evenly.
        self.reg_parts = [
            distributed.own_share(q.v.numel(), allow_empty=True) if self.shard.sharded else None
            for q in (rounding if self.regularise else [])
        ]
        self.gradients: GradientSum | None = None  # set by `bind` under a process group

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Sum the gradients of `optimizer`'s tensors over the ranks from now on (sharded rows only)."""
        if self.shard.sharded:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.gradients = GradientSum(params, f"reconstruction: training {self.step.unit.name}")

    def one(
        self,
        optimizer: torch.optim.Optimizer,
        gen: torch.Generator,
        drop_gen: torch.Generator,
        beta: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        index = self.sampler.draw(gen)
        zero = torch.zeros((), device=self.step.device)
        out_loss, loss, reg = zero, zero, None
        optimizer.zero_grad(set_to_none=True)
        error = None
        try:
            local = self.shard.local(index)
            if len(local):
                with qdrop(self.drop, self.phase.qdrop_prob, drop_gen):
                    out_loss, loss = self.step.losses(self.step.batch(local), self.inner)
                if self.shard.sharded:  # this rank's rows' share of the global batch mean
                    loss = loss * (len(local) / len(index))
            if beta is not None:
                parts = zip(self.rounding, self.reg_parts)
                reg = self.config.round_weight * sum(q.regulariser(beta, part) for q, part in parts)
                loss = loss + reg
            if loss.requires_grad:
                loss.backward()
        except Exception as err:
            if self.gradients is None:
                raise
            error = err
        if self.gradients is not None:
            self.gradients.step(error)
        optimizer.step()
        clamp_scales(self.scales)
        return out_loss, loss, reg

    @torch.no_grad()
    def regulariser(self, beta: float) -> float:
        """The whole weighted regulariser (every element of every V), for display."""
        return self.config.round_weight * float(sum(q.regulariser(beta) for q in self.rounding))

    def run(
        self,
        iterations: int,
        groups: list[dict],
        base_lrs: list[float],
        gen: torch.Generator,
        drop_gen: torch.Generator,
        desc: str,
        progress: bool,
    ) -> None:
        config = self.config
        optimizer = adam([{"params": g["params"], "lr": lr} for g, lr in zip(groups, base_lrs)])
        self.bind(optimizer)
        schedules = [g["schedule"] for g in groups]
        beta = BetaSchedule(iterations, config.warmup, config.beta_start, config.beta_end)
        every = max(1, iterations // 100)
        bar = tqdm(range(iterations), desc=desc, unit="it", leave=False, disable=not progress)
        for it in bar:
            b = beta.beta(it + 1) if self.regularise and beta.active(it + 1) else None
            out_loss, loss, reg = self.one(optimizer, gen, drop_gen, b)
            for group, schedule, base in zip(optimizer.param_groups, schedules, base_lrs):
                group["lr"] = base * lr_factor(schedule, it + 1, iterations)
            if it % every == 0 or it == iterations - 1:
                postfix = {"loss": f"{float(loss.detach()):.4g}", "rec": f"{float(out_loss.detach()):.4g}"}
                if reg is not None:  # this rank's part of it under a process group: the whole for display
                    postfix["round"] = f"{self.regulariser(b):.4g}"
                bar.set_postfix(postfix)  # at most ~100 refreshes per unit
        bar.close()


def _probe(loop: _Loop, groups: list[dict]) -> float:
    """Seconds per optimiser step, timed on PROBE_STEPS real steps (optimiser and regulariser included)
    from which every trained tensor is then put back, so nothing changes."""
    tensors = [p for g in groups for p in g["params"]]
    if not tensors:
        return 0.0
    saved = [t.detach().clone() for t in tensors]
    optimizer = adam([{"params": g["params"], "lr": g["lr"]} for g in groups])
    loop.bind(optimizer)
    gen = torch.Generator().manual_seed(0)
    drop_gen = torch.Generator(device=loop.step.device).manual_seed(0)
    beta = loop.config.beta_start if loop.regularise else None
    seconds = []
    try:
        for _ in range(PROBE_STEPS):
            started = time.perf_counter()
            loop.one(optimizer, gen, drop_gen, beta)
            if loop.step.device.type == "cuda":
                torch.cuda.synchronize(loop.step.device)
            seconds.append(time.perf_counter() - started)
    finally:
        with torch.no_grad():
            for t, value in zip(tensors, saved):
                t.copy_(value)
                t.grad = None
    # Every rank must run the same number of steps: the slowest rank's time decides.
    return max(distributed.exchange("reconstruction: step timing", sorted(seconds)[len(seconds) // 2]))
