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

# Written out, not imported from config._SECTIONS: an independent list, so a section the config drops or
# adds fails test_config_serialization's to_dict key check instead of silently leaving the tests.
SECTIONS = {
    "weights": WeightQuantConfig,
    "activations": ActivationQuantConfig,
    "calibration": CalibrationConfig,
    "layers": LayerSelectionConfig,
    "selection": SelectionConfig,
    "group_search": GroupSearchConfig,
    "reconstruction": ReconstructionConfig,
}
