"""Paired sampling for the quality benchmark: identical start noise for every row, float trajectories.

Every image i of seed s starts from noise drawn by its own generator (seeded from s and i), so a row's images
do not depend on the batch size, and float and quantized rows are compared on the same noise. Text-to-image
pipelines get the same treatment: image i starts from the same latents and is generated from prompt
i mod len(prompts) in every row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from tqdm.auto import tqdm

from diffusers_ptq.primitives import mean_error_rms, sqnr_db

_SEED_STRIDE = 1_000_003  # a prime well above any sample count, so (seed, index) pairs never collide
# Above any calibration seed: calibration trajectories (seeded with small integers) never reuse an
# evaluation image's noise.
_NOISE_BASE = 1 << 40
# UNet call arguments that are not conditioning (the sample and timestep are stored on their own).
_NOT_CONDITIONING = ("sample", "timestep", "return_dict")


def image_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image: image i of seed s always gets the same noise."""
    base = _NOISE_BASE + seed * _SEED_STRIDE
    return [torch.Generator().manual_seed(base + i) for i in range(start, start + count)]


def image_prompts(prompts: list[str], start: int, count: int) -> list[str]:
    """The prompts of images start .. start + count - 1: image i uses prompt i mod len(prompts)."""
    return [prompts[i % len(prompts)] for i in range(start, start + count)]


def _ddim(scheduler: Any) -> DDIMScheduler:
    return scheduler if isinstance(scheduler, DDIMScheduler) else DDIMScheduler.from_config(scheduler.config)


def ddim_pipeline(pipe: DDIMPipeline | object) -> DDIMPipeline:
    """An unconditional pipeline's UNet with a DDIM scheduler built from its own scheduler config."""
    return DDIMPipeline(unet=pipe.unet, scheduler=_ddim(pipe.scheduler))


def ddim_text_pipeline(pipe: Any) -> Any:
    """A text-to-image pipeline sharing `pipe`'s modules, with a DDIM scheduler and no safety checker.

    A shallow copy (not the class constructor) keeps options the constructor would reset, e.g. SDXL's
    watermarker. The safety checker is dropped because it blacks out images independently of the UNet,
    which would make rows differ for reasons other than quantization (and distort CLIP scores).
    """
    out = copy.copy(pipe)  # setting a module below re-registers it in the copy's own config only
    out.scheduler = _ddim(pipe.scheduler)
    if getattr(out, "safety_checker", None) is not None:
        out.safety_checker = None
    return out


def fresh_pipeline(pipe: Any) -> Any:
    """`pipe` with its own copy of the UNet and scheduler (to be quantized); other modules are shared."""
    if isinstance(pipe, DDIMPipeline):
        return DDIMPipeline(unet=copy.deepcopy(pipe.unet), scheduler=copy.deepcopy(pipe.scheduler))
    out = copy.copy(pipe)
    out.unet = copy.deepcopy(pipe.unet)
    out.scheduler = copy.deepcopy(pipe.scheduler)
    return out


def _call_kwargs(
    seed: int, start: int, count: int, steps: int, prompts: list[str] | None, guidance_scale: float | None
) -> dict[str, Any]:
    """Arguments of one pipeline call for images start .. start + count - 1, DDIM with eta = 0."""
    kwargs: dict[str, Any] = {
        "generator": image_generators(seed, start, count),
        "num_inference_steps": steps,
        "eta": 0.0,
        "output_type": "np",
    }
    if prompts is None:
        kwargs["batch_size"] = count
    else:
        kwargs["prompt"] = image_prompts(prompts, start, count)
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
    return kwargs


