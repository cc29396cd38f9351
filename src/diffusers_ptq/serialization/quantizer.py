"""`PTQQuantizer`: diffusers-ptq as a diffusers quantizer backend (registered by `registration.py`).

With the quantizer registered, diffusers' own `save_pretrained` / `from_pretrained` (models and pipelines)
and `PipelineQuantizationConfig(quant_mapping=...)` handle diffusers-ptq UNets: `from_pretrained` reads the
`quantization_config` in `config.json`, asks diffusers' AUTO mapping for this class, and calls its hooks
(see `loading.py` for the order). Without `import diffusers_ptq` nothing is registered, and diffusers raises
its own "Unknown quantization type" error.
"""

from __future__ import annotations

from typing import Any

from diffusers.models.modeling_utils import ModelMixin
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from diffusers_ptq.serialization import loading
from diffusers_ptq.serialization.layout import CheckpointError
from diffusers_ptq.serialization.quant_config import PTQQuantizationConfig
from diffusers_ptq.serialization.reader import CheckpointReader
from diffusers_ptq.serialization.state import checkpoint_state_dict


class PTQQuantizer(DiffusersQuantizer):
    """diffusers quantizer for UNets quantized (and calibrated) by diffusers-ptq.

    Pre-quantized checkpoints are rebuilt without calibration; a weight-only recipe passed to
    `from_pretrained` quantizes a float checkpoint's weights while loading.
    """

    # Weight-only recipes quantize on load; recipes with activations are refused in validate_environment.
    requires_calibration = False
    required_packages = None

    def __init__(self, quantization_config: PTQQuantizationConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, PTQQuantizationConfig):
            raise TypeError(
                f"PTQQuantizer needs a PTQQuantizationConfig, got {type(quantization_config).__name__}"
            )
        super().__init__(quantization_config, **kwargs)
        self.model: nn.Module | None = None  # the model this quantizer serialises
        self._manifest: loading.Manifest | None = None
        self._reader: CheckpointReader | None = None
        self._rebuilt: tuple[loading.QuantPlan, loading.TimestepContext] | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized and self.quantization_config.ptq.activations.enabled:
            raise ValueError(
                "diffusers-ptq cannot quantize activations while loading: activation scales need calibration "
                "data. Load a checkpoint saved after quantize_pipeline, or use a weight-only recipe, e.g. "
                "PTQQuantizationConfig(PTQConfig(weight_bits=8, act_bits=None))"
            )

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[Any]) -> list[str]:
        if not self.pre_quantized:
            return loaded_keys
        self._manifest = loading.read_manifest(checkpoint_files)
        return loading.map_loaded_keys(loaded_keys)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            return model
        if self._manifest is None:
            raise CheckpointError(
                "the diffusers-ptq manifest was not read before the model was built; load quantized "
                "checkpoints with from_pretrained on a directory or Hub repo holding safetensors files"
            )
        self._rebuilt = loading.rebuild_modules(model, self._manifest, self.quantization_config)
        self._reader = CheckpointReader(self._manifest, model)
        return model

    def update_missing_keys(self, model: nn.Module, missing_keys: list[str], prefix: str) -> list[str]:
        if self._reader is None:
            return missing_keys
        return self._reader.check_missing(missing_keys)

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._reader is None:
            return state_dict
        return self._reader.convert(state_dict)

    @property
    def supports_parallel_loading(self) -> bool:
        # The reader carries packed weights across shards until their scales arrive: one shard at a time.
        return False

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            if self._reader is None or self._rebuilt is None:
                raise CheckpointError("the quantized modules were not rebuilt before the weights were loaded")
            self._reader.finish(model)
            plan, context = self._rebuilt
            loading.finalize(model, self.quantization_config, plan, context, self._reader.group_map)
        else:
            loading.quantize_weights_on_load(model, self.quantization_config)
        self.model = model
        # The per-load state holds tensors; drop it once the model owns them.
        self._manifest = self._reader = self._rebuilt = None
        return model

    def get_state_dict_and_metadata(
        self, state_dict: dict[str, Any], safe_serialization: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if not safe_serialization:
            raise ValueError(
                "diffusers-ptq checkpoints are written as safetensors only (never pickle); "
                "call save_pretrained without safe_serialization=False"
            )
        if self.model is None:
            raise RuntimeError("this PTQQuantizer is not attached to a model; save the model it belongs to")
        return checkpoint_state_dict(self.model, state_dict)

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def attach_quantizer(unet: nn.Module) -> None:
    """Give a UNet quantized by diffusers-ptq diffusers' quantization attributes.

    Sets `unet.config.quantization_config` (refreshed from `unet.ptq_state`), `unet.hf_quantizer`,
    `unet.is_quantized` and `unet.quantization_method`, exactly what `from_pretrained` leaves on a quantized
    model, so `save_pretrained` writes a checkpoint that `from_pretrained` loads. Non-diffusers modules are
    left alone.
    """
    if not isinstance(unet, ModelMixin):
        return
    qconfig = PTQQuantizationConfig.from_model(unet)
    quantizer = PTQQuantizer(qconfig, pre_quantized=True)
    quantizer.model = unet
    unet.register_to_config(quantization_config=qconfig)
    unet.hf_quantizer = quantizer
    unet.is_quantized = True
    unet.quantization_method = qconfig.quant_method


def is_ptq_model(module: Any) -> bool:
    """True for a diffusers model quantized by diffusers-ptq (fresh or loaded)."""
    return isinstance(getattr(module, "hf_quantizer", None), PTQQuantizer) and hasattr(module, "ptq_state")


__all__ = ["PTQQuantizer", "attach_quantizer", "is_ptq_model"]
