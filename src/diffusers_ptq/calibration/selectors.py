"""Sample selectors: which calibration samples are captured from the pipeline's own loop, and how.

A timestep sampler (samplers.py) only says which steps to record; a selector owns the whole gathering:

- "random" (default): the configured timestep sampler's recording mask over random trajectories, exactly
  what calibration did before selectors existed.
- "density_diversity" (EDA-DM TDAC): a float feature pass weighs every sampling step by the density and
  diversity of its feature; N_t samples go to step t in proportion to w_t (largest remainders, so the
  total is exact), then one capture records them.
- "active" (APQ-DM, active.py): rounds, each at the step the group search is least sure about.

Selectors register by name, so a method adds one without touching the capture code or the API. Every
selector returns a `Selection`; text-to-image trajectories take the prompts in turn, cycling when a
selector needs more trajectories than there are prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffusers_ptq.calibration.capture import capture, rank_counts
from diffusers_ptq.calibration.dataset import CalibrationSet
from diffusers_ptq.calibration.driver import CalibrationDriver
from diffusers_ptq.calibration.features import step_feature_grams, tdac_weights
from diffusers_ptq.calibration.pipelines import PipelineSpec
from diffusers_ptq.calibration.samplers import recording_mask
from diffusers_ptq.config import CalibrationConfig, SelectionConfig
from diffusers_ptq.distributed import world_size

# Called by the 'active' selector with the data gathered so far; returns H(sigma_t) per sampling step.
SelectionFeedback = Callable[[CalibrationSet], torch.Tensor]


@dataclass
class SelectionRequest:
    """Everything a selector may use: the pipeline, its planned schedule and the recipe's settings."""

    pipe: Any
    spec: PipelineSpec
    calibration: CalibrationConfig
    selection: SelectionConfig
    step_timesteps: torch.Tensor
    num_train_timesteps: int
    num_inference_steps: int
    prompts: list[str] | None
    generator: torch.Generator
    progress: bool = True
    driver: CalibrationDriver | None = None  # None: plain calls of `spec` with the prompts
    # An initialised process group: captures split their runs among the ranks (capture's `distributed`).
    distributed: bool = False
    # Per rank: trajectories run and samples recorded, summed over this request's captures.
    rank_counts: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.driver is None:
            self.driver = CalibrationDriver(
                self.spec,
                self.num_inference_steps,
                self.calibration.guidance_scale,
                self.prompts,
                batch_size=self.calibration.batch_size,
            )

    @property
    def num_steps(self) -> int:
        return int(self.step_timesteps.shape[0])

    def prompts_for(self, count: int, offset: int = 0) -> list[str] | None:
        """`count` prompts starting at `offset`, cycling through the given prompts."""
        if self.prompts is None:
            return None
        return [self.prompts[(offset + i) % len(self.prompts)] for i in range(count)]

    def capture(
        self, mask: torch.Tensor, prompt_offset: int = 0, progress: bool | None = None
    ) -> CalibrationSet:
        """Record the (trajectory, step) pairs of `mask` through the pipeline."""
        if self.distributed:
            counts = rank_counts(mask, self.driver.chunk, world_size())
            for key, values in counts.items():
                old = self.rank_counts.get(key, [0] * len(values))
                self.rank_counts[key] = [a + b for a, b in zip(old, values)]
        return capture(
            self.pipe,
            self.spec,
            mask,
            self.step_timesteps,
            num_train_timesteps=self.num_train_timesteps,
            num_inference_steps=self.num_inference_steps,
            prompts=self.prompts_for(mask.shape[0], prompt_offset),
            guidance_scale=self.calibration.guidance_scale,
            batch_size=self.calibration.batch_size,
            generator=self.generator,
            progress=self.progress if progress is None else progress,
            driver=self.driver,
            trajectory_offset=prompt_offset,
            distributed=self.distributed,
        )


@dataclass
class Selection:
    """The captured calibration set and what the selector decided (for reports and ablations)."""

    data: CalibrationSet
    info: dict[str, Any] = field(default_factory=dict)


SelectorFn = Callable[[SelectionRequest, "SelectionFeedback | None"], Selection]
_SELECTORS: dict[str, SelectorFn] = {}


