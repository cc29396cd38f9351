"""Reconstruction never makes a model worse: held-out revert, schedules laid over the planned iterations,
no half-trained unit when a time budget runs out (docs/methods.md, "Block reconstruction")."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusers_ptq import reconstruct
from diffusers_ptq.quantizers import TimestepActQuantizer
from diffusers_ptq.reconstruction import budget as budget_module
from diffusers_ptq.reconstruction import reconstruction_units, safeguard, trainer
from diffusers_ptq.reconstruction.budget import Budget
from diffusers_ptq.reconstruction.losses import BetaSchedule, lr_factor
from diffusers_ptq.reconstruction.trainer import Phase, rounding_lr, train_unit
from reconstruction_helpers import calibration_set, fast_config, full_cache, quantized

ROWS = 10  # the unit-level tests; the tiny-budget test uses 20 (4 held out)
HANDFUL = 4  # iterations each unit gets out of the configured 20,000 in the "tiny budget" tests
PUBLISHED = {"iterations": 20000, "act_iterations": 5000, "weight_lr": 1e-3, "act_lr": 4e-4}


def _relative_error(unet, reference, data) -> float:
    with torch.no_grad():
        out = unet(**data.unet_kwargs(slice(None))).sample
    return float((out - reference).pow(2).mean() / reference.pow(2).mean())


def _snapshot(unet):
    """Everything a unit's starting point is: weight quantizer objects, scales, weights, buffers."""
    quantizers = {
        n: list(m.weight_quantizers) for n, m in unet.named_modules() if hasattr(m, "weight_quantizers")
    }
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    return quantizers, state


def _same(unet, snapshot, names=None) -> bool:
    quantizers, state = snapshot
    now_q, now_state = _snapshot(unet)
    layers = quantizers if names is None else {n: quantizers[n] for n in names}
    same_objects = all(all(a is b for a, b in zip(now_q[n], layers[n], strict=True)) for n in layers)
    keys = state if names is None else [k for k in state if any(k.startswith(n + ".") for n in names)]
    return same_objects and all(torch.equal(now_state[k], state[k]) for k in keys)


@pytest.fixture
def handful(monkeypatch):
    """A time budget that fits HANDFUL iterations into every unit, deterministically."""
    real = Budget.iterations

    def iterations(self, configured, weight, seconds_per_step):
        return min(configured, HANDFUL) if self.limited else real(self, configured, weight, seconds_per_step)

    monkeypatch.setattr(Budget, "iterations", iterations)


# Fresh rows the whole run is judged on. With 10, the grouped joint case on the UNet2DModel read 1.5 % worse
# than calibration only (0.02361 vs 0.02325) while 40 rows drawn the same way (the 10 among them) read 1.7 %
# better (0.02281 vs 0.02320): a 10-row draw decides a difference that size by which rows it holds.
FRESH_ROWS = 40


@pytest.mark.parametrize("kind", ["unet2d", "sd"])
@pytest.mark.parametrize("optimization", ["sequential", "joint"])
@pytest.mark.parametrize("granularity", ["per_channel", "auto"])
def test_a_tiny_budget_is_no_worse_than_calibration_only(handful, kind, optimization, granularity):
    unet, data = quantized(kind, rows=20, groups=1, granularity=granularity)
    calibrated = copy.deepcopy(unet)
    held_out = calibration_set(unet, FRESH_ROWS, seed=1)
    with torch.no_grad():
        from diffusers_ptq import set_quant_state

        float_unet = copy.deepcopy(unet)
        set_quant_state(float_unet, weights=False, acts=False)
        reference = float_unet(**held_out.unet_kwargs(slice(None))).sample
    config = fast_config(**PUBLISHED, optimization=optimization, cache_batch_size=20, max_minutes=60.0)
    report = reconstruct(unet, data, config, progress=False)
    ran = [u for u in report.units if u.status in ("trained", "reverted")]
    assert ran and all(u.iterations == HANDFUL for u in ran)
    assert _relative_error(unet, reference, held_out) <= _relative_error(calibrated, reference, held_out)


