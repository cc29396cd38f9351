"""Which layers of the UNet are quantized, and at what precision (`PTQConfig.layers`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers_ptq.config_fields import _check_bool, _check_choice, _fail, _field
from diffusers_ptq.config_mixed import DEFAULT_MIXED_PRECISION, MixedPrecisionConfig

SPECIAL_LAYER_POLICIES = ("float", "8bit", "same")


@dataclass
class LayerSelectionConfig:
    """Which Conv2d/Linear layers of the UNet are quantized (fnmatch patterns on qualified names)."""

    include: list[str] = _field(["*"], "patterns of layer names to quantize")
    exclude: list[str] = _field([], "patterns of layer names to keep float (wins over include)")
    special_layers: str = _field(
        "8bit",
        "conv_in, conv_out and the time/class/added embeddings: keep 'float', quantize at '8bit', "
        "or at the 'same' bits as the rest",
        SPECIAL_LAYER_POLICIES,
    )
    shortcut_split: bool = _field(
        True, "Q-Diffusion shortcut-split: separate quantizers for the two halves of up-block skip concats"
    )
    mixed_precision: MixedPrecisionConfig = field(
        default_factory=lambda: MixedPrecisionConfig(**DEFAULT_MIXED_PRECISION),
        metadata={
            "help": "sensitivity-driven mixed precision: a budget of layers kept at higher bits (default: "
            "the 4 layers ranked most sensitive kept float; mode='off' for none). A dict without 'mode' "
            "tunes this default (e.g. {'num_samples': 64}); one with 'mode' starts from the field defaults"
        },
    )

    def __post_init__(self) -> None:
        # Tuples are accepted for convenience; lists keep equality and JSON round-trips exact.
        for name in ("include", "exclude"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.mixed_precision, dict):
            self.mixed_precision = MixedPrecisionConfig.from_value(self.mixed_precision)

    def validate(self, path: str = "layers") -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
                _fail(f"{path}.{name}", value, "a list of fnmatch pattern strings")
        _check_choice(f"{path}.special_layers", self.special_layers, SPECIAL_LAYER_POLICIES)
        _check_bool(f"{path}.shortcut_split", self.shortcut_split)
        if not isinstance(self.mixed_precision, MixedPrecisionConfig):
            _fail(
                f"{path}.mixed_precision",
                self.mixed_precision,
                "a MixedPrecisionConfig or a dict of its fields",
            )
        self.mixed_precision.validate(f"{path}.mixed_precision")
