"""Save, load and publish quantized UNets with stock diffusers calls.

`register()` (run by `import diffusers_ptq`) adds `PTQQuantizer` / `PTQQuantizationConfig` to diffusers'
quantizer registry and makes `save_pretrained` of diffusers-ptq models atomic. Layout of a checkpoint:
`layout.py`; packing of integer weights: `packing.py`; save side: `state.py`; load side: `loading.py`
(its tensor conversion: `reader.py`); registration with diffusers: `registration.py`; Hub upload and
model card: `hub.py` (save, then upload), `upload.py`, `model_card.py`. Imports run one way:
registration -> saving -> upload -> model_card -> quantizer -> loading.
"""

from diffusers_ptq.serialization.hub import push_to_hub
from diffusers_ptq.serialization.layout import FORMAT_VERSION, CheckpointError
from diffusers_ptq.serialization.model_card import build_model_card
from diffusers_ptq.serialization.quant_config import PTQQuantizationConfig, PTQQuantizationMethod
from diffusers_ptq.serialization.quantizer import PTQQuantizer, attach_quantizer, is_ptq_model
from diffusers_ptq.serialization.registration import register

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
