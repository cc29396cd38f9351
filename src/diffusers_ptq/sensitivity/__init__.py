"""Per-layer sensitivity to quantization (a fast proxy for image quality) and mixed precision built on it."""

from diffusers_ptq.sensitivity.measure import StepErrors, calibrated_probe, measure_units
from diffusers_ptq.sensitivity.mixed import average_weight_bits, check_budget, choose_mixed_precision
from diffusers_ptq.sensitivity.report import SensitivityReport, UnitSensitivity
from diffusers_ptq.sensitivity.run import measure_sensitivity
from diffusers_ptq.sensitivity.units import Unit, group_units, layer_units

__all__ = [
    "SensitivityReport",
    "StepErrors",
    "Unit",
    "UnitSensitivity",
    "average_weight_bits",
    "calibrated_probe",
    "check_budget",
    "choose_mixed_precision",
    "group_units",
    "layer_units",
    "measure_sensitivity",
    "measure_units",
]
