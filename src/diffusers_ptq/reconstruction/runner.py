"""`reconstruct`: block reconstruction of a UNet quantized by `quantize_pipeline` / `quantize_unet`.

Passes ('sequential': AdaRound over every unit with activations float, then step sizes over every unit;
'joint': both at once) visit the units in execution order. For each unit: cache its inputs from the model
as quantized so far and its targets from the float model, optimise, freeze, and (with `checkpoint_dir`)
record what it learned. At the end the AdaRound codes are baked into the weights. If anything fails the
UNet is restored to exactly what it was; finished units stay in the checkpoint for the next call.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from diffusers_ptq import distributed
from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.reconstruction.blocks import reconstruction_units
from diffusers_ptq.reconstruction.budget import Budget
from diffusers_ptq.reconstruction.cache import build_cache
from diffusers_ptq.reconstruction.checkpoint import (
    ResumeCheckpoint,
    calibration_fingerprint,
    model_fingerprint,
    run_identity,
)
from diffusers_ptq.reconstruction.config import ReconstructionConfig
from diffusers_ptq.reconstruction.inputs import check_inputs
from diffusers_ptq.reconstruction.memory import estimate_cache_bytes, offloaded, peak_memory, unit_on
from diffusers_ptq.reconstruction.report import ReconstructionReport, UnitReport
from diffusers_ptq.reconstruction.rounding import bake_layers, wrapped_layers
from diffusers_ptq.reconstruction.safeguard import holdout_error, split_rows
from diffusers_ptq.reconstruction.sampling import SamplingCheck, judge_samples, note_before
from diffusers_ptq.reconstruction.shard import RowShard
from diffusers_ptq.reconstruction.spill import CacheStore, check_cache_dir
from diffusers_ptq.reconstruction.state import SavedState, learned_tensors, restore_learned
from diffusers_ptq.reconstruction.trainer import Phase, seeded, train_unit
from diffusers_ptq.reconstruction.units import Unit

logger = logging.getLogger("diffusers_ptq")


def plan_phases(config: ReconstructionConfig) -> list[Phase]:
    """The passes over the units that `config` asks for."""
    if config.optimization == "joint":
        joint = Phase(
            name="joint",
            learn_rounding=config.learns_rounding,
            learn_scales=config.learn_act_scales,
            acts_on=True,
            loss_p=config.loss_p,
            qdrop_prob=config.qdrop_prob,
        )
        return [joint]
    # A pass of zero iterations is no pass: its units would be cached for nothing.
    phases = []
    if config.learns_rounding and config.iterations > 0:  # BRECQ / Q-Diffusion: rounding first, acts float
        phases.append(
            Phase(
                name="weights", learn_rounding=True, learn_scales=False, acts_on=False, loss_p=config.loss_p
            )
        )
    if config.learn_act_scales and config.act_iterations > 0:
        phases.append(
            Phase(
                name="acts",
                learn_rounding=False,
                learn_scales=True,
                acts_on=True,
                loss_p=config.act_loss_p,
                qdrop_prob=config.qdrop_prob,
            )
        )
    return phases


def _applies(phase: Phase, unit: Unit) -> bool:
    return (phase.learn_rounding and bool(unit.layers)) or (phase.learn_scales and bool(unit.act_quantizers))


def select_rows(num_rows: int, config: ReconstructionConfig) -> torch.Tensor:
    """Calibration rows used: all, or a seeded random subset of `num_samples` (kept in recording order)."""
    if config.num_samples is None or config.num_samples >= num_rows:
        return torch.arange(num_rows)
    gen = torch.Generator().manual_seed(seeded(config.seed, "rows"))
    return torch.randperm(num_rows, generator=gen)[: config.num_samples].sort().values


def reconstruct(
    unet: nn.Module,
    calibration_set: CalibrationSet,
    config: ReconstructionConfig | None = None,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    sampling_check: SamplingCheck | None = None,
) -> ReconstructionReport:
    """Reconstruct a quantized `unet` block by block on `calibration_set` (in place) and report it.

    `unet` must be quantized by `quantize_pipeline` / `quantize_unet` and still hold its float weights.
    AdaRound codes are baked into the weights at the end, so save/load stores plain integers. With
    `checkpoint_dir`, every finished unit is saved there and a later call with the same model, calibration
    rows and config resumes after the last finished unit (`max_minutes` may differ). Memory: with
    `config.offload='cpu'` only the unit being trained is on the accelerator; a unit cache estimated above
    `config.cache_max_gb` is spilled to disk (`memory.py`, `spill.py`).

    Under an initialised torch.distributed group, call it on every rank with the same arguments: each rank
    caches its share of the rows and gradients are summed across ranks every step (`shard.py`); only
    rank 0 writes the checkpoint, which every rank must be able to read to resume. With `sampling_check`
    (`sampling.py`) the whole run is also judged on the pipeline's sampled outputs, and undone if worse.
    """
    config = check_inputs(unet, calibration_set, config)
    started = time.perf_counter()
    rows = select_rows(len(calibration_set), config)
    units = reconstruction_units(unet, config, calibration_set)
    phases = plan_phases(config)
    steps = [(phase, unit) for phase in phases for unit in units if _applies(phase, unit)]
    if not steps:
        raise ValueError(
            "nothing to reconstruct: no quantized layer gets learnable rounding and no activation quantizer "
            "a learnable step size under this config"
        )
    checkpoint = None
    if checkpoint_dir is not None:
        identity = run_identity(
            config.to_dict(),
            [u.name for u in units],
            calibration_fingerprint(calibration_set, rows),
            model_fingerprint(unet),
        )
        checkpoint = ResumeCheckpoint(checkpoint_dir, identity, writer=distributed.is_main_process())
        if distributed.is_initialized():
            distributed.check_same(
                f"the finished units in checkpoint_dir {checkpoint_dir} (every rank must read the same "
                "folder, e.g. on a shared filesystem)",
                [(e["phase"], e["unit"]) for e in checkpoint.finished],
            )
    weights = [config.act_iterations if phase.name == "acts" else config.iterations for phase, _ in steps]
    # The same rows are held out of every unit, so the whole run can be judged on them too.
    split_gen = torch.Generator().manual_seed(seeded(config.seed, "holdout"))
    split = split_rows(len(rows), config.holdout, split_gen)
    shard = RowShard.plan(len(rows), split, config.batch_size, config.batch_sampling)
    holdout_rows = rows[shard.owned[torch.isin(shard.owned, split[1])]]  # this rank's, in order
    report = ReconstructionReport(config=config.to_dict(), rows=len(rows))
    if shard.sharded:
        report.rows_per_rank = distributed.exchange("reconstruction: rows per rank", len(shard.owned))
    saved = SavedState(unet)
    sampled = None if sampling_check is None else sampling_check("before reconstruction")
    # Offload wraps the undo too: a restored weight Parameter then goes back to the UNet's device with it.
    with (
        offloaded(unet, config.offload, config.offload_device) as device,
        CacheStore(config.cache_dir, config.cache_max_gb) as store,
    ):
        estimates = {}
        if store.max_bytes is not None:
            inner = config.layer_loss_weight > 0
            local_rows = rows[shard.owned]
            estimates = estimate_cache_bytes(
                unet, units, calibration_set, local_rows, config.cache_dtype, inner
            )
            spilled = [b for b in estimates.values() if store.spills(b)]
            check_cache_dir(config.cache_dir, max(spilled, default=0))
        run = _Run(
            unet=unet,
            data=calibration_set,
            rows=rows,
            config=config,
            budget=Budget(config.max_minutes, sum(weights), len(steps)),
            checkpoint=checkpoint,
            total=len(steps),
            progress=progress,
            split=split,
            shard=shard,
            device=device,
            store=store,
            estimates=estimates,
        )
        done = False
        try:
            unet.eval()
            reference, before = holdout_error(unet, calibration_set, holdout_rows, config)
            report.holdout_error_before, report.holdout_bias_before = before
            for p in unet.parameters():
                p.requires_grad_(False)
            for index, ((phase, unit), weight) in enumerate(zip(steps, weights)):
                report.units.append(run.step(phase, unit, index, weight))
            bake_layers(wrapped_layers(unet))
            saved.restore_switches()
            _, after = holdout_error(unet, calibration_set, holdout_rows, config, reference)
            report.holdout_error_after, report.holdout_bias_after = after
            if after[0] > before[0] or after[1] > before[1]:
                logger.warning(
                    "reconstruction: the UNet's noise-prediction error on %d held-out calibration rows rose "
                    "(mean square %.4g -> %.4g, its mean over the rows %.4g -> %.4g); every unit is put "
                    "back to where the run started",
                    len(holdout_rows),
                    before[0],
                    after[0],
                    before[1],
                    after[1],
                )
                saved.undo()
                report.model_reverted, report.reverted_by = True, "held-out rows"
            done = True
        finally:
            if not done:
                saved.undo()
            saved.restore_switches()
    if sampled is not None and report.model_reverted:  # undone already: nothing more to sample
        note_before(report, sampling_check, sampled)
    elif sampled is not None:
        judge_samples(unet, config, sampling_check, sampled, saved, report)
    report.seconds = time.perf_counter() - started
    logger.info("%s", report)
    return report


@dataclass
class _Run:
    """What every step of one `reconstruct` call shares."""

    unet: nn.Module
    data: CalibrationSet
    rows: torch.Tensor
    config: ReconstructionConfig
    budget: Budget
    checkpoint: ResumeCheckpoint | None
    total: int
    progress: bool
    split: tuple[torch.Tensor, torch.Tensor]
    shard: RowShard
    device: torch.device | None = None  # offload='cpu': where each unit trains (the UNet stays on the CPU)
    store: CacheStore | None = None
    estimates: dict[str, int] | None = None  # unit name -> estimated cache bytes (with cache_max_gb)
    skipped_any: bool = False

    def step(self, phase: Phase, unit: Unit, index: int, weight: int) -> UnitReport:
        """Resume, skip (budget spent) or train `unit` in `phase`; `weight` is its configured iterations."""
        started = time.perf_counter()
        report, cached = self._step(phase, unit, index, weight)
        overhead = None
        if cached:  # caching, timing and evaluation: what later units will also spend
            overhead = time.perf_counter() - started - report.train_seconds
        self.budget.spend(weight, overhead)
        return report

    def _skip(self, phase: Phase, unit: Unit) -> UnitReport:
        if not self.skipped_any:  # once: the report lists every skipped unit
            logger.warning(
                "reconstruction: the time budget leaves %s no iteration; it and every unit the budget "
                "cannot fit keep their current rounding and scales (status 'skipped' in the report)",
                unit.name,
            )
        self.skipped_any = True
        return UnitReport(unit.name, unit.kind, phase.name, 0, status="skipped")

    def _step(self, phase: Phase, unit: Unit, index: int, weight: int) -> tuple[UnitReport, bool]:
        unet, config, budget, checkpoint = self.unet, self.config, self.budget, self.checkpoint
        entry = checkpoint.entry(phase.name, unit.name) if checkpoint is not None else None
        if entry is not None:
            stored = entry["report"]
            if stored.get("status") != "reverted":  # a reverted unit stayed at its starting point
                restore_learned(unet, unit, phase, checkpoint, entry)
            status = "reverted" if stored.get("status") == "reverted" else "resumed"
            return UnitReport.from_dict({**stored, "status": status}), False
        # No time left for it: not even cached (ranks agree: any rank out of time skips it everywhere).
        if budget.limited and any(
            distributed.exchange("reconstruction: budget", budget.exhausted() or budget.share(weight) <= 0)
        ):
            return self._skip(phase, unit), False
        if budget.limited:

            def iterations(seconds_per_step: float) -> int:
                fit = budget.iterations(weight, weight, seconds_per_step)
                return min(distributed.exchange("reconstruction: iterations", fit))
        else:
            iterations = weight
        store = self.store or CacheStore(None, None)
        spill = store.spills((self.estimates or {}).get(unit.name, 0))
        store.begin_unit(spill)
        try:
            with peak_memory(self.device or next(unet.parameters()).device) as peak:
                with distributed.guard(f"reconstruction: caching {unit.name}"):
                    cache = build_cache(
                        unet,
                        unit,
                        self.data,
                        self.rows[self.shard.owned],
                        batch_size=config.cache_batch_size,
                        cache_dtype=config.cache_dtype,
                        quant_state=(True, phase.acts_on),
                        with_inner=config.layer_loss_weight > 0 and bool(unit.inner_layers),
                        progress=self.progress,
                        allocate=store.allocate,
                    )
                cache_bytes = cache.nbytes
                with unit_on(unet, unit, self.device):
                    result = train_unit(
                        unet,
                        cache,
                        phase,
                        config,
                        iterations,
                        configured=weight,
                        split=self.split,
                        desc=f"{phase.name} {index + 1}/{self.total} {unit.name}",
                        progress=self.progress,
                        device=self.device,
                        shard=self.shard,
                    )
                del cache
        finally:
            store.end_unit()
        if result.status == "skipped":  # not started: nothing to record, a resumed run may train it
            return self._skip(phase, unit), True
        unit_report = UnitReport(
            unit=unit.name,
            kind=unit.kind,
            phase=phase.name,
            iterations=result.iterations,
            loss_before=result.loss_before,
            loss_after=result.loss_after,
            rounding_binary=result.rounding_binary,
            seconds=result.seconds,
            train_seconds=result.train_seconds,
            exchange_seconds=result.exchange_seconds,
            status=result.status,
            holdout_before=result.holdout_before,
            holdout_after=result.holdout_after,
            holdout_rows=result.holdout_rows,
            peak_ram_bytes=peak.ram_bytes,
            peak_device_bytes=peak.device_bytes,
            cache_bytes=cache_bytes,
            cache_spilled=spill,
        )
        logger.info(
            "reconstruction: %s %d/%d %s: %d it, held-out loss %.4g -> %.4g%s",
            phase.name,
            index + 1,
            self.total,
            unit.name,
            result.iterations,
            result.holdout_before,
            result.holdout_after,
            " (not lower: reverted to its starting point)" if result.status == "reverted" else "",
        )
        if checkpoint is not None:  # rank 0 writes, every rank records it (learned tensors are alike)
            tensors, shapes = learned_tensors(unet, unit, phase) if result.status == "trained" else ({}, {})
            checkpoint.save(phase.name, index, unit.name, tensors, shapes, unit_report.to_dict())
        return unit_report, True
