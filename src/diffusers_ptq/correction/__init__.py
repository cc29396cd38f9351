"""Timestep-aware bias correction: per layer and timestep group ('layer'), or of the noise prediction
('output', PTQD). The tables themselves live in `diffusers_ptq.quantizers.bias`."""

from diffusers_ptq.correction.layer import correct_layers, float_layer_means
from diffusers_ptq.correction.output import correct_output, fit_output_correction
from diffusers_ptq.correction.run import correct_bias
from diffusers_ptq.correction.stats import GroupChannelSums, channel_rows
from diffusers_ptq.correction.variance import NoiseAbsorption, absorb_quantization_noise

__all__ = [
    "NoiseAbsorption",
    "absorb_quantization_noise",
    "GroupChannelSums",
    "channel_rows",
    "correct_bias",
    "correct_layers",
    "correct_output",
    "fit_output_correction",
    "float_layer_means",
]
