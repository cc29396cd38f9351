"""What the group search regresses to: the paper's noise target, or the float UNet's prediction.

- "noise" (APQ-DM, Eq. 7): clean images x_0 sampled once from the float pipeline are forward-diffused at
  the calibration timesteps, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, and the quantized UNet must predict
  what the scheduler's parameterisation asks for (eps, v or x_0). Unconditional DDPM/DDIM pipelines only.
- "float": the captured x_t (and conditioning) as they are, with the float UNet's own output as target;
  works for every pipeline, text-to-image included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from diffusers_ptq import distributed
from diffusers_ptq.calibration import CalibrationSet, PipelineSpec
from diffusers_ptq.calibration.driver import split_pipeline_calls
from diffusers_ptq.initialise import float_mode

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _prediction_type(scheduler: Any) -> str:
    return getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")


def prediction(out: Any) -> torch.Tensor:
    """The tensor a diffusers UNet returns (`.sample`, first tuple item, or the tensor itself)."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple | list):
        return out[0]
    return out


def resolve_target(target: str, spec: PipelineSpec | None, scheduler: Any | None) -> str:
    """'auto' -> 'noise' for unconditional pipelines with a DDPM-style scheduler, else 'float'.

    An explicit 'noise' that cannot work raises ValueError before any model runs.
    """
    noise_ok = (
        spec is not None
        and not spec.text_conditioned
        and scheduler is not None
        and hasattr(scheduler, "add_noise")
        and hasattr(scheduler, "alphas_cumprod")
        and _prediction_type(scheduler) in PREDICTION_TYPES
    )
    if target == "auto":
        return "noise" if noise_ok else "float"
    if target == "noise" and not noise_ok:
        raise ValueError(
            "group_search.target='noise' needs an unconditional DDPM/DDIM pipeline whose scheduler predicts "
            f"one of {PREDICTION_TYPES} (it forward-diffuses clean images with the scheduler); expected "
            "'float' (or 'auto') for this pipeline or for quantize_unet"
        )
    return target


@torch.no_grad()
def sample_clean_images(
    pipe: Any,
    num_images: int,
    num_inference_steps: int,
    batch_size: int,
    generator: torch.Generator,
    progress: bool,
) -> torch.Tensor:
    """`num_images` x_0 in the model's [-1, 1] space from the float pipeline (DDPM/DDIM pipelines).

    Under a process group the ranks share the pipeline calls (`split_pipeline_calls`); every rank returns
    the one-process images.
    """

    def call(start: int, count: int) -> Any:
        return pipe(
            batch_size=count,
            num_inference_steps=num_inference_steps,
            generator=generator,
            output_type="np",
        )

    def clean(out: Any) -> torch.Tensor:
        # The pipelines map x_0 to images by (x / 2 + 0.5).clamp(0, 1): invert that.
        return torch.from_numpy(np.asarray(out.images)).permute(0, 3, 1, 2).float() * 2 - 1

    return split_pipeline_calls(
        pipe, num_images, batch_size, call, clean, "group search: clean images", progress
    )


class FloatTargets:
    """Captured inputs; the target is the float UNet's output (computed once per row, cached on the CPU)."""

    def __init__(self, unet: nn.Module, batch_size: int) -> None:
        self.unet, self.batch_size = unet, batch_size
        self.cache: torch.Tensor | None = None

    @torch.no_grad()
    def prepare(self, data: CalibrationSet) -> None:
        """Compute float outputs for the rows of `data` not seen yet (rows are only ever appended). Under a
        process group each rank computes a contiguous share of the new rows and every rank keeps them all."""
        done = 0 if self.cache is None else self.cache.shape[0]
        if done >= len(data):
            return
        part = distributed.own_share(len(data) - done, allow_empty=True)
        param = next(self.unet.parameters())
        outs = []
        with float_mode(self.unet), distributed.hold_failure() as failed:
            for s in range(done + part.start, done + part.stop, self.batch_size):
                rows = slice(s, min(s + self.batch_size, done + part.stop))
                out = self.unet(**data.unet_kwargs(rows, param.device, param.dtype))
                outs.append(prediction(out).float().cpu())
        local = torch.cat(outs) if outs else None
        new = distributed.gather_rows(local, "group search: float targets", failed.error)
        self.cache = new if self.cache is None else torch.cat([self.cache, new])

    def batch(
        self,
        data: CalibrationSet,
        index: torch.Tensor,
        generator: torch.Generator,
        keep: torch.Tensor | None = None,
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """UNet inputs and targets of the rows `index` (only the positions `keep` of them, if given)."""
        param = next(self.unet.parameters())
        index = index if keep is None else index[keep]
        return data.unet_kwargs(index, param.device, param.dtype), self.cache[index].to(param.device)


class NoiseTargets:
    """Clean images forward-diffused at the rows' timesteps; the target is what the scheduler predicts."""

    def __init__(self, unet: nn.Module, scheduler: Any, images: torch.Tensor) -> None:
        self.unet, self.scheduler, self.images = unet, scheduler, images
        self.prediction_type = _prediction_type(scheduler)
        if self.prediction_type not in PREDICTION_TYPES:  # resolve_target checks this before any work
            raise ValueError(f"group_search.target='noise' cannot handle {self.prediction_type=}")

    def prepare(self, data: CalibrationSet) -> None:
        pass

    def batch(
        self,
        data: CalibrationSet,
        index: torch.Tensor,
        generator: torch.Generator,
        keep: torch.Tensor | None = None,
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Inputs and targets of the rows `index`; with `keep`, only those positions of them (the random
        draws are made for the whole batch, so every rank of a group draws alike)."""
        param = next(self.unet.parameters())
        x0 = self.images[torch.randint(len(self.images), (len(index),), generator=generator)]
        eps = torch.randn(x0.shape, generator=generator)
        if keep is not None:
            index, x0, eps = index[keep], x0[keep], eps[keep]
        kwargs = data.unet_kwargs(index, param.device, param.dtype)
        t = data.train_timesteps[index]
        x_t = self.scheduler.add_noise(x0, eps, t)
        if self.prediction_type == "epsilon":
            target = eps
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, eps, t)
        else:
            target = x0
        kwargs["sample"] = x_t.to(param.device, param.dtype)
        return kwargs, target.to(param.device)
