"""Activation ranges across timesteps, per layer: the figure that motivates timestep-aware quantization;
and, for a quantized UNet, its noise-prediction error per sampling step (SQNR and bias)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusers_ptq.benchmark.plotting import pyplot
from diffusers_ptq.benchmark.quality.sampling import (
    ddim_pipeline,
    ddim_text_pipeline,
    noise_errors_per_step,
    record_trajectory,
)
from diffusers_ptq.calibration import get_pipeline_spec
from diffusers_ptq.calibration.driver import CalibrationDriver, check_pipeline_kwargs
from diffusers_ptq.timestep import TimestepContext

_QUANTILE_SAMPLES = 65536


@dataclass
class ActivationRanges:
    """Input statistics of each Conv2d/Linear at each UNet call: tensors of shape (layers, calls)."""

    layers: list[str]
    timesteps: list[int]
    low: torch.Tensor
    high: torch.Tensor
    q_low: torch.Tensor  # 0.1th percentile
    q_high: torch.Tensor  # 99.9th percentile

    def variation(self) -> torch.Tensor:
        """Per layer: largest over smallest per-call range (max - min); 1 means timestep-independent."""
        width = (self.high - self.low).clamp_min(1e-12)
        return width.max(1).values / width.min(1).values

    def to_dict(self) -> dict[str, Any]:
        return {
            "timesteps": self.timesteps,
            "layers": {
                name: {
                    "min": self.low[i].tolist(),
                    "max": self.high[i].tolist(),
                    "p0.1": self.q_low[i].tolist(),
                    "p99.9": self.q_high[i].tolist(),
                }
                for i, name in enumerate(self.layers)
            },
        }


@torch.no_grad()
def record_activation_ranges(
    pipe: Any,
    *,
    prompts: list[str] | None = None,
    num_images: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    layers: str | None = None,
    seed: int = 0,
    pipeline_kwargs: dict[str, Any] | None = None,
) -> ActivationRanges:
    """Run `pipe` once (float) and record every Conv2d/Linear input range at each UNet call.

    `layers` is an optional regular expression on module names; text-conditioned pipelines need `prompts`
    (one image each). `pipeline_kwargs` (one dict: the pipeline runs once) are added to the call, as in
    `quantize_pipeline` (an init image and `strength`, a mask, a control image).
    """
    spec = get_pipeline_spec(pipe)
    if spec.text_conditioned and not prompts:
        raise ValueError(f"{spec.name} is text-conditioned: pass prompts to inspect it")
    if pipeline_kwargs is not None and not isinstance(pipeline_kwargs, dict):
        raise TypeError("pipeline_kwargs must be a dict here: the pipeline runs once, for every image")
    kwargs_list, _ = check_pipeline_kwargs(spec, pipeline_kwargs)
    count = len(prompts) if spec.text_conditioned else num_images
    driver = CalibrationDriver(
        spec, num_inference_steps, guidance_scale, prompts, kwargs_list, batch_size=count
    )
    pattern = re.compile(layers) if layers else None
    unet = pipe.unet
    modules = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear) and (pattern is None or pattern.search(name))
    }
    if not modules:
        raise ValueError(f"no Conv2d/Linear layer of the UNet matches layers={layers!r}")
    context = TimestepContext(pipe.scheduler.config.num_train_timesteps)
    stats: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    steps: list[int] = []
    generator = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.001, 0.999])

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().flatten()
            sub = x[torch.randint(0, x.numel(), (min(x.numel(), _QUANTILE_SAMPLES),), generator=generator)]
            q = torch.quantile(sub.cpu(), probs)
            stats[name].append(torch.stack([x.min().cpu(), x.max().cpu(), q[0], q[1]]))

        return hook

    def step_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        steps.append(int(context.timesteps[0]))

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    context.attach(unet)
    handles.append(unet.register_forward_pre_hook(step_hook, with_kwargs=True))  # runs after the context's
    try:
        driver.run(pipe, 0, count, torch.Generator().manual_seed(seed))
    finally:
        for handle in handles:
            handle.remove()
        context.detach(unet)
    table = torch.stack([torch.stack(stats[name]) for name in modules])  # (layers, calls, 4)
    return ActivationRanges(list(modules), steps, table[..., 0], table[..., 1], table[..., 2], table[..., 3])


def plot_activation_ranges(ranges: ActivationRanges, path: str | Path, max_layers: int = 16) -> list[str]:
    """PNG grid of the `max_layers` layers whose range varies most across timesteps; returns their names."""
    plt = pyplot()
    order = ranges.variation().argsort(descending=True)[:max_layers].tolist()
    columns = min(4, len(order))
    rows = math.ceil(len(order) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.6 * rows), dpi=110, squeeze=False)
    t = ranges.timesteps
    for ax, i in zip(axes.flat, order):
        ax.fill_between(t, ranges.low[i], ranges.high[i], alpha=0.25, color="tab:blue", label="min–max")
        ax.plot(t, ranges.q_low[i], color="tab:blue", linewidth=1, label="0.1–99.9 %")
        ax.plot(t, ranges.q_high[i], color="tab:blue", linewidth=1)
        ax.set_title(f"{ranges.layers[i]}\n(range varies {float(ranges.variation()[i]):.1f}x)", fontsize=7)
        ax.invert_xaxis()
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(order) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("timestep (sampling runs left to right)", fontsize=8)
    fig.supylabel("layer input value", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [ranges.layers[i] for i in order]


@torch.no_grad()
def noise_error_by_step(
    pipe: Any,
    quantized_unet: nn.Module,
    *,
    prompts: list[str] | None = None,
    num_images: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per DDIM step of the float `pipe`'s trajectory: `quantized_unet`'s noise SQNR (dB), MSE and bias.

    The bias of a step is `primitives.mean_error_rms`: the RMS over (C, H, W) of the per-element mean over
    the step's samples of eps_q - eps. Text-conditioned pipelines take one image per prompt.
    """
    spec = get_pipeline_spec(pipe)
    if spec.text_conditioned and not prompts:
        raise ValueError(f"{spec.name} is text-conditioned: pass prompts to inspect it")
    ddim = ddim_text_pipeline(pipe) if spec.text_conditioned else ddim_pipeline(pipe)
    count = len(prompts) if spec.text_conditioned else num_images
    trajectory = record_trajectory(ddim, count, seed, num_inference_steps, prompts, guidance_scale)
    errors = noise_errors_per_step(quantized_unet, trajectory)
    return {
        "timesteps": [int(t) for t in trajectory.timesteps.tolist()],
        "sqnr_db": errors.sqnr,
        "mse": errors.mse,
        "bias": errors.bias,
    }


def plot_noise_error(steps: dict[str, list[float]], path: str | Path) -> None:
    """PNG: noise SQNR (top) and noise bias (bottom, log scale) per sampling step."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), dpi=110, sharex=True)
    t = steps["timesteps"]
    top.plot(t, steps["sqnr_db"], marker=".", color="tab:blue")
    top.set_ylabel("noise SQNR vs float (dB)", fontsize=8)
    bottom.plot(t, steps["bias"], marker=".", color="tab:red")
    bottom.set_yscale("log")
    bottom.set_ylabel("bias: RMS of E_samples[eps_q - eps]", fontsize=8)
    bottom.set_xlabel("timestep (sampling runs left to right)", fontsize=8)
    top.invert_xaxis()  # shared with the bottom axis
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
