"""PTQD's variance absorption: the sampler adds less noise where the quantized UNet already adds some.

After the `output` correction, the quantized prediction is m_q = m + r, where r is the uncorrelated part
of the quantization noise, with per-element variance s_g = residual_var_g / (1 + k_g)^2 in timestep
group g. A stochastic sampler (DDPM, DDIM with eta > 0) computes x_{t-1} = mean(m) + sigma_t z, and
mean() is linear in m with a coefficient c_t, so the quantized sampler's step has variance
sigma_t^2 + c_t^2 s_g instead of sigma_t^2. `NoiseAbsorption` lowers the sampler's own noise to
sigma'_t = sqrt(max(sigma_t^2 - c_t^2 s_g, 0)), restoring the step's total variance (PTQD, Sec. 4.2).

It wraps the `step` of one scheduler object (DDIMScheduler and DDPMScheduler, and subclasses); the
pipeline, its saved files and the UNet stay stock. Clipping or thresholding of the predicted x0 makes
mean() nonlinear; the coefficient is then the unclipped one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from diffusers_ptq.quantizers import OutputCorrection
from diffusers_ptq.quantizers.bias import OUTPUT_CORRECTION_ATTR

SUPPORTED_SCHEDULERS = (DDIMScheduler, DDPMScheduler)
# DDPM variance types whose sigma_t is fixed by the schedule (learned ones come from the UNet itself).
FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
_MARK = "_ptq_noise_absorption"


def model_output_coefficient(
    prediction_type: str, alpha_t: float, alpha_prev: float, std: float = 0.0, sampler: str = "ddim"
) -> float:
    """d x_{t-1} / d model_output of one DDIM (`std` = its sigma_t) or DDPM step, from the cumulative
    alphas of the step's two timesteps, without clipping of x0."""
    beta_t = 1.0 - alpha_t
    if sampler == "ddpm":
        x0_coeff = math.sqrt(alpha_prev) * (1.0 - alpha_t / alpha_prev) / beta_t
        dx0 = {"epsilon": -math.sqrt(beta_t / alpha_t), "v_prediction": -math.sqrt(beta_t), "sample": 1.0}
        return x0_coeff * dx0[prediction_type]
    direction = math.sqrt(max(1.0 - alpha_prev - std * std, 0.0))
    if prediction_type == "epsilon":
        return direction - math.sqrt(alpha_prev * beta_t / alpha_t)
    if prediction_type == "v_prediction":
        return direction * math.sqrt(alpha_t) - math.sqrt(alpha_prev * beta_t)
    return math.sqrt(alpha_prev) - direction * math.sqrt(alpha_t / beta_t)  # "sample"