def register_sample_selector(name: str) -> Callable[[SelectorFn], SelectorFn]:
    """Decorator: register `fn(request, feedback) -> Selection` under `name`."""

    def decorator(fn: SelectorFn) -> SelectorFn:
        _SELECTORS[name] = fn
        return fn

    return decorator


def available_selectors() -> list[str]:
    return sorted(_SELECTORS)


def select_calibration(request: SelectionRequest, feedback: SelectionFeedback | None = None) -> Selection:
    """Run the selector `request.calibration.selector` and return its Selection."""
    name = request.calibration.selector
    if name not in _SELECTORS:
        raise ValueError(f"calibration.selector={name!r} is invalid; expected one of {available_selectors()}")
    selection = _SELECTORS[name](request, feedback)
    n = int(selection.data.step_index.numel()) // max(selection.data.guidance_halves, 1)
    if n != request.calibration.num_samples:  # a selector bug, not a user error
        raise RuntimeError(f"selector {name!r} captured {n} samples, not {request.calibration.num_samples}")
    return selection


def samples_per_step(mask: torch.Tensor) -> list[int]:
    return mask.sum(dim=0).tolist()


@register_sample_selector("random")
def random_selection(request: SelectionRequest, feedback: SelectionFeedback | None = None) -> Selection:
    """The timestep sampler's mask (calibration.sampler) over random trajectories."""
    calib = request.calibration
    gen = torch.Generator().manual_seed(calib.seed)
    mask = recording_mask(calib, request.step_timesteps, request.num_train_timesteps, gen)
    return Selection(request.capture(mask), {"samples_per_step": samples_per_step(mask)})


def allocate_samples(weights: torch.Tensor, num_samples: int) -> torch.Tensor:
    """N_t proportional to w_t, summing exactly to `num_samples` (largest remainders get the rest).

    All-zero weights (every step alike) share the samples evenly.
    """
    w = weights.double().clamp_min(0)
    if not torch.isfinite(w).all():
        raise ValueError(f"step weights must be finite, got {weights.tolist()}")
    if w.sum() <= 0:
        w = torch.ones_like(w)
    exact = num_samples * w / w.sum()
    counts = exact.floor().long()
    rest = num_samples - int(counts.sum())
    # Stable sort: equal remainders go to the earlier step, so the result is deterministic.
    order = torch.sort(exact - counts, descending=True, stable=True).indices
    counts[order[:rest]] += 1
    return counts


def allocation_mask(counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Recording mask (trajectories, steps) with counts[t] random trajectories recording step t."""
    n_traj = max(int(counts.max()), 1)
    mask = torch.zeros(n_traj, len(counts), dtype=torch.bool)
    for step, count in enumerate(counts.tolist()):
        mask[torch.randperm(n_traj, generator=generator)[:count], step] = True
    return mask


@register_sample_selector("density_diversity")
def density_diversity(request: SelectionRequest, feedback: SelectionFeedback | None = None) -> Selection:
    """EDA-DM TDAC: allocate samples to steps by feature density and diversity, then capture them.

    The feature pass draws its own trajectories; the capture draws fresh ones from the same pipeline, so the
    calibration samples follow the same distribution as the features without holding every step's inputs.
    """
    sel, calib = request.selection, request.calibration
    grams = step_feature_grams(
        request.pipe,
        request.spec,
        sel.feature_module,
        num_trajectories=sel.feature_samples,
        num_steps=request.num_steps,
        num_inference_steps=request.num_inference_steps,
        prompts=request.prompts,
        guidance_scale=calib.guidance_scale,
        batch_size=calib.batch_size,
        generator=request.generator,
        progress=request.progress,
        driver=request.driver,
    )
    scores = tdac_weights(grams, sel.density_radius, sel.diversity_weight)
    counts = allocate_samples(scores.weights, calib.num_samples)
    mask = allocation_mask(counts, torch.Generator().manual_seed(calib.seed))
    info = {
        "samples_per_step": counts.tolist(),
        "density": scores.density.tolist(),
        "diversity": scores.diversity.tolist(),
        "step_weights": scores.weights.tolist(),
    }
    return Selection(request.capture(mask), info)
