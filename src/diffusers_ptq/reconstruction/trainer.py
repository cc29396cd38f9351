"""Optimise one unit on its cache: AdaRound variables and/or activation step sizes, with Adam.

Loss = sum_outputs |B_q - B_fp|^p  (+ gamma * sum_inner |y_l^q - y_l^fp|^p, EDA-DM FBR)
       (+ lambda * sum (1 - |2h(V) - 1|^beta) after the warm-up, AdaRound).
Mini-batches are drawn without replacement within a batch (BRECQ's randperm) from a generator seeded per
(seed, phase, unit), so a unit trains identically whether or not the run was interrupted before it.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

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

EVAL_ROWS = 64
PROBE_STEPS = 2


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
    loss_before: float
    loss_after: float
    rounding_binary: float | None
    seconds: float  # the whole call
    train_seconds: float  # the optimisation steps alone


def seeded(seed: int, *parts: object) -> int:
    """A stable 31-bit seed from `seed` and names (Python's str hash is salted per process)."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


class _Step:
    """One forward of the unit on a cached mini-batch and its loss terms."""

    def __init__(self, unet: nn.Module, cache: BlockCache, phase: Phase, gamma: float) -> None:
        self.unet = unet
        self.cache = cache
        self.unit = cache.unit
        self.phase = phase
        self.gamma = gamma
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.context = unet.ptq_state.context

    def batch(self, index: torch.Tensor) -> CacheBatch:
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
        """Output loss over `rows` with hard rounding and no QDrop (the unit as it will be deployed)."""
        total = 0.0
        for start in range(0, len(rows), chunk):
            index = rows[start : start + chunk]
            out_loss, _ = self.losses(self.batch(index), inner=False)
            total += float(out_loss) * len(index)
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
    desc: str = "",
    progress: bool = True,
) -> TrainResult:
    """Optimise `cache.unit` for `iterations` steps (or as many as the callback allows given the measured
    seconds per step); AdaRound roundings are frozen and step sizes fixed when it returns."""
    start_time = time.perf_counter()
    unit = cache.unit
    rounding: list[AdaRoundQuantizer] = []
    if phase.learn_rounding:
        for name in unit.layers:
            rounding += wrap_layer(unet.get_submodule(name))
    scales_owned = [unet.get_submodule(n) for n in unit.act_quantizers] if phase.learn_scales else []
    step = _Step(unet, cache, phase, config.layer_loss_weight)
    inner = config.layer_loss_weight > 0 and bool(unit.inner_layers)
    n = len(cache)
    eval_gen = torch.Generator().manual_seed(seeded(config.seed, "eval", unit.name))
    eval_rows = torch.randperm(n, generator=eval_gen)[: min(EVAL_ROWS, n)]
    batch_size = min(config.batch_size, n)
    drop = unit.executed_act_quantizers(unet) if phase.qdrop_prob > 0 else []

    _set_mode(rounding, "hard")
    loss_before = step.evaluate(eval_rows, config.cache_batch_size)
    _set_mode(rounding, "soft")
    params = [
        {"params": [q.v for q in rounding], "lr": config.weight_lr, "schedule": config.weight_lr_schedule},
        {
            "params": enable_scale_learning(scales_owned),
            "lr": config.act_lr,
            "schedule": config.act_lr_schedule,
        },
    ]
    params = [g for g in params if g["params"]]
    try:
        if callable(iterations):
            iterations = iterations(_probe(step, n, batch_size, inner, params))
        if not params:
            iterations = 0
        gen = torch.Generator().manual_seed(seeded(config.seed, phase.name, unit.name))
        drop_gen = torch.Generator(device=step.device).manual_seed(seeded(config.seed, "qdrop", unit.name))
        optimizer = (
            torch.optim.Adam([{"params": g["params"], "lr": g["lr"]} for g in params]) if params else None
        )
        schedules = [g["schedule"] for g in params]
        beta = BetaSchedule(iterations, config.warmup, config.beta_start, config.beta_end)
        regularise = phase.learn_rounding and config.round_weight > 0
        every = max(1, iterations // 100)
        loop_start = time.perf_counter()
        bar = tqdm(range(iterations), desc=desc, unit="it", leave=False, disable=not progress)
        for it in bar:
            index = torch.randperm(n, generator=gen)[:batch_size]
            with qdrop(drop, phase.qdrop_prob, drop_gen):
                out_loss, loss = step.losses(step.batch(index), inner)
            reg = None
            if regularise and beta.active(it + 1):
                b = beta.beta(it + 1)
                reg = config.round_weight * sum(q.regulariser(b) for q in rounding)
                loss = loss + reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clamp_scales(scales_owned)
            for group, schedule, base in zip(optimizer.param_groups, schedules, [g["lr"] for g in params]):
                group["lr"] = base * lr_factor(schedule, it + 1, iterations)
            if it % every == 0 or it == iterations - 1:
                postfix = {"loss": f"{float(loss.detach()):.4g}", "rec": f"{float(out_loss.detach()):.4g}"}
                if reg is not None:
                    postfix["round"] = f"{float(reg.detach()):.4g}"
                bar.set_postfix(postfix)  # at most ~100 refreshes per unit
        bar.close()
        train_seconds = time.perf_counter() - loop_start
        binary = None
        if rounding:
            fractions = [(q.binary_fraction(), q.v.numel()) for q in rounding]
            binary = sum(f * k for f, k in fractions) / sum(k for _, k in fractions)
        _set_mode(rounding, "hard")
        loss_after = step.evaluate(eval_rows, config.cache_batch_size)
    finally:
        for q in rounding:
            q.freeze()
        disable_scale_learning(scales_owned)
    return TrainResult(
        iterations=iterations,
        loss_before=loss_before,
        loss_after=loss_after,
        rounding_binary=binary,
        seconds=time.perf_counter() - start_time,
        train_seconds=train_seconds,
    )


def _probe(step: _Step, n: int, batch_size: int, inner: bool, params: list[dict]) -> float:
    """Seconds per optimiser step, timed on forward + backward without stepping (nothing changes)."""
    tensors = [p for g in params for p in g["params"]]
    gen = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(PROBE_STEPS):
        started = time.perf_counter()
        _, loss = step.losses(step.batch(torch.randperm(n, generator=gen)[:batch_size]), inner)
        if loss.requires_grad:
            loss.backward()
        if step.device.type == "cuda":
            torch.cuda.synchronize(step.device)
        seconds.append(time.perf_counter() - started)
    for t in tensors:
        t.grad = None
    return min(seconds)
