"""Which diffusers pipelines are supported, and how each one is run for calibration."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel


@dataclass(frozen=True)
class PipelineSpec:
    """How to drive one pipeline class: text-conditioned or not, and which output skips decoding."""

    name: str
    text_conditioned: bool
    output_type: str

    def run(
        self,
        pipe: Any,
        trajectories: list[str] | int,
        num_inference_steps: int,
        guidance_scale: float | None,
        generator: torch.Generator,
    ) -> None:
        kwargs: dict[str, Any] = {
            "num_inference_steps": num_inference_steps,
            "generator": generator,
            "output_type": self.output_type,
        }
        if self.text_conditioned:
            kwargs["prompt"] = list(trajectories)
            if guidance_scale is not None:
                kwargs["guidance_scale"] = guidance_scale
        else:
            kwargs["batch_size"] = int(trajectories)
        pipe(**kwargs)


# Keyed by the diffusers class name, so importing this module does not import the Stable Diffusion pipeline
# modules (they pull in transformers' image processors, which print notices about torchvision).
_SPECS: dict[str, PipelineSpec] = {
    spec.name: spec
    for spec in (
        PipelineSpec("DDPMPipeline", text_conditioned=False, output_type="np"),
        PipelineSpec("DDIMPipeline", text_conditioned=False, output_type="np"),
        PipelineSpec("StableDiffusionPipeline", text_conditioned=True, output_type="latent"),
        PipelineSpec("StableDiffusionXLPipeline", text_conditioned=True, output_type="latent"),
    )
}
SUPPORTED_UNETS = (UNet2DModel, UNet2DConditionModel)


def supported_pipelines() -> list[str]:
    return [spec.name for spec in _SPECS.values()]


def spec_for_class_name(name: str) -> PipelineSpec | None:
    """The spec of the supported pipeline class called `name` (as in a model_index.json), else None."""
    return _SPECS.get(name)


def get_pipeline_spec(pipe: Any) -> PipelineSpec:
    """The spec of `pipe`'s class; TypeError naming the supported pipelines and UNets otherwise."""
    cls = type(pipe)
    # The class itself, as diffusers defines it: subclasses and look-alikes are not supported.
    spec = _SPECS.get(cls.__name__) if cls.__module__.startswith("diffusers.") else None
    if spec is None:
        raise TypeError(
            f"{type(pipe).__name__} is not supported; supported pipelines: {', '.join(supported_pipelines())}"
        )
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, SUPPORTED_UNETS):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_UNETS)
        raise TypeError(f"{spec.name}.unet is a {type(unet).__name__}; supported denoisers: {names}")
    return spec


def default_call_arg(pipe: Any, name: str) -> Any:
    """The default of `pipe.__call__`'s argument `name` (e.g. num_inference_steps, guidance_scale)."""
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def planned_timesteps(pipe: Any, num_inference_steps: int) -> torch.Tensor:
    """The timestep of every UNet call one pipeline run will make, from a copy of its scheduler."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps.detach().cpu().clone()
