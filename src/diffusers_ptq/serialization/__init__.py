"""Save, load and publish quantized UNets with stock diffusers calls.

`register()` (run by `import diffusers_ptq`) adds `PTQQuantizer` / `PTQQuantizationConfig` to diffusers'
quantizer registry and makes `save_pretrained` of diffusers-ptq models atomic. Layout of a checkpoint:
`layout.py`; packing of integer weights: `packing.py`; save side: `state.py`; load side: `loading.py`;
Hub upload and model card: `hub.py`, `model_card.py`.
"""

from diffusers_ptq.serialization.hub import push_to_hub
from diffusers_ptq.serialization.layout import FORMAT_VERSION, CheckpointError
from diffusers_ptq.serialization.model_card import build_model_card
from diffusers_ptq.serialization.quant_config import PTQQuantizationConfig, PTQQuantizationMethod
from diffusers_ptq.serialization.quantizer import PTQQuantizer, attach_quantizer, is_ptq_model, register

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "PTQQuantizationConfig",
    "PTQQuantizationMethod",
    "PTQQuantizer",
    "attach_quantizer",
    "build_model_card",
    "is_ptq_model",
    "push_to_hub",
    "register",
]
