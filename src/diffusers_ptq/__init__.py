"""diffusers-ptq: timestep-aware post-training quantization for Hugging Face diffusers UNets.

Importing this package never initialises CUDA.
"""

from diffusers_ptq.api import quantize_pipeline, quantize_unet
from diffusers_ptq.calibration import (
    CalibrationSet,
    available_samplers,
    available_selectors,
    register_sample_selector,
    supported_pipelines,
)
from diffusers_ptq.config import (
    ActivationQuantConfig,
    CalibrationConfig,
    GroupSearchConfig,
    LayerSelectionConfig,
    PTQConfig,
    SelectionConfig,
    WeightQuantConfig,
)
from diffusers_ptq.correction import NoiseAbsorption, absorb_quantization_noise
from diffusers_ptq.initialise import set_quant_state
from diffusers_ptq.integer import convert
from diffusers_ptq.job import PTQState
from diffusers_ptq.methods import available_presets
from diffusers_ptq.nn import QuantAttnProcessor, QuantConv2d, QuantLinear
from diffusers_ptq.quantizers import TimestepActQuantizer, WeightQuantizer
from diffusers_ptq.reconstruction import ReconstructionConfig, ReconstructionReport, reconstruct
from diffusers_ptq.report import QuantizationReport
from diffusers_ptq.search import GroupSearch
from diffusers_ptq.sensitivity import SensitivityReport, measure_sensitivity
from diffusers_ptq.serialization import (
    CheckpointError,
    PTQQuantizationConfig,
    PTQQuantizer,
    push_to_hub,
    register,
)
from diffusers_ptq.version import __version__

# diffusers finds quantizers through its AUTO mappings: register ours so stock from_pretrained loads
# diffusers-ptq checkpoints (idempotent; registering touches no device).
register()

__all__ = [
    # configuration
    "ActivationQuantConfig",
    "CalibrationConfig",
    "GroupSearchConfig",
    "LayerSelectionConfig",
    "PTQConfig",
    "ReconstructionConfig",
    "SelectionConfig",
    "WeightQuantConfig",
    "available_presets",
    "available_samplers",
    "available_selectors",
    "register_sample_selector",
    "supported_pipelines",
    # quantization
    "quantize_pipeline",
    "quantize_unet",
    "reconstruct",
    "set_quant_state",
    "convert",
    # PTQD variance absorption for stochastic samplers (bias_correction="output")
    "absorb_quantization_noise",
    "NoiseAbsorption",
    "PTQState",
    "QuantizationReport",
    "ReconstructionReport",
    "CalibrationSet",
    "GroupSearch",
    # per-layer sensitivity (the ranking behind layers.mixed_precision)
    "measure_sensitivity",
    "SensitivityReport",
    # save, load and publish (stock diffusers save_pretrained / from_pretrained work after import)
    "push_to_hub",
    "PTQQuantizationConfig",
    "PTQQuantizer",
    "CheckpointError",
    # modules
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLinear",
    "TimestepActQuantizer",
    "WeightQuantizer",
    "__version__",
]
