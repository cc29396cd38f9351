"""Calibration timestep samplers: exact sample counts, step selection and the drawn distributions."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_ptq.calibration import samplers as samplers_mod
from diffusers_ptq.calibration.samplers import (
    available_samplers,
    recording_mask,
    register_timestep_sampler,
    skew_normal_draws,
)
from diffusers_ptq.config import CalibrationConfig

T = 1000


def _schedule(steps: int) -> torch.Tensor:
    """Descending integer timesteps of a `steps`-step DDIM-like schedule over T training steps."""
    return (torch.arange(steps) * (T // steps)).flip(0) + 1 if steps < T else torch.arange(T - 1, -1, -1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask(sampler: str, num_samples: int, steps: int, seed: int = 0, **kwargs) -> torch.Tensor:
    cfg = CalibrationConfig(sampler=sampler, num_samples=num_samples, **kwargs)
    return recording_mask(cfg, _schedule(steps), T, _gen(seed))


def test_available_samplers():
    assert set(available_samplers()) >= {"uniform", "staggered", "all", "normal", "skew_normal"}
    assert available_samplers() == sorted(available_samplers())


# ------------------------------------------------------------------------------------------ exact counts

COMBOS = [
    (1, 1, 1),
    (1, 10, 1),
    (7, 10, 1),
    (10, 10, 1),
    (11, 10, 1),
    (25, 10, 3),
    (64, 50, 2),
    (100, 50, 2),
    (101, 50, 2),
    (3, 50, 2),
    (256, 20, 5),
    (13, 4, 7),
    (999, 100, 1),
    (37, 25, 4),
]


@pytest.mark.parametrize("sampler", ["uniform", "staggered", "all", "normal", "skew_normal"])
@pytest.mark.parametrize(("num_samples", "steps", "interval"), [*COMBOS, (256, 100, 10), (50, 20, 200)])
def test_exact_number_of_samples(sampler, num_samples, steps, interval):
    mask = _mask(sampler, num_samples, steps, step_interval=interval)
    assert mask.dtype == torch.bool
    assert mask.ndim == 2 and mask.shape[1] == steps
    assert int(mask.sum()) == num_samples


@pytest.mark.parametrize(("num_samples", "steps", "interval"), COMBOS)
def test_uniform_records_every_kth_step_evenly(num_samples, steps, interval):
    mask = _mask("uniform", num_samples, steps, step_interval=interval)
    chosen = list(range(0, steps, interval))
    others = [j for j in range(steps) if j % interval != 0]
    assert not mask[:, others].any()
    counts = mask[:, chosen].sum(dim=0)
    assert int(counts.max() - counts.min()) <= 1
    if num_samples >= len(chosen):
        assert (counts >= 1).all()
        assert int(counts.min()) == num_samples // len(chosen)
    # As few trajectories as possible.
    assert mask.shape[0] == math.ceil(num_samples / len(chosen))
    assert mask.any(dim=1).all()


@pytest.mark.parametrize(("num_samples", "steps", "interval"), COMBOS)
def test_all_records_every_step_evenly(num_samples, steps, interval):
    mask = _mask("all", num_samples, steps, step_interval=interval)  # step_interval is ignored
    counts = mask.sum(dim=0)
    assert int(counts.max() - counts.min()) <= 1
    if num_samples >= steps:
        assert (counts >= 1).all()
    assert mask.shape[0] == math.ceil(num_samples / steps)


@pytest.mark.parametrize(("num_samples", "steps", "interval"), [*COMBOS, (256, 100, 10), (50, 20, 200)])
def test_staggered_records_every_step_evenly_from_offset_trajectories(num_samples, steps, interval):
    mask = _mask("staggered", num_samples, steps, step_interval=interval)
    k = min(interval, steps)
    for j, row in enumerate(mask):
        recorded = row.nonzero().flatten().tolist()
        # Trajectory j: every k-th step from step j mod k (the last one may stop early).
        assert recorded and recorded == list(range(j % k, steps, k))[: len(recorded)], j
    assert all(bool(row.sum() == len(range(j % k, steps, k))) for j, row in enumerate(mask[:-1]))
    counts = mask.sum(dim=0)
    assert int(counts.max() - counts.min()) <= 1
    if num_samples >= steps:
        assert (counts >= 1).all()
    if interval == 1:
        assert torch.equal(mask, _mask("all", num_samples, steps))


def test_staggered_draws_the_default_calibration_from_ten_times_the_trajectories():
    # 256 samples at DDIM 100: 'uniform' every step needs 3 trajectories, 'staggered' every 10th 26.
    assert _mask("uniform", 256, 100).shape[0] == 3
    mask = _mask("staggered", 256, 100, step_interval=10)
    assert mask.shape[0] == 26 and set(mask.sum(dim=0).tolist()) == {2, 3}


def test_uniform_q_diffusion_layout():
    # 50 steps, every 2nd: 25 chosen steps, 4 trajectories of 25 records each.
    mask = _mask("uniform", 100, 50, step_interval=2)
    assert mask.shape == (4, 50)
    assert torch.equal(mask.sum(dim=0)[::2], torch.full((25,), 4))
    assert torch.equal(mask.sum(dim=0)[1::2], torch.zeros(25, dtype=torch.long))


@pytest.mark.parametrize("sampler", ["normal", "skew_normal"])
@pytest.mark.parametrize(("num_samples", "steps"), [(1, 10), (17, 50), (200, 20), (64, 1000)])
def test_random_samplers_record_one_step_per_trajectory(sampler, num_samples, steps):
    mask = _mask(sampler, num_samples, steps)
    assert mask.shape == (num_samples, steps)
    assert torch.equal(mask.sum(dim=1), torch.ones(num_samples, dtype=torch.long))


# ------------------------------------------------------------------------------------- distributions


def _phi_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _clamped_snapped_normal_moments(mu: float, sigma: float) -> tuple[float, float, float]:
    """Mean, std and P(t = 0) of round(clamp(N(mu, sigma^2), 0, T - 1)) over the integer timesteps."""
    probs = []
    for k in range(T):
        upper = 1.0 if k == T - 1 else _phi_cdf((k + 0.5 - mu) / sigma)
        lower = 0.0 if k == 0 else _phi_cdf((k - 0.5 - mu) / sigma)
        probs.append(upper - lower)
    mean = sum(k * p for k, p in enumerate(probs))
    var = sum((k - mean) ** 2 * p for k, p in enumerate(probs))
    return mean, math.sqrt(var), probs[0]


def _recorded_timesteps(mask: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
    return schedule[mask.nonzero()[:, 1]].double()


def test_normal_sampler_matches_clamped_snapped_distribution():
    n = 4000
    schedule = _schedule(T)
    cfg = CalibrationConfig(sampler="normal", num_samples=n, mean=0.4, std=0.4)
    t = _recorded_timesteps(recording_mask(cfg, schedule, T, _gen(1)), schedule)
    exp_mean, exp_std, p0 = _clamped_snapped_normal_moments(0.4 * T, 0.4 * T)
    assert t.mean().item() == pytest.approx(exp_mean, abs=4 * exp_std / math.sqrt(n))
    assert t.std().item() == pytest.approx(exp_std, rel=0.04)
    # Draws below 0 are clamped onto t = 0 (about 16 % of them), not redrawn.
    assert (t == 0).double().mean().item() == pytest.approx(p0, abs=0.03)
    assert (t == T - 1).any()
    # Without clamping the mean would be 0.4 * T; the clamped one sits within a few percent of it.
    assert t.mean().item() == pytest.approx(0.4 * T, rel=0.08)


def test_normal_sampler_narrow_distribution_centres_on_mean():
    n = 2000
    schedule = _schedule(T)
    cfg = CalibrationConfig(sampler="normal", num_samples=n, mean=0.7, std=0.05)
    t = _recorded_timesteps(recording_mask(cfg, schedule, T, _gen(2)), schedule)
    assert t.mean().item() == pytest.approx(700.0, abs=4 * 50 / math.sqrt(n))
    assert t.std().item() == pytest.approx(50.0, rel=0.06)


def test_normal_sampler_snaps_to_nearest_schedule_step():
    schedule = _schedule(10)  # 901, 801, ..., 1
    cfg = CalibrationConfig(sampler="normal", num_samples=3000, mean=0.5, std=0.01)
    mask = recording_mask(cfg, schedule, T, _gen(3))
    # N(500, 10^2) lies almost entirely in the cell of step 501 (index 4), the rest in 401/601's cells.
    counts = mask.sum(dim=0)
    assert counts[4] == 3000
    cfg = CalibrationConfig(sampler="normal", num_samples=3000, mean=0.451, std=0.01)
    counts = recording_mask(cfg, schedule, T, _gen(3)).sum(dim=0)
    # N(451, 10^2): half nearer 401 (index 5), half nearer 501 (index 4).
    assert counts[4] + counts[5] == 3000
    assert abs(int(counts[4]) - 1500) < 150


def _skewness(x: torch.Tensor) -> float:
    d = x - x.mean()
    return float((d**3).mean() / (d**2).mean() ** 1.5)


def _theory_skewness(alpha: float) -> float:
    delta = alpha / math.sqrt(1 + alpha * alpha)
    m = delta * math.sqrt(2 / math.pi)
    return (4 - math.pi) / 2 * m**3 / (1 - m * m) ** 1.5


@pytest.mark.parametrize(
    ("mean", "std", "alpha"), [(0.4, 0.4, -2.0), (0.3, 0.1, 4.0), (0.6, 0.2, -8.0), (0.5, 0.2, 0.0)]
)
def test_skew_normal_draws_moments(mean, std, alpha):
    n = 200_000
    x = skew_normal_draws(n, mean, std, alpha, _gen(4))
    assert x.shape == (n,)
    assert x.dtype == torch.float64
    assert x.mean().item() == pytest.approx(mean, rel=0.02)
    assert x.std().item() == pytest.approx(std, rel=0.02)
    skew = _skewness(x)
    if alpha == 0:
        assert abs(skew) < 0.03
    else:
        assert math.copysign(1.0, skew) == math.copysign(1.0, alpha)
        assert skew == pytest.approx(_theory_skewness(alpha), abs=0.05)


def test_skew_normal_draws_are_seeded():
    a = skew_normal_draws(100, 0.4, 0.4, -2.0, _gen(5))
    b = skew_normal_draws(100, 0.4, 0.4, -2.0, _gen(5))
    c = skew_normal_draws(100, 0.4, 0.4, -2.0, _gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_skew_normal_sampler_leans_toward_t0():
    n = 4000
    schedule = _schedule(T)
    cfg = CalibrationConfig(sampler="skew_normal", num_samples=n, mean=0.4, std=0.4, skewness=-2.0)
    t = _recorded_timesteps(recording_mask(cfg, schedule, T, _gen(7)), schedule)
    assert (t < T / 2).double().mean().item() > 0.5
    assert t.min().item() == 0 and t.max().item() <= T - 1
    # Positive skewness puts the tail toward high t instead: more mass above the mean.
    cfg_pos = CalibrationConfig(sampler="skew_normal", num_samples=n, mean=0.4, std=0.2, skewness=4.0)
    cfg_neg = CalibrationConfig(sampler="skew_normal", num_samples=n, mean=0.4, std=0.2, skewness=-4.0)
    t_pos = _recorded_timesteps(recording_mask(cfg_pos, schedule, T, _gen(7)), schedule)
    t_neg = _recorded_timesteps(recording_mask(cfg_neg, schedule, T, _gen(7)), schedule)
    assert _skewness(t_pos) > 0.3
    assert _skewness(t_neg) < -0.3
    assert t_pos.median() < 400 < t_neg.median()


# ------------------------------------------------------------------------------------------ seeding


@pytest.mark.parametrize("sampler", ["normal", "skew_normal"])
def test_same_seed_same_mask_different_seed_different(sampler):
    a = _mask(sampler, 64, 50, seed=11)
    b = _mask(sampler, 64, 50, seed=11)
    c = _mask(sampler, 64, 50, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["uniform", "staggered", "all"])
def test_deterministic_samplers_ignore_seed(sampler):
    assert torch.equal(_mask(sampler, 37, 20, seed=1), _mask(sampler, 37, 20, seed=2))


# ------------------------------------------------------------------------------------------- errors


def test_unknown_sampler_raises_value_error():
    cfg = CalibrationConfig(sampler="bogus", num_samples=4)  # the section alone is not validated
    with pytest.raises(ValueError) as info:
        recording_mask(cfg, _schedule(10), T, _gen())
    msg = str(info.value)
    assert "calibration.sampler" in msg and "bogus" in msg
    for name in ("uniform", "staggered", "normal", "skew_normal", "all"):
        assert name in msg


def test_registered_sampler_is_used_and_miscounting_sampler_is_caught(monkeypatch):
    monkeypatch.setattr(samplers_mod, "_SAMPLERS", dict(samplers_mod._SAMPLERS))

    @register_timestep_sampler("first_step")
    def first_step(config, step_timesteps, num_train, gen):
        mask = torch.zeros(config.num_samples, len(step_timesteps), dtype=torch.bool)
        mask[:, 0] = True
        return mask

    @register_timestep_sampler("broken")
    def broken(config, step_timesteps, num_train, gen):
        return torch.ones(1, len(step_timesteps), dtype=torch.bool)

    assert "first_step" in available_samplers()
    mask = recording_mask(CalibrationConfig(sampler="first_step", num_samples=5), _schedule(10), T, _gen())
    assert mask[:, 0].all() and not mask[:, 1:].any()
    with pytest.raises(RuntimeError, match="broken"):
        recording_mask(CalibrationConfig(sampler="broken", num_samples=5), _schedule(10), T, _gen())