@torch.no_grad()
def sample_images(
    pipe: Any,
    num_images: int,
    seed: int,
    num_inference_steps: int,
    batch_size: int,
    desc: str = "sample",
    progress: bool = True,
    prompts: list[str] | None = None,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """(N, C, H, W) float32 images in [-1, 1], DDIM with eta = 0 (deterministic given the noise).

    With `prompts` (text-to-image pipelines) image i is generated from prompt i mod len(prompts), with
    classifier-free guidance `guidance_scale` (None: the pipeline's default).
    """
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    for start in tqdm(range(0, num_images, batch_size), desc=desc, disable=not progress, leave=False):
        count = min(batch_size, num_images - start)
        kwargs = _call_kwargs(seed, start, count, num_inference_steps, prompts, guidance_scale)
        out = pipe(**kwargs).images
        chunks.append(torch.from_numpy(np.asarray(out, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(chunks)


@dataclass
class Trajectory:
    """Float UNet inputs and outputs at every sampling step: x_t (S, N, C, H, W), eps (S, N, C, H, W).

    `conditioning[s]` holds step s's other UNet keyword arguments (encoder_hidden_states, SDXL's
    added_cond_kwargs, ...), empty for unconditional UNets. With classifier-free guidance N counts both
    halves (unconditional and text), as the UNet sees them.
    """

    timesteps: torch.Tensor
    samples: torch.Tensor
    noise_pred: torch.Tensor
    conditioning: list[dict[str, Any]] = field(default_factory=list)


class _CpuCopies:
    """CPU copies of tensors, made once per tensor object: the prompt embeddings a pipeline passes at every
    step are one tensor, so they are stored once rather than once per step."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            hit = self._seen.get(id(value))
            if hit is None or hit[0] is not value:  # keeping the original alive keeps its id unique
                hit = (value, value.detach().cpu())
                self._seen[id(value)] = hit
            return hit[1]
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list | tuple):  # ControlNet / T2I-Adapter residuals
            return type(value)(self(v) for v in value)
        return value


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device, dtype) for v in value)
    return value


@torch.no_grad()
def record_trajectory(
    pipe: Any,
    num_images: int,
    seed: int,
    num_inference_steps: int,
    prompts: list[str] | None = None,
    guidance_scale: float | None = None,
) -> Trajectory:
    """Run the float pipeline once and keep what its UNet saw and predicted at each step.

    `prompts` and `guidance_scale` as in `sample_images`: images 0 .. num_images - 1 of `seed`.
    """
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]] = []
    cpu = _CpuCopies()

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        conditioning = {k: cpu(v) for k, v in kwargs.items() if k not in _NOT_CONDITIONING}
        if len(args) > 2:  # UNet2DConditionModel's third positional argument
            conditioning["encoder_hidden_states"] = cpu(args[2])
        eps = output[0] if isinstance(output, tuple) else output.sample  # pipelines pass return_dict=False
        step = torch.as_tensor(timestep).reshape(-1)[:1].cpu()
        seen.append((step, sample.cpu(), eps.cpu(), conditioning))

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        pipe(**_call_kwargs(seed, 0, num_images, num_inference_steps, prompts, guidance_scale))
    finally:
        handle.remove()
    return Trajectory(
        timesteps=torch.cat([t for t, _, _, _ in seen]),
        samples=torch.stack([x for _, x, _, _ in seen]),
        noise_pred=torch.stack([e for _, _, e, _ in seen]),
        conditioning=[c for _, _, _, c in seen],
    )


@dataclass
class NoiseErrors:
    """Per sampling step: MSE, SQNR (dB) and bias (`mean_error_rms`) of a noise prediction vs float."""

    mse: list[float]
    sqnr: list[float]
    bias: list[float]


@torch.no_grad()
def noise_errors_per_step(unet: torch.nn.Module, trajectory: Trajectory) -> NoiseErrors:
    """`unet`'s noise prediction against the float one on the float trajectory, step by step.

    The bias of a step is `mean_error_rms` over that step's UNet batch: the RMS over (C, H, W) of the
    per-element mean over samples of eps_q - eps (with classifier-free guidance the batch holds both halves).
    """
    out = NoiseErrors([], [], [])
    param = next(unet.parameters())
    conditioning = trajectory.conditioning or [{}] * len(trajectory.timesteps)
    steps = zip(trajectory.timesteps, trajectory.samples, trajectory.noise_pred, conditioning)
    for t, x, eps, cond in steps:
        kwargs = _to(cond, param.device, param.dtype)
        pred = unet(x.to(param.device, param.dtype), t.to(param.device), **kwargs).sample.float().cpu()
        out.mse.append(float((pred - eps).pow(2).mean()))
        out.sqnr.append(sqnr_db(eps, pred))
        out.bias.append(mean_error_rms(eps, pred))
    return out


def noise_error_per_step(unet: torch.nn.Module, trajectory: Trajectory) -> tuple[list[float], list[float]]:
    """Per-step (MSE, SQNR dB) of `unet`'s noise prediction against the float one on the float trajectory."""
    errors = noise_errors_per_step(unet, trajectory)
    return errors.mse, errors.sqnr


def pooled_sqnr_db(trajectory: Trajectory, mse: list[float]) -> float:
    """SQNR over all steps pooled: total signal power over total error power."""
    signal = float(trajectory.noise_pred.double().pow(2).mean())
    noise = float(np.mean(mse))
    return float("inf") if noise == 0 else 10.0 * float(np.log10(signal / noise))