class NoiseAbsorption:
    """Handle of the absorption installed on one scheduler; `remove()` (or leaving a `with` block) undoes it.

    `ratios` lists sigma'_t / sigma_t of every noisy step so far, `last_ratio` the latest (None before any),
    and `clipped_steps` counts steps where the quantization noise alone exceeded the sampler's (sigma'_t = 0).
    """

    def __init__(self, scheduler: Any, correction: OutputCorrection) -> None:
        if not isinstance(scheduler, SUPPORTED_SCHEDULERS):
            names = ", ".join(cls.__name__ for cls in SUPPORTED_SCHEDULERS)
            raise TypeError(
                f"variance absorption supports the stochastic samplers {names} (and subclasses); got "
                f"{type(scheduler).__name__}"
            )
        variance_type = getattr(scheduler.config, "variance_type", None)
        if isinstance(scheduler, DDPMScheduler) and variance_type not in FIXED_VARIANCES:
            raise ValueError(
                f"scheduler.config.variance_type={variance_type!r}: variance absorption needs a fixed "
                f"variance, one of {', '.join(FIXED_VARIANCES)}"
            )
        if not isinstance(correction, OutputCorrection):
            raise TypeError(f"correction must be an OutputCorrection, got {type(correction).__name__}")
        if not bool((correction.residual_var > 0).any()):
            raise ValueError(
                "the UNet's output correction has no residual variance (residual_var is all zero): it was "
                "not fitted; quantize with bias_correction='output' on calibration data first"
            )
        if getattr(scheduler, _MARK, None) is not None:
            raise RuntimeError("variance absorption is already on this scheduler; remove() it first")
        self.scheduler = scheduler
        self.correction = correction
        self.ratios: list[float] = []
        self.clipped_steps = 0
        self._original = scheduler.step  # the bound method of the class (or of an outer wrapper)
        scheduler.step = self._step
        setattr(scheduler, _MARK, self)

    @property
    def last_ratio(self) -> float | None:
        return self.ratios[-1] if self.ratios else None

    def quantization_variance(self, timestep: Any) -> float:
        """s_g of the timestep group `timestep` belongs to: the residual variance in model-output units."""
        last = len(self.correction.group_map) - 1
        t = int(torch.as_tensor(timestep).reshape(-1)[0].round().long().clamp(0, last))
        g = int(self.correction.group_map[t])
        return float(self.correction.residual_var[g]) / (1.0 + float(self.correction.k[g])) ** 2

    def _alphas(self, timestep: Any) -> tuple[float, float, float]:
        """(alpha_t, alpha_prev, sigma_t^2 of the sampler) of the step at `timestep`."""
        s = self.scheduler
        t = int(torch.as_tensor(timestep).reshape(-1)[0])
        alpha_t = float(s.alphas_cumprod[t])
        if isinstance(s, DDIMScheduler):
            prev = t - s.config.num_train_timesteps // s.num_inference_steps
            alpha_prev = float(s.alphas_cumprod[prev]) if prev >= 0 else float(s.final_alpha_cumprod)
            return alpha_t, alpha_prev, float(s._get_variance(t, prev))
        prev = int(s.previous_timestep(t))
        alpha_prev = float(s.alphas_cumprod[prev]) if prev >= 0 else 1.0
        beta = 1.0 - alpha_t / alpha_prev
        small = (1.0 - alpha_prev) / (1.0 - alpha_t) * beta
        return (
            alpha_t,
            alpha_prev,
            beta if s.config.variance_type.startswith("fixed_large") else max(small, 1e-20),
        )

    def noise_ratio(self, timestep: Any, eta: float = 1.0) -> float | None:
        """sigma'_t / sigma_t for the step at `timestep`; None where the sampler adds no noise."""
        s = self.scheduler
        alpha_t, alpha_prev, variance = self._alphas(timestep)
        ddim = isinstance(s, DDIMScheduler)
        var = eta * eta * variance if ddim else variance
        if var <= 0.0 or (not ddim and int(torch.as_tensor(timestep).reshape(-1)[0]) <= 0):
            return None
        c = model_output_coefficient(
            s.config.prediction_type, alpha_t, alpha_prev, math.sqrt(var), "ddim" if ddim else "ddpm"
        )
        remaining = var - c * c * self.quantization_variance(timestep)
        ratio = math.sqrt(max(remaining, 0.0) / var)
        self.ratios.append(ratio)
        self.clipped_steps += ratio == 0.0
        return ratio

    def _step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
    ):
        if isinstance(self.scheduler, DDIMScheduler):
            return self._ddim_step(model_output, timestep, sample, *args, **kwargs)
        return self._ddpm_step(model_output, timestep, sample, *args, **kwargs)

    def _ddim_step(self, model_output, timestep, sample, eta: float = 0.0, *args: Any, **kwargs: Any):
        ratio = self.noise_ratio(timestep, eta) if eta > 0 else None
        if ratio is None:
            return self._original(model_output, timestep, sample, eta, *args, **kwargs)
        noise = kwargs.pop("variance_noise", None)
        generator = kwargs.pop("generator", None)
        if noise is None:  # the draw DDIM itself would make, so seeded runs stay comparable
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
        return self._original(
            model_output, timestep, sample, eta, *args, variance_noise=noise * ratio, **kwargs
        )

    def _ddpm_step(self, model_output, timestep, sample, *args: Any, **kwargs: Any):
        out = self._original(model_output, timestep, sample, *args, **kwargs)
        ratio = self.noise_ratio(timestep)
        if ratio is None:
            return out
        alpha_t, alpha_prev, _ = self._alphas(timestep)
        tuple_out = isinstance(out, tuple)
        prev, x0 = (out[0], out[1]) if tuple_out else (out.prev_sample, out.pred_original_sample)
        # The noiseless mean from the step's own (clipped) x0: only the noise term is rescaled.
        beta = 1.0 - alpha_t / alpha_prev
        mean = (math.sqrt(alpha_prev) * beta / (1.0 - alpha_t)) * x0 + (
            math.sqrt(1.0 - beta) * (1.0 - alpha_prev) / (1.0 - alpha_t)
        ) * sample
        prev = mean + (prev - mean) * ratio
        if tuple_out:
            return (prev, *out[1:])
        out.prev_sample = prev
        return out

    def remove(self) -> None:
        """Restore the scheduler's own `step` (idempotent)."""
        if getattr(self.scheduler, _MARK, None) is self:
            del self.scheduler.step  # the instance attribute; the class method shows through again
            delattr(self.scheduler, _MARK)

    def __enter__(self) -> NoiseAbsorption:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def absorb_quantization_noise(pipe: Any) -> NoiseAbsorption:
    """Lower `pipe.scheduler`'s added noise by the quantized UNet's uncorrelated noise (PTQD).

    Needs a UNet quantized with `bias_correction="output"` (its fitted `residual_var`) and a DDPM or DDIM
    scheduler; with DDIM it acts only when the pipeline is called with eta > 0. Returns a handle:
    `handle.remove()` or `with absorb_quantization_noise(pipe): ...`. Swapping `pipe.scheduler` drops it.
    """
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"{type(pipe).__name__} has no `unet` module to read the output correction from")
    correction = getattr(unet, OUTPUT_CORRECTION_ATTR, None)
    if not isinstance(correction, OutputCorrection):
        raise ValueError(
            "the pipeline's UNet has no output correction: quantize it with bias_correction='output' "
            "(the default recipe) to absorb its quantization noise"
        )
    return NoiseAbsorption(pipe.scheduler, correction)
