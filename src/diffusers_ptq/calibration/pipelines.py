"""How a diffusers pipeline is driven for calibration, read from its `__call__` signature.

Any pipeline object whose `unet` is a UNet2DModel or UNet2DConditionModel (subclasses included) is
supported: text-conditioned when `__call__` takes `prompt`, batched through `prompt` / `batch_size` /
`num_images_per_prompt` (whichever it takes first), stopped before decoding with `output_type="latent"` when
it decodes latents with a VAE. No class table: a user's own subclass is driven the same way.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

SUPPORTED_UNETS = (UNet2DModel, UNet2DConditionModel)

# Classes the test suite quantizes end to end; any other pipeline with a supported UNet works the same way.
TESTED_PIPELINES = (
    "DDPMPipeline",
    "DDIMPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionUpscalePipeline",
    "StableDiffusionDepth2ImgPipeline",
)


@dataclass(frozen=True)
class PipelineSpec:
    """How to call one pipeline class: conditioning, batching and the output that skips decoding."""

    name: str
    text_conditioned: bool
    output_type: str | None  # None: `__call__` takes no output_type
    batch_arg: str | None  # 'prompt', 'batch_size', 'num_images_per_prompt'; None: one trajectory a call
    parameters: frozenset[str] = frozenset()

    def accepts(self, name: str) -> bool:
        """Whether `__call__` names the argument (a catch-all **kwargs does not count: diffusers pipelines
        use it for deprecated arguments and drop the rest silently, so a misspelt one would be ignored)."""
        return name in self.parameters

    def call_kwargs(
        self,
        trajectories: list[str] | int,
        num_inference_steps: int,
        guidance_scale: float | None,
        generator: torch.Generator,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments of one calibration call over `trajectories` (prompts, or a count)."""
        kwargs: dict[str, Any] = dict(extra or {})
        kwargs["num_inference_steps"] = num_inference_steps
        if "generator" in self.parameters:
            kwargs["generator"] = generator
        if self.output_type is not None:
            kwargs["output_type"] = self.output_type
        if guidance_scale is not None and "guidance_scale" in self.parameters:
            kwargs["guidance_scale"] = guidance_scale
        count = len(trajectories) if self.text_conditioned else int(trajectories)
        if self.text_conditioned:
            kwargs["prompt"] = list(trajectories)
        elif self.batch_arg is not None:
            kwargs[self.batch_arg] = count
        elif count != 1:  # callers chunk by max_batch; this is a bug, not a user error
            raise RuntimeError(f"{self.name} takes no batch argument: run one trajectory per call")
        return kwargs

    @property
    def max_batch(self) -> int | None:
        """Trajectories one call can run (None: any number)."""
        return None if self.batch_arg is not None else 1

    def run(
        self,
        pipe: Any,
        trajectories: list[str] | int,
        num_inference_steps: int,
        guidance_scale: float | None,
        generator: torch.Generator,
        extra: dict[str, Any] | None = None,
    ) -> Any:
        """One pipeline call; returns what the pipeline returns (latents with a VAE, else np images)."""
        return pipe(**self.call_kwargs(trajectories, num_inference_steps, guidance_scale, generator, extra))


def _decodes_latents(cls: type) -> bool:
    """Whether the pipeline's components include a VAE (so its UNet runs in latent space)."""
    return "vae" in inspect.signature(cls.__init__).parameters


@functools.cache
def spec_for_class(cls: type) -> PipelineSpec:
    """The calling convention of pipeline class `cls`, read from its `__call__` signature."""
    params = inspect.signature(cls.__call__).parameters
    names = frozenset(n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    text = "prompt" in names
    batch_arg = next((a for a in ("prompt", "batch_size", "num_images_per_prompt") if a in names), None)
    output_type = None
    if "output_type" in names:
        output_type = "latent" if _decodes_latents(cls) else "np"
    return PipelineSpec(cls.__name__, text, output_type, batch_arg, names)


def supported_pipelines() -> list[str]:
    """Pipeline classes tested end to end; any pipeline whose `unet` is a UNet2DModel or
    UNet2DConditionModel (subclasses included) is supported."""
    return list(TESTED_PIPELINES)


def spec_for_class_name(name: str) -> PipelineSpec | None:
    """The spec of the diffusers pipeline class `name` (as in a model_index.json) if it has a `unet`."""
    import diffusers

    try:
        cls = getattr(diffusers, name, None)
    except (ImportError, RuntimeError):  # an optional backend the class needs is missing
        return None
    if not isinstance(cls, type) or "unet" not in inspect.signature(cls.__init__).parameters:
        return None
    return spec_for_class(cls)


def get_pipeline_spec(pipe: Any) -> PipelineSpec:
    """The spec of `pipe`; TypeError naming the supported denoisers when its `unet` is not one."""
    names = ", ".join(cls.__name__ for cls in SUPPORTED_UNETS)
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, SUPPORTED_UNETS) or not callable(pipe):
        what = "has no unet" if unet is None else f".unet is a {type(unet).__name__}"
        raise TypeError(
            f"{type(pipe).__name__} {what}; supported denoisers: {names} (any diffusers pipeline whose "
            f"`unet` is one of them, e.g. {', '.join(TESTED_PIPELINES[:4])})"
        )
    return spec_for_class(type(pipe))


def default_call_arg(pipe: Any, name: str) -> Any:
    """The default of `pipe.__call__`'s argument `name` (e.g. num_inference_steps, guidance_scale)."""
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def inference_steps(pipe: Any, num_inference_steps: int | None) -> int:
    """`num_inference_steps` as configured, else the default of `pipe.__call__`; ValueError if neither."""
    steps = num_inference_steps or default_call_arg(pipe, "num_inference_steps")
    if steps is None:
        raise ValueError(
            f"{type(pipe).__name__} has no default num_inference_steps; set calibration.num_inference_steps"
        )
    return steps


def planned_timesteps(pipe: Any, num_inference_steps: int) -> torch.Tensor:
    """The scheduler's own schedule for `num_inference_steps` (text-to-image pipelines call exactly this).

    Calibration plans from a stub run of the pipeline instead (planning.py), which also covers truncated
    (img2img `strength`) and custom (`timesteps=` / `sigmas=`) schedules.
    """
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps.detach().cpu().clone()
