"""`register()`: make diffusers load and save diffusers-ptq checkpoints (run by `import diffusers_ptq`).

The one place that knows every side: the quantizer and its config (`quantizer.py`, `quant_config.py`) go into
diffusers' AUTO mappings, and `saving.py` wraps `save_pretrained`. Nothing here is imported back by them.
"""

from __future__ import annotations

from diffusers.quantizers import auto

from diffusers_ptq.serialization.quant_config import PTQQuantizationConfig, PTQQuantizationMethod
from diffusers_ptq.serialization.quantizer import PTQQuantizer
from diffusers_ptq.serialization.saving import install_save_hooks


def register() -> None:
    """Register diffusers-ptq with diffusers (idempotent: re-registering sets the same entries)."""
    key = PTQQuantizationMethod.DIFFUSERS_PTQ.value
    auto.AUTO_QUANTIZER_MAPPING[key] = PTQQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[key] = PTQQuantizationConfig
    install_save_hooks()


__all__ = ["register"]
