"""How calibration calls the pipeline, and the stub pass that plans the timesteps those calls give the UNet.

A `CalibrationDriver` runs one chunk of calibration trajectories: the pipeline's own `__call__` with the
project's arguments (prompts cycled, steps, guidance, a generator) plus the user's `pipeline_kwargs` (one
dict for every call, or a list cycled one trajectory per call), or the user's own `calibration_fn(pipe)`.

`plan_unet_calls` runs the driver once with the UNet's forward replaced by a stub returning zeros: the
pipeline's loop, scheduler and extra models (ControlNet, VAE encoder for img2img) run as they will, but no
UNet compute is spent, and the timestep of every UNet call is the plan the capture checks against. So
truncated schedules (img2img `strength`), custom ones (`timesteps=` / `sigmas=`) and few-step LCM schedules
are planned from what the pipeline really calls.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from tqdm.auto import tqdm

from diffusers_ptq import distributed
from diffusers_ptq.calibration.pipelines import PipelineSpec

# Arguments calibration sets itself, and what a user sets instead of passing them in pipeline_kwargs.
OWN_ARGUMENTS = {
    "prompt": "prompts=",
    "num_inference_steps": "num_inference_steps=",
    "generator": "generator=",
    "latents": "generator= (calibration draws fresh noise for every trajectory)",
    "output_type": "nothing: calibration stops the pipeline before decoding",
    "return_dict": "nothing: calibration does not read the pipeline's output",
    "batch_size": "batch_size= (trajectories per pipeline call)",
    "num_images_per_prompt": "num_samples= with prompts= (prompts are cycled with fresh noise)",
    "guidance_scale": "guidance_scale=",
}


def check_pipeline_kwargs(
    spec: PipelineSpec, pipeline_kwargs: dict[str, Any] | list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]] | None, bool]:
    """Validated `pipeline_kwargs` as a list, and whether it is per trajectory (a list was given)."""
    if pipeline_kwargs is None:
        return None, False
    per_trajectory = isinstance(pipeline_kwargs, list | tuple)
    items = list(pipeline_kwargs) if per_trajectory else [pipeline_kwargs]
    if not items or not all(isinstance(item, dict) for item in items):
        raise TypeError("pipeline_kwargs must be a dict, or a non-empty list of dicts (one per trajectory)")
    keys = set(items[0])
    for i, item in enumerate(items[1:], start=1):
        if set(item) != keys:
            raise ValueError(
                f"pipeline_kwargs[{i}] has keys {sorted(item)} but pipeline_kwargs[0] has {sorted(keys)}; "
                "every per-trajectory dict must set the same arguments"
            )
    for key in sorted(keys):
        if key in OWN_ARGUMENTS:
            raise ValueError(
                f"pipeline_kwargs sets {key!r}, which calibration sets itself; use "
                f"{OWN_ARGUMENTS[key]} instead"
            )
        if not spec.accepts(key):
            raise TypeError(
                f"pipeline_kwargs sets {key!r}, but {spec.name}.__call__ takes no argument {key!r}"
            )
    return [dict(item) for item in items], per_trajectory


@dataclass
class CalibrationDriver:
    """Runs calibration trajectories `start .. start + count` as one pipeline call (or one calibration_fn)."""

    spec: PipelineSpec
    num_inference_steps: int
    guidance_scale: float | None = None
    prompts: list[str] | None = None
    pipeline_kwargs: list[dict[str, Any]] | None = None
    per_trajectory: bool = False
    calibration_fn: Callable[[Any], Any] | None = None
    batch_size: int = 1
    fn_rows: int = 1  # with calibration_fn: UNet batch rows per call (each row is one trajectory)

    @property
    def chunk(self) -> int:
        """Trajectories one run covers."""
        if self.calibration_fn is not None:
            return self.fn_rows
        if self.per_trajectory or self.spec.max_batch == 1:
            return 1
        return self.batch_size

    def prompts_for(self, start: int, count: int) -> list[str] | None:
        """`count` prompts from trajectory `start`, cycling (each repeat gets fresh noise)."""
        if self.prompts is None:
            return None
        return [self.prompts[(start + i) % len(self.prompts)] for i in range(count)]

    def run(self, pipe: Any, start: int, count: int, generator: torch.Generator) -> Any:
        """The pipeline's output for these trajectories (None with a calibration_fn)."""
        if self.calibration_fn is not None:
            with torch.no_grad():  # a function that calls the UNet itself builds no autograd graph
                self.calibration_fn(pipe)
            return None
        extra = None
        if self.pipeline_kwargs is not None:
            extra = self.pipeline_kwargs[start % len(self.pipeline_kwargs)]
        trajectories = self.prompts_for(start, count) if self.spec.text_conditioned else count
        return self.spec.run(
            pipe, trajectories, self.num_inference_steps, self.guidance_scale, generator, extra
        )


