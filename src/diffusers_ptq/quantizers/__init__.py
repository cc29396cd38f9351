"""Quantizer modules: weights (per channel / per tensor) and timestep-aware activations."""

from diffusers_ptq.quantizers.activation import (
    TimestepActQuantizer,
    contiguous_group_map,
    nearest_step_group_map,
)
from diffusers_ptq.quantizers.bias import OutputCorrection, TimestepBiasTable
from diffusers_ptq.quantizers.observer import GroupObserver
from diffusers_ptq.quantizers.weight import WeightQuantizer

__all__ = [
    "GroupObserver",
    "OutputCorrection",
    "TimestepActQuantizer",
    "TimestepBiasTable",
    "WeightQuantizer",
    "contiguous_group_map",
    "nearest_step_group_map",
]
