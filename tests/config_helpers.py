"""Shared by the config tests: every nested section of PTQConfig, by field name."""

from __future__ import annotations

from diffusers_ptq.config import (
    ActivationQuantConfig,
    CalibrationConfig,
    GroupSearchConfig,
    LayerSelectionConfig,
    SelectionConfig,
    WeightQuantConfig,
)
from diffusers_ptq.reconstruction import ReconstructionConfig

SECTIONS = {
    "weights": WeightQuantConfig,
    "activations": ActivationQuantConfig,
    "calibration": CalibrationConfig,
    "layers": LayerSelectionConfig,
    "selection": SelectionConfig,
    "group_search": GroupSearchConfig,
    "reconstruction": ReconstructionConfig,
}
