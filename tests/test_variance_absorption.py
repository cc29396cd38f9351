"""PTQD's variance absorption (`absorb_quantization_noise`).

The claims: the coefficient of the model output in one sampler step is the scheduler's own (finite
differences of the real `step`); only the noise term is rescaled, by sqrt(1 - c^2 s / sigma^2) computed
here from the schedule independently; a model whose prediction carries uncorrelated noise of variance s
then produces steps with the float model's variance (without absorption: sigma^2 + c^2 s); eta = 0 and
the last DDPM step are untouched; the handle removes itself; bad input is refused by name.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from diffusers_ptq import PTQConfig, absorb_quantization_noise, quantize_pipeline
from diffusers_ptq.correction import NoiseAbsorption
from diffusers_ptq.correction.variance import model_output_coefficient
from diffusers_ptq.quantizers import OutputCorrection
from diffusers_ptq.timestep import TimestepContext
from diffusers_ptq.tiny import tiny_ddim_pipeline, tiny_ddpm_pipeline

PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _correction(
    var: tuple[float, float] = (0.01, 0.04), k: tuple[float, float] = (0.0, 0.0)
) -> OutputCorrection:
    """Two timestep groups (t < 500, t >= 500) with the given residual variances and slopes."""
    group_map = (torch.arange(1000) >= 500).long()
    correction = OutputCorrection(TimestepContext(1000), group_map, channels=3)
    correction.residual_var.copy_(torch.tensor(var))
    correction.k.copy_(torch.tensor(k))
    return correction


def _scheduler(kind: str, prediction: str = "epsilon", steps: int = 20, **extra):
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    scheduler = cls(num_train_timesteps=1000, prediction_type=prediction, clip_sample=False, **extra)
    scheduler.set_timesteps(steps)
    return scheduler


def _step(scheduler, m, t, x, seed: int | None, eta: float = 1.0):
    kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    if seed is None:  # DDIM without noise
        return scheduler.step(m, t, x, variance_noise=torch.zeros_like(x), **kwargs).prev_sample
    return scheduler.step(m, t, x, generator=torch.Generator().manual_seed(seed), **kwargs).prev_sample


def _sigma2(scheduler, t: int, eta: float = 1.0) -> tuple[float, float, float]:
    """(alpha_t, alpha_prev, the sampler's sigma^2) from the schedule, written out independently."""
    a = scheduler.alphas_cumprod
    if isinstance(scheduler, DDIMScheduler):
        prev = t - 1000 // scheduler.num_inference_steps
    else:
        timesteps = scheduler.timesteps.tolist()
        i = timesteps.index(t)
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
    at = float(a[t])
    ap = float(a[prev]) if prev >= 0 else 1.0
    posterior = (1 - ap) / (1 - at) * (1 - at / ap)
    return at, ap, (eta * eta * posterior if isinstance(scheduler, DDIMScheduler) else posterior)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_coefficient_is_the_schedulers_own(kind, prediction):
    scheduler = _scheduler(kind, prediction)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    m = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    delta = torch.full_like(m, 1e-2)
    for t in (int(scheduler.timesteps[1]), int(scheduler.timesteps[10]), int(scheduler.timesteps[-2])):
        seed = None if kind == "ddim" else 5  # DDPM always adds noise: the same draw cancels
        diff = (
            _step(scheduler, (m + delta).double(), t, x.double(), seed)
            - _step(scheduler, m.double(), t, x.double(), seed)
        ) / 1e-2
        at, ap, var = _sigma2(scheduler, t)
        c = model_output_coefficient(prediction, at, ap, math.sqrt(var), kind)
        torch.testing.assert_close(diff, torch.full_like(diff, c), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_only_the_noise_term_is_rescaled_by_the_expected_ratio(kind, prediction):
    correction = _correction(var=(0.004, 0.02), k=(0.1, -0.2))
    scheduler = _scheduler(kind, prediction)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in (int(scheduler.timesteps[2]), int(scheduler.timesteps[15])):
        plain = _step(scheduler, m, t, x, seed=7)
        mean = plain - torch.as_tensor(math.sqrt(_sigma2(scheduler, t)[2])) * torch.randn(
            x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
        )
        with NoiseAbsorption(scheduler, correction) as handle:
            absorbed = _step(scheduler, m, t, x, seed=7)
        at, ap, var = _sigma2(scheduler, t)
        g = int(t >= 500)
        s = float(correction.residual_var[g]) / (1 + float(correction.k[g])) ** 2
        c = model_output_coefficient(prediction, at, ap, math.sqrt(var), kind)
        ratio = math.sqrt(max(1 - c * c * s / var, 0.0))
        assert handle.last_ratio == pytest.approx(ratio, rel=1e-9) and 0 < ratio < 1
        torch.testing.assert_close(absorbed - mean, (plain - mean) * ratio, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_a_noisy_models_step_gets_the_float_steps_variance(kind):
    """Uncorrelated prediction noise of variance s: the step's variance is sigma^2 + c^2 s without
    absorption and sigma^2 with it (200k elements: the estimates are within 1.5 %)."""
    scheduler = _scheduler(kind)
    t = int(scheduler.timesteps[3])
    at, ap, var = _sigma2(scheduler, t)
    c = model_output_coefficient("epsilon", at, ap, math.sqrt(var), kind)
    s = 0.5 * var / (c * c)  # the model's noise adds half the sampler's variance
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 160, 160, generator=g, dtype=torch.float64)
    m = torch.randn(x.shape, generator=g, dtype=torch.float64)
    noisy = m + math.sqrt(s) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mean = _step(scheduler, m, t, x, seed=None) if kind == "ddim" else None
    if mean is None:  # the DDPM mean from the float model: its step minus its own noise
        mean = _step(scheduler, m, t, x, seed=11) - math.sqrt(var) * torch.randn(
            x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64
        )
    plain = _step(scheduler, noisy, t, x, seed=3)
    with NoiseAbsorption(scheduler, _correction(var=(s, s))):
        absorbed = _step(scheduler, noisy, t, x, seed=3)
    assert float((plain - mean).var()) == pytest.approx(1.5 * var, rel=0.015)
    assert float((absorbed - mean).var()) == pytest.approx(var, rel=0.015)


def test_quantization_noise_above_the_samplers_leaves_the_mean():
    scheduler = _scheduler("ddim")
    t = int(scheduler.timesteps[5])
    x, m = torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 3, 4, 4, dtype=torch.float64)
    with NoiseAbsorption(scheduler, _correction(var=(100.0, 100.0))) as handle:
        out = _step(scheduler, m, t, x, seed=3)
    assert handle.last_ratio == 0.0 and handle.clipped_steps == 1
    torch.testing.assert_close(out, _step(scheduler, m, t, x, seed=None))


def test_deterministic_steps_are_untouched():
    ddim = _scheduler("ddim")
    x, m = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = int(ddim.timesteps[4])
    expected = ddim.step(m, t, x, eta=0.0).prev_sample
    with NoiseAbsorption(ddim, _correction()) as handle:
        assert torch.equal(ddim.step(m, t, x, eta=0.0).prev_sample, expected)
        assert handle.last_ratio is None
    ddpm = _scheduler("ddpm")
    expected = ddpm.step(m, 0, x, generator=torch.Generator().manual_seed(0)).prev_sample
    with NoiseAbsorption(ddpm, _correction()) as handle:  # t = 0 adds no noise
        assert torch.equal(
            ddpm.step(m, 0, x, generator=torch.Generator().manual_seed(0)).prev_sample, expected
        )
        assert handle.last_ratio is None


def test_remove_restores_the_schedulers_step_and_refuses_twice():
    scheduler = _scheduler("ddpm")
    handle = NoiseAbsorption(scheduler, _correction())
    assert "step" in vars(scheduler)
    with pytest.raises(RuntimeError, match="already on this scheduler"):
        NoiseAbsorption(scheduler, _correction())
    handle.remove()
    handle.remove()  # idempotent
    assert "step" not in vars(scheduler) and scheduler.step.__func__ is DDPMScheduler.step
    NoiseAbsorption(scheduler, _correction()).remove()


def test_bad_input_is_refused_by_name():
    with pytest.raises(TypeError, match=r"DDIMScheduler, DDPMScheduler.*EulerDiscreteScheduler"):
        NoiseAbsorption(EulerDiscreteScheduler(), _correction())
    with pytest.raises(ValueError, match=r"variance_type='learned'.*fixed_small"):
        NoiseAbsorption(DDPMScheduler(variance_type="learned"), _correction())
    with pytest.raises(ValueError, match="residual_var is all zero"):
        NoiseAbsorption(DDPMScheduler(), _correction(var=(0.0, 0.0)))
    with pytest.raises(TypeError, match="OutputCorrection"):
        NoiseAbsorption(DDPMScheduler(), object())
    pipe = tiny_ddpm_pipeline()
    with pytest.raises(ValueError, match="bias_correction='output'"):
        absorb_quantization_noise(pipe)
    with pytest.raises(TypeError, match="no `unet`"):
        absorb_quantization_noise(object())


@pytest.mark.parametrize("factory", [tiny_ddpm_pipeline, tiny_ddim_pipeline])
def test_quantized_pipeline_samples_with_absorption(
    factory,
):
    """A W4A8 default-recipe pipeline: its fitted residual variance lowers the sampler's noise, the pipeline
    runs, and the saved scheduler is the stock one."""
    pipe = factory()
    before = dict(pipe.scheduler.config)
    config = PTQConfig(weight_bits=4, act_bits=8, calibration={"num_samples": 16, "num_inference_steps": 10})
    quantize_pipeline(pipe, config, num_samples=2, progress=False)
    kwargs = {"eta": 1.0} if factory is tiny_ddim_pipeline else {}
    with absorb_quantization_noise(pipe) as handle:
        images = pipe(
            batch_size=1,
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **kwargs,
        ).images
        assert handle.ratios and 0.0 <= min(handle.ratios) < 1.0 and max(handle.ratios) <= 1.0
    assert images.shape[0] == 1 and bool(torch.isfinite(torch.as_tensor(images)).all())
    assert "step" not in vars(pipe.scheduler) and dict(pipe.scheduler.config) == before