def _one_unit(phase: Phase, **overrides):
    # Per-channel scales: with 'auto' (near group sizes) this unit starts with a held-out loss a third lower
    # (0.045 against 0.066) and a few dozen steps on 8 rows improve it at some learning rates and not at
    # others; the tests below need a unit that training reliably improves (or, at absurd rates, worsens).
    unet, data = quantized("unet2d", rows=ROWS, granularity="per_channel")
    config = fast_config(cache_batch_size=ROWS, **overrides)
    unit = next(u for u in reconstruction_units(unet, config, data) if u.name == "down_blocks.1.resnets.0")
    cache = full_cache(unet, unit, data, ROWS, phase.acts_on)
    return unet, unit, cache, config


JOINT = Phase("joint", learn_rounding=True, learn_scales=True, acts_on=True, loss_p=2.0)


def test_a_unit_whose_held_out_loss_rises_reverts_exactly():
    unet, _, cache, config = _one_unit(JOINT, weight_lr=1e3, act_lr=1e3)  # absurd: the loss rises
    before = _snapshot(unet)
    result = train_unit(unet, cache, JOINT, config, 10, progress=False)
    assert result.status == "reverted" and result.holdout_after >= result.holdout_before
    assert result.holdout_rows == 2  # 20 % of 10 rows
    assert _same(unet, before), "weights, rounding (the quantizer objects) and scales are the starting point"
    assert not any(
        type(q).__name__ == "AdaRoundQuantizer"
        for m in unet.modules()
        for q in getattr(m, "weight_quantizers", [])
    )


def test_a_unit_that_improves_on_held_out_rows_keeps_its_training():
    # The counterpart: the same unit at sane learning rates keeps what it learned.
    unet, _, cache, config = _one_unit(JOINT, weight_lr=3e-2, act_lr=4e-5)
    before = _snapshot(unet)
    result = train_unit(unet, cache, JOINT, config, 40, progress=False)
    assert result.status == "trained" and result.holdout_after < result.holdout_before
    assert not _same(unet, before)


def test_reverted_units_are_reported_and_stay_at_their_starting_point():
    unet, data = quantized("unet2d", rows=ROWS)
    scales = {n: m.scale.clone() for n, m in unet.named_modules() if isinstance(m, TimestepActQuantizer)}
    config = fast_config(cache_batch_size=ROWS, weight_rounding="nearest", act_lr=1e3, act_iterations=5)
    report = reconstruct(unet, data, config, progress=False)
    assert report.reverted and all(u.status == "reverted" for u in report.reverted)
    assert "reverted to their starting point" in str(report) and report.reverted[0].unit in str(report)
    units = {u.name: u for u in reconstruction_units(unet, config, data)}
    for u in report.reverted:
        for name in units[u.unit].act_quantizers:
            assert torch.equal(unet.get_submodule(name).scale, scales[name]), name
    assert report.to_dict()["units"][0]["holdout_rows"] == 2


@pytest.mark.parametrize("warmup", [0.0, 0.2, 0.5, 0.99])
def test_beta_schedule_reaches_its_end_at_the_planned_last_iteration(warmup):
    for n in [*range(1, 40), 97, 1000, 20000]:
        schedule = BetaSchedule(n, warmup, 20.0, 2.0)
        assert schedule.active(n) and schedule.beta(n) == 2.0, n
        assert lr_factor("cosine", n, n) == pytest.approx(0.0, abs=1e-12)