@contextlib.contextmanager
def quiet_pipeline(pipe: Any) -> Iterator[None]:
    """Silence the pipeline's own progress bar (calibration shows its own), restoring it afterwards."""
    saved_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = saved_bar_config


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


class _Stub:
    """Stands in for `unet.forward`: records each call's timestep and batch, returns zeros."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.signature = inspect.signature(unet.forward)
        self.out_channels = int(unet.config.out_channels)
        self.output_class = UNet2DOutput if isinstance(unet, UNet2DModel) else UNet2DConditionOutput
        self.timesteps: list[torch.Tensor] = []
        self.rows: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs).arguments
        sample = bound["sample"]
        self.timesteps.append(torch.as_tensor(bound["timestep"]).reshape(-1)[0].detach().cpu())
        self.rows.append(int(sample.shape[0]))
        out = sample.new_zeros(sample.shape[0], self.out_channels, *sample.shape[2:])
        return self.output_class(sample=out) if bound.get("return_dict", True) else (out,)


@contextlib.contextmanager
def zero_forward(unet: torch.nn.Module) -> Iterator[None]:
    """The UNet's forward replaced by a zero stub (its hooks still run); restored afterwards."""
    had_own = "forward" in unet.__dict__
    saved = unet.__dict__.get("forward")
    unet.forward = _Stub(unet)
    try:
        yield
    finally:
        if had_own:
            unet.forward = saved
        else:
            del unet.forward


@torch.no_grad()
def split_pipeline_calls(
    pipe: Any,
    total: int,
    chunk: int,
    call: Callable[[int, int], Any],
    rows: Callable[[Any], torch.Tensor],
    what: str,
    progress: bool = False,
) -> torch.Tensor:
    """`rows(call(start, count))` for every `chunk` of `total` samples, concatenated in order.

    Under a process group each rank makes a contiguous share of the calls and still makes the others with
    the UNet replaced by a zero stub, so a generator `call` draws from advances as one process's would;
    the shares are gathered in rank order, so every rank returns what one process would. A failure on any
    rank is raised on every rank.
    """
    starts = range(0, total, chunk)
    mine = distributed.own_share(len(starts), f"{what} calls", allow_empty=True)
    outs = []
    with distributed.hold_failure() as failed, quiet_pipeline(pipe):
        for run, start in enumerate(tqdm(starts, desc=what, unit="call", disable=not progress)):
            count = min(chunk, total - start)
            if run in mine:
                outs.append(rows(call(start, count)))
            else:
                with zero_forward(pipe.unet):
                    call(start, count)
    local = torch.cat(outs) if outs else None
    return distributed.gather_rows(local, what, failed.error)


@torch.no_grad()
def plan_unet_calls(
    pipe: Any, driver: CalibrationDriver, generator: torch.Generator
) -> tuple[torch.Tensor, list[int]]:
    """Timestep of every UNet call one driver run makes (trajectory 0), and each call's batch rows.

    The UNet is replaced by a zero stub for the run; ValueError if it is never called.
    """
    unet = pipe.unet
    stub = _Stub(unet)
    had_own = "forward" in unet.__dict__
    saved = unet.__dict__.get("forward")
    # The stub calls are not UNet calls: the UNet's own forward hooks (a user's, the capture's) skip them.
    hooks = {name: getattr(unet, name) for name in _HOOK_DICTS}
    for name in _HOOK_DICTS:
        setattr(unet, name, type(hooks[name])())
    unet.forward = stub
    try:
        with quiet_pipeline(pipe):
            driver.run(pipe, 0, 1 if driver.calibration_fn is None else driver.fn_rows, generator)
    finally:
        if had_own:
            unet.forward = saved
        else:
            del unet.forward
        for name, value in hooks.items():
            setattr(unet, name, value)
    if not stub.timesteps:
        if driver.calibration_fn is not None:
            raise ValueError("calibration_fn ran the pipeline but the UNet was never called")
        raise ValueError(f"{driver.spec.name} ran but never called its UNet; nothing to calibrate")
    return torch.stack(stub.timesteps), stub.rows
