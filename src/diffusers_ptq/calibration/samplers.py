"""Timestep samplers: which (trajectory, sampling step) pairs of the pipeline's own loop are recorded.

A sampler turns the planned schedule (the timestep of every UNet call of one pipeline run) into a boolean
recording mask of shape (trajectories, steps) with exactly `num_samples` True entries. Samplers register
by name, so a method adds one without touching the capture code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffusers_ptq.config import CalibrationConfig

SamplerFn = Callable[[CalibrationConfig, torch.Tensor, int, torch.Generator], torch.Tensor]
_SAMPLERS: dict[str, SamplerFn] = {}


def register_timestep_sampler(name: str) -> Callable[[SamplerFn], SamplerFn]:
    def decorator(fn: SamplerFn) -> SamplerFn:
        _SAMPLERS[name] = fn
        return fn

    return decorator


def available_samplers() -> list[str]:
    return sorted(_SAMPLERS)


def recording_mask(
    config: CalibrationConfig,
    step_timesteps: torch.Tensor,
    num_train_timesteps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Bool mask (trajectories, steps) with `config.num_samples` True entries."""
    if config.sampler not in _SAMPLERS:
        raise ValueError(
            f"calibration.sampler={config.sampler!r} is invalid; expected one of {available_samplers()}"
        )
    mask = _SAMPLERS[config.sampler](config, step_timesteps, num_train_timesteps, generator)
    if int(mask.sum()) != config.num_samples:  # a sampler bug, not a user error
        raise RuntimeError(
            f"sampler {config.sampler!r} planned {int(mask.sum())} samples, not {config.num_samples}"
        )
    return mask


def every_step_mask(steps: list[int], num_steps: int, num_samples: int) -> torch.Tensor:
    """Enough trajectories recording all of `steps`; the last one is trimmed so the total is exact."""
    n_traj = math.ceil(num_samples / len(steps))
    mask = torch.zeros(n_traj, num_steps, dtype=torch.bool)
    mask[:, steps] = True
    excess = n_traj * len(steps) - num_samples
    if excess:
        mask[-1, steps[len(steps) - excess :]] = False
    return mask


@register_timestep_sampler("uniform")
def uniform(
    config: CalibrationConfig, step_timesteps: torch.Tensor, T: int, gen: torch.Generator
) -> torch.Tensor:
    """Q-Diffusion: every `step_interval`-th sampling step, the same number of samples at each."""
    steps = list(range(0, len(step_timesteps), config.step_interval))
    return every_step_mask(steps, len(step_timesteps), config.num_samples)


@register_timestep_sampler("staggered")
def staggered(
    config: CalibrationConfig, step_timesteps: torch.Tensor, T: int, gen: torch.Generator
) -> torch.Tensor:
    """Every `step_interval`-th sampling step as in 'uniform', but trajectory j starts at step j mod the
    interval: every step is recorded equally often (within one sample), and the same number of samples comes
    from about `step_interval` times as many trajectories (noise draws) as 'uniform' records them from."""
    num_steps = len(step_timesteps)
    interval = min(config.step_interval, num_steps)
    rows, remaining = [], config.num_samples
    while remaining > 0:
        steps = list(range(len(rows) % interval, num_steps, interval))[:remaining]
        row = torch.zeros(num_steps, dtype=torch.bool)
        row[steps] = True
        rows.append(row)
        remaining -= len(steps)
    return torch.stack(rows)


@register_timestep_sampler("all")
def all_steps(
    config: CalibrationConfig, step_timesteps: torch.Tensor, T: int, gen: torch.Generator
) -> torch.Tensor:
    """Every sampling step of every calibration trajectory."""
    return every_step_mask(list(range(len(step_timesteps))), len(step_timesteps), config.num_samples)


def _one_step_per_trajectory(draws: torch.Tensor, step_timesteps: torch.Tensor, T: int) -> torch.Tensor:
    t = draws.clamp(0, T - 1)
    nearest = (t[:, None] - step_timesteps.double()[None, :]).abs().argmin(dim=1)
    mask = torch.zeros(len(draws), len(step_timesteps), dtype=torch.bool)
    mask[torch.arange(len(draws)), nearest] = True
    return mask


@register_timestep_sampler("normal")
def normal(
    config: CalibrationConfig, step_timesteps: torch.Tensor, T: int, gen: torch.Generator
) -> torch.Tensor:
    """PTQ4DM released code: t ~ N(mean * T, (std * T)^2), clamped, snapped to the nearest sampling step."""
    z = torch.randn(config.num_samples, generator=gen, dtype=torch.float64)
    return _one_step_per_trajectory((config.mean + config.std * z) * T, step_timesteps, T)


def skew_normal_draws(n: int, mean: float, std: float, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """Skew-normal draws with the given mean, standard deviation and shape alpha."""
    delta = alpha / math.sqrt(1.0 + alpha * alpha)
    u0 = torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    u1 = delta * u0 + math.sqrt(1.0 - delta * delta) * v
    z = torch.where(u0 >= 0, u1, -u1)  # standard skew-normal SN(0, 1, alpha)
    z_mean = delta * math.sqrt(2.0 / math.pi)
    z_std = math.sqrt(1.0 - z_mean * z_mean)
    scale = std / z_std
    return mean - scale * z_mean + scale * z


@register_timestep_sampler("skew_normal")
def skew_normal(
    config: CalibrationConfig, step_timesteps: torch.Tensor, T: int, gen: torch.Generator
) -> torch.Tensor:
    """PTQ4DM paper form: a skew-normal over the timesteps (negative skewness leans toward t = 0)."""
    draws = skew_normal_draws(config.num_samples, config.mean, config.std, config.skewness, gen)
    return _one_step_per_trajectory(draws * T, step_timesteps, T)
