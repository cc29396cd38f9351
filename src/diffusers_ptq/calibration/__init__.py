"""Calibration: capture from the pipeline's own loop, timestep samplers, sample selectors, the dataset."""

from diffusers_ptq.calibration import active  # noqa: F401 (registers the 'active' selector)
from diffusers_ptq.calibration.capture import capture, concat_calibration_sets
from diffusers_ptq.calibration.dataset import CalibrationSet
from diffusers_ptq.calibration.features import StepGrams, StepWeights, tdac_weights
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
from diffusers_ptq.calibration.selectors import (
    Selection,
    SelectionFeedback,
    SelectionRequest,
    allocate_samples,
    allocation_mask,
    available_selectors,
    register_sample_selector,
    select_calibration,
)

__all__ = [
    "CalibrationSet",
    "PipelineSpec",
    "Selection",
    "SelectionFeedback",
    "SelectionRequest",
    "StepGrams",
    "StepWeights",
    "allocate_samples",
    "allocation_mask",
    "available_samplers",
    "available_selectors",
    "capture",
    "concat_calibration_sets",
    "get_pipeline_spec",
    "planned_timesteps",
    "recording_mask",
    "register_sample_selector",
    "register_timestep_sampler",
    "select_calibration",
    "skew_normal_draws",
    "supported_pipelines",
    "tdac_weights",
]
