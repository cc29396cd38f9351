"""Calibration: capture from the pipeline's own loop, timestep samplers, and the recorded dataset."""

from diffusers_ptq.calibration.capture import capture
from diffusers_ptq.calibration.dataset import CalibrationSet
from diffusers_ptq.calibration.pipelines import (
    PipelineSpec,
    get_pipeline_spec,
    planned_timesteps,
    supported_pipelines,
)
from diffusers_ptq.calibration.samplers import (
    available_samplers,
    recording_mask,
    register_timestep_sampler,
    skew_normal_draws,
)

__all__ = [
    "CalibrationSet",
    "PipelineSpec",
    "available_samplers",
    "capture",
    "get_pipeline_spec",
    "planned_timesteps",
    "recording_mask",
    "register_timestep_sampler",
    "skew_normal_draws",
    "supported_pipelines",
]
