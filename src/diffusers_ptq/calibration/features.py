"""EDA-DM TDAC features: a float pass records a feature per sampling step; density and diversity weigh steps.

The feature of step t, F_t, is the input of one UNet module (EDA-DM: the mid-block attention) over a batch
of trajectories. Both scores only need inner products between steps, so the pass accumulates two Gram
matrices (raw, and with each position's channel vector normalised) chunk by chunk and never holds more
than one chunk's features:

    density   rho_t   = #{s != t : mean((F_t - F_s)^2) <= r}
    diversity delta_t = sum_{s != t} sum_positions (1 - cos(F_t, F_s))      (cosine over channels)
    weight    w_t     = minmax(rho)_t + lambda * minmax(delta)_t
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusers_ptq.calibration.capture import quiet_pipeline
from diffusers_ptq.calibration.driver import CalibrationDriver
from diffusers_ptq.calibration.pipelines import PipelineSpec


def feature_module(unet: nn.Module, name: str) -> nn.Module:
    """The module `name` of `unet`; ValueError naming the attention modules it could be otherwise."""
    try:
        return unet.get_submodule(name)
    except AttributeError:
        candidates = [
            n
            for n, m in unet.named_modules()
            if n and ("Attention" in type(m).__name__ or "Transformer" in type(m).__name__)
        ]
        shown = ", ".join(repr(c) for c in candidates[:12]) or "none"
        raise ValueError(
            f"selection.feature_module={name!r} is not a module of the {type(unet).__name__}; expected a "
            f"module name such as one of its attention modules: {shown}"
        ) from None


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """(rows, channels, positions): conv maps are (B, C, H, W), token sequences (B, L, C)."""
    if x.ndim == 4:
        return x.reshape(x.shape[0], x.shape[1], -1)
    if x.ndim == 3:
        return x.transpose(1, 2)
    if x.ndim == 2:
        return x[..., None]
    raise ValueError(f"cannot read a per-step feature of shape {tuple(x.shape)}; expected 2-, 3- or 4-D")


@dataclass
class StepGrams:
    """Inner products between the per-step features, summed over everything recorded so far."""

    raw: torch.Tensor  # (S, S): <F_t, F_s>
    cosine: torch.Tensor  # (S, S): sum over positions of cos(F_t, F_s)
    elements: int = 0  # values per step feature
    positions: int = 0  # (row, position) pairs per step feature

    @classmethod
    def empty(cls, num_steps: int) -> StepGrams:
        zeros = torch.zeros(num_steps, num_steps, dtype=torch.float64)
        return cls(zeros, zeros.clone())

    def add(self, features: torch.Tensor) -> None:
        """Accumulate features of shape (S, rows, ...) (one chunk of trajectories, every step)."""
        steps = features.shape[0]
        chunk = torch.stack([_channels_first(f) for f in features]).double()  # (S, rows, C, P)
        unit = chunk / chunk.norm(dim=2, keepdim=True).clamp_min(1e-12)
        flat, flat_unit = chunk.reshape(steps, -1), unit.reshape(steps, -1)
        self.raw += flat @ flat.T
        self.cosine += flat_unit @ flat_unit.T
        self.elements += flat.shape[1]
        self.positions += chunk.shape[1] * chunk.shape[3]


@dataclass
class StepWeights:
    """TDAC scores per sampling step."""

    density: torch.Tensor
    diversity: torch.Tensor
    weights: torch.Tensor


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return torch.zeros_like(x) if span <= 0 else (x - x.min()) / span


def tdac_weights(grams: StepGrams, radius: float, diversity_weight: float) -> StepWeights:
    """Density, diversity and the combined weight w_t of every step (EDA-DM's TDAC)."""
    sq = grams.raw.diagonal()
    mse = ((sq[:, None] + sq[None, :] - 2 * grams.raw) / max(grams.elements, 1)).clamp_min(0)
    off_diag = ~torch.eye(len(sq), dtype=torch.bool)
    density = ((mse <= radius) & off_diag).sum(dim=1).double()
    diversity = ((grams.positions - grams.cosine) * off_diag).sum(dim=1).clamp_min(0)
    weights = _minmax(density) + diversity_weight * _minmax(diversity)
    return StepWeights(density, diversity, weights)


class _FeatureRecorder:
    """Pre-hooks: the UNet's counts its calls (steps), the feature module's records its input per step."""

    def __init__(self, num_steps: int, module_name: str) -> None:
        self.num_steps, self.module_name = num_steps, module_name
        self.step = -1
        self.features: list[torch.Tensor | None] = [None] * num_steps

    def unet_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.step += 1
        if self.step >= self.num_steps:
            raise RuntimeError(f"the pipeline called the UNet more than the {self.num_steps} planned times")

    def feature_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if not torch.is_tensor(x):
            raise RuntimeError(f"{self.module_name} received no tensor input to use as the step feature")
        if self.features[self.step] is not None:
            raise RuntimeError(
                f"{self.module_name} ran more than once in one UNet call; choose a module that runs once "
                "(selection.feature_module)"
            )
        self.features[self.step] = x.detach().float().cpu()

    def take(self) -> torch.Tensor:
        calls = self.step + 1
        if calls != self.num_steps:  # more calls raise in unet_hook; fewer: the run ended early
            raise RuntimeError(
                f"the pipeline made {calls} UNet calls but its scheduler planned {self.num_steps}: the run "
                "ended early (a callback that stops the loop, or a pipeline that returns early?)"
            )
        missing = [s for s, f in enumerate(self.features) if f is None]
        if missing:
            raise RuntimeError(
                f"{self.module_name} did not run at sampling step(s) {missing}; choose a module on the "
                "UNet's path (selection.feature_module)"
            )
        out = torch.stack(self.features)  # type: ignore[arg-type]
        self.step, self.features = -1, [None] * self.num_steps
        return out


@torch.no_grad()
def step_feature_grams(
    pipe: Any,
    spec: PipelineSpec,
    module_name: str,
    *,
    num_trajectories: int,
    num_steps: int,
    num_inference_steps: int,
    prompts: list[str] | None,
    guidance_scale: float | None,
    batch_size: int,
    generator: torch.Generator,
    progress: bool = True,
    driver: CalibrationDriver | None = None,
) -> StepGrams:
    """Run the float pipeline over `num_trajectories` trajectories and accumulate the step-feature Grams.

    With a `driver` (pipeline kwargs, a calibration_fn) it makes the calls, `driver.chunk` trajectories each.
    """
    if driver is None:
        driver = CalibrationDriver(spec, num_inference_steps, guidance_scale, prompts, batch_size=batch_size)
    module = feature_module(pipe.unet, module_name)
    recorder = _FeatureRecorder(num_steps, module_name)
    grams = StepGrams.empty(num_steps)
    handles = [
        pipe.unet.register_forward_pre_hook(recorder.unet_hook, with_kwargs=True),
        module.register_forward_pre_hook(recorder.feature_hook, with_kwargs=True),
    ]
    try:
        with quiet_pipeline(pipe):
            chunk = driver.chunk
            starts = range(0, num_trajectories, chunk)
            for start in tqdm(starts, desc="calibration: step features", unit="batch", disable=not progress):
                count = chunk if driver.calibration_fn is not None else min(chunk, num_trajectories - start)
                driver.run(pipe, start, count, generator)
                grams.add(recorder.take())
    finally:
        for handle in handles:
            handle.remove()
    return grams