def test_the_trainer_lays_every_schedule_over_the_planned_count(monkeypatch):
    seen = {"betas": [], "counts": []}

    class Recording(BetaSchedule):
        def __init__(self, iterations, *args):
            super().__init__(iterations, *args)
            seen["counts"].append(iterations)

        def beta(self, step):
            value = super().beta(step)
            seen["betas"].append((step, value))
            return value

    monkeypatch.setattr(trainer, "BetaSchedule", Recording)
    phase = Phase("weights", learn_rounding=True, learn_scales=False, acts_on=False, loss_p=2.0)
    unet, _, cache, config = _one_unit(phase, **PUBLISHED)
    planned = 9
    result = train_unit(unet, cache, phase, config, lambda seconds: planned, configured=20000, progress=False)
    assert result.iterations == planned and seen["counts"] == [planned]
    assert seen["betas"][-1] == (planned, config.beta_end)
    # A short schedule still ends with (almost all) rounding binary: the bake is the soft state it trained.
    assert result.rounding_binary > 0.9, result.rounding_binary


def test_rounding_lr_keeps_the_configured_travel_within_bounds():
    assert rounding_lr(1e-3, 20000, 20000) == 1e-3
    assert rounding_lr(1e-3, 400, 20000) == pytest.approx(0.05)
    assert rounding_lr(1e-3, 5, 20000) == trainer.MAX_ROUNDING_LR
    assert rounding_lr(2.0, 5, 20000) == 2.0  # never lowered


def test_no_unit_is_left_half_trained_when_the_budget_runs_out(monkeypatch):
    clock = {"t": 0.0}
    steps: dict[str, int] = {}
    real_one = trainer._Loop.one

    def one(self, *args, **kwargs):
        steps[self.step.unit.name] = steps.get(self.step.unit.name, 0) + 1
        clock["t"] += 1.0  # one simulated second per optimiser step: the budget runs out inside a unit
        return real_one(self, *args, **kwargs)

    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(trainer._Loop, "one", one)
    unet, data = quantized("unet2d", rows=ROWS)
    config = fast_config(cache_batch_size=ROWS, iterations=25, learn_act_scales=False, max_minutes=1.0)
    units = {u.name: u for u in reconstruction_units(unet, config, data)}
    start = _snapshot(unet)
    report = reconstruct(unet, data, config, progress=False)
    started = [u for u in report.units if u.status != "skipped"]
    skipped = [u for u in report.units if u.status == "skipped"]
    assert started and skipped and clock["t"] > 60.0, "the budget ran out during the run"
    for u in started:  # every started unit ran its whole planned schedule (plus the timing probe's steps)
        assert 1 <= u.iterations <= 25 and steps[u.unit] == u.iterations + trainer.PROBE_STEPS
    for u in skipped:  # never trained: at most the timing probe's steps (undone), exactly its starting point
        # (On a loaded machine the probe's real step time can show a unit that no longer fits the budget.)
        assert u.iterations == 0 and steps.get(u.unit, 0) in (0, trainer.PROBE_STEPS)
        assert _same(unet, start, units[u.unit].layers)


@pytest.mark.parametrize("errors", [[(1.0, 1.0), (2.0, 1.0)], [(1.0, 1.0), (0.5, 1.5)]], ids=["mse", "bias"])
def test_a_run_that_worsens_the_whole_unet_on_held_out_rows_is_undone(monkeypatch, errors):
    # Units are judged one at a time; the whole UNet is judged on the same held-out rows at the end.
    measured = iter(errors)  # before the run, after it: the error or its mean over the rows higher
    monkeypatch.setattr(safeguard, "output_errors", lambda a, b: next(measured))
    unet, data = quantized("unet2d", rows=ROWS)
    start = _snapshot(unet)
    report = reconstruct(unet, data, fast_config(cache_batch_size=ROWS, iterations=10), progress=False)
    assert report.model_reverted
    assert (report.holdout_error_after, report.holdout_bias_after) == errors[1]
    assert any(u.status == "trained" for u in report.units)
    assert _same(unet, start), "every unit is back where the run started"
    assert "the whole run was undone" in str(report) and report.to_dict()["model_reverted"]


@pytest.mark.parametrize("bad", [0.0, 0.6, -0.1, "0.2", True])
def test_holdout_is_validated(bad):
    with pytest.raises(ValueError, match=r"reconstruction\.holdout="):
        fast_config(holdout=bad).validate()
