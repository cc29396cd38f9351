"""Paired sampling for the quality benchmark: identical start noise for every row, float trajectories.

Every image i of seed s starts from noise drawn by its own generator (seeded from s and i), so a row's images
do not depend on the batch size, and float and quantized rows are compared on the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from tqdm.auto import tqdm

from diffusers_ptq.primitives import sqnr_db

_SEED_STRIDE = 1_000_003  # a prime well above any sample count, so (seed, index) pairs never collide
# Above any calibration seed: calibration trajectories (seeded with small integers) never reuse an
# evaluation image's noise.
_NOISE_BASE = 1 << 40


def image_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image: image i of seed s always gets the same noise."""
    base = _NOISE_BASE + seed * _SEED_STRIDE
    return [torch.Generator().manual_seed(base + i) for i in range(start, start + count)]


def ddim_pipeline(pipe: DDIMPipeline | object) -> DDIMPipeline:
    """An unconditional pipeline's UNet with a DDIM scheduler built from its own scheduler config."""
    scheduler = pipe.scheduler
    if not isinstance(scheduler, DDIMScheduler):
        scheduler = DDIMScheduler.from_config(scheduler.config)
    return DDIMPipeline(unet=pipe.unet, scheduler=scheduler)


@torch.no_grad()
def sample_images(
    pipe: DDIMPipeline,
    num_images: int,
    seed: int,
    num_inference_steps: int,
    batch_size: int,
    desc: str = "sample",
    progress: bool = True,
) -> torch.Tensor:
    """(N, C, H, W) float32 images in [-1, 1], DDIM with eta = 0 (deterministic given the noise)."""
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    for start in tqdm(range(0, num_images, batch_size), desc=desc, disable=not progress, leave=False):
        count = min(batch_size, num_images - start)
        out = pipe(
            batch_size=count,
            generator=image_generators(seed, start, count),
            num_inference_steps=num_inference_steps,
            eta=0.0,
            output_type="np",
        ).images
        chunks.append(torch.from_numpy(np.asarray(out, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(chunks)


@dataclass
class Trajectory:
    """Float UNet inputs and outputs at every sampling step: x_t (S, N, C, H, W), eps (S, N, C, H, W)."""

    timesteps: torch.Tensor
    samples: torch.Tensor
    noise_pred: torch.Tensor


@torch.no_grad()
def record_trajectory(pipe: DDIMPipeline, num_images: int, seed: int, num_inference_steps: int) -> Trajectory:
    """Run the float pipeline once and keep what its UNet saw and predicted at each step."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append((torch.as_tensor(timestep).reshape(-1)[:1].cpu(), sample.cpu(), output.sample.cpu()))

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        pipe(
            batch_size=num_images,
            generator=image_generators(seed, 0, num_images),
            num_inference_steps=num_inference_steps,
            eta=0.0,
            output_type="np",
        )
    finally:
        handle.remove()
    return Trajectory(
        timesteps=torch.cat([t for t, _, _ in seen]),
        samples=torch.stack([x for _, x, _ in seen]),
        noise_pred=torch.stack([e for _, _, e in seen]),
    )


@torch.no_grad()
def noise_error_per_step(unet: torch.nn.Module, trajectory: Trajectory) -> tuple[list[float], list[float]]:
    """Per-step (MSE, SQNR dB) of `unet`'s noise prediction against the float one on the float trajectory."""
    mse, sqnr = [], []
    param = next(unet.parameters())
    for t, x, eps in zip(trajectory.timesteps, trajectory.samples, trajectory.noise_pred):
        pred = unet(x.to(param.device, param.dtype), t.to(param.device)).sample.float().cpu()
        mse.append(float((pred - eps).pow(2).mean()))
        sqnr.append(sqnr_db(eps, pred))
    return mse, sqnr


def pooled_sqnr_db(trajectory: Trajectory, mse: list[float]) -> float:
    """SQNR over all steps pooled: total signal power over total error power."""
    signal = float(trajectory.noise_pred.double().pow(2).mean())
    noise = float(np.mean(mse))
    return float("inf") if noise == 0 else 10.0 * float(np.log10(signal / noise))
