"""Config of sensitivity-driven mixed precision (`layers.mixed_precision`): a budget of promoted layers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from diffusers_ptq.config_fields import _check_choice, _check_float, _check_int, _fail, _field

MIXED_PRECISION_MODES = ("off", "avg_weight_bits", "max_layers")
SENSITIVITY_METRICS = ("mse", "bias")
MIXED_SELECTIONS = ("alone", "greedy")
# The most an average can be: a layer kept float in float32.
MAX_AVERAGE_BITS = 32.0

# The default recipe keeps float the layers whose quantization alone hurts the noise prediction most: on
# both shipped models those are image-space layers (conv_in, conv_out, the last up blocks' convolutions),
# found on the calibration set rather than named. Four measured better than two on both models at W8A8 and
# W6A6 and on the shipped model at W4A8. A fifth, at 1,000 images (BENCHMARKS.md §8): at W4A8 better on
# both models averaged over calibration draws (shipped, two: +0.1 % against +0.8 %; colour, three: +10.9 %
# against +11.1 %, a tie; all within the draws' spread); at W6A6 3.4 points worse on the shipped model and
# even on the colour one. Hence 'auto': five at 4-bit weights or fewer, four above.
AUTO = "auto"
AUTO_LOW_WEIGHT_BITS = 4
AUTO_LOW, AUTO_HIGH = 5, 4  # layers at weights.bits <= AUTO_LOW_WEIGHT_BITS / above
DEFAULT_MIXED_PRECISION: dict[str, Any] = {"mode": "max_layers", "max_layers": AUTO, "high_bits": None}


@dataclass
class MixedPrecisionConfig:
    """Keep the layers whose quantization hurts the noise prediction most at higher bits, within a budget."""

    mode: str = _field(
        "off",
        "'off'; 'avg_weight_bits': promote layers (most sensitive first) while the parameter-weighted "
        "average weight bits of the quantized layers stay <= avg_weight_bits; 'max_layers': promote the "
        "max_layers most sensitive layers",
        MIXED_PRECISION_MODES,
    )
    avg_weight_bits: float | None = _field(
        None, "'avg_weight_bits' budget: average weight bits over the planned layers (float counts its dtype)"
    )
    max_layers: int | str | None = _field(
        None,
        "'max_layers' budget: at most this many layers promoted; 'auto': "
        f"{AUTO_LOW} at weights.bits <= {AUTO_LOW_WEIGHT_BITS}, {AUTO_HIGH} above",
    )
    high_bits: int | None = _field(
        8,
        "bits of a promoted layer's weights (its input activations get max(activations.bits, high_bits)); "
        "None keeps promoted layers float",
    )
    metric: str = _field(
        "mse",
        "ranking: per-layer noise-prediction 'mse', or 'bias' (norm of the per-step mean error, averaged "
        "over steps; a bias only where steps hold several of the num_samples rows, else a warning)",
        SENSITIVITY_METRICS,
    )
    selection: str = _field(
        "alone",
        "'alone': each layer quantized alone on the float UNet, ranked once (one pass per layer); 'greedy': "
        "on the UNet with every planned layer quantized, round by round the layer whose switch to float "
        "lowers the metric most, with the earlier picks float (one pass per remaining layer per round; a "
        "candidate is measured float even when high_bits is set)",
        MIXED_SELECTIONS,
    )
    num_samples: int = _field(
        32,
        "calibration rows (evenly spaced over the calibration set) each layer's sensitivity is measured on",
    )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def resolved(self, weight_bits: int) -> MixedPrecisionConfig:
        """This config with an 'auto' layer count replaced by its value at `weight_bits`."""
        if self.max_layers != AUTO:
            return self
        count = AUTO_LOW if weight_bits <= AUTO_LOW_WEIGHT_BITS else AUTO_HIGH
        return dataclasses.replace(self, max_layers=count)

    def describe(self, weight_bits: int | None = None) -> str:
        """One phrase for tables and listings, e.g. '2 layers float (mse)'; 'off' when disabled; an 'auto'
        count is resolved at `weight_bits` when given."""
        if not self.enabled:
            return "off"
        if weight_bits is not None:
            return self.resolved(weight_bits).describe()
        by_count = self.mode == "max_layers"
        count = (
            f"auto ({AUTO_LOW} at <= {AUTO_LOW_WEIGHT_BITS} bits, else {AUTO_HIGH})"
            if self.max_layers == AUTO
            else self.max_layers
        )
        budget = f"{count} layers" if by_count else f"avg {self.avg_weight_bits} bits"
        high = "float" if self.high_bits is None else f"W{self.high_bits}"
        how = self.metric if self.selection == "alone" else f"{self.metric}, {self.selection}"
        return f"{budget} {high} ({how})"

    def validate(self, path: str = "layers.mixed_precision") -> None:
        _check_choice(f"{path}.mode", self.mode, MIXED_PRECISION_MODES)
        if self.avg_weight_bits is not None or self.mode == "avg_weight_bits":
            _check_float(f"{path}.avg_weight_bits", self.avg_weight_bits, 2.0, MAX_AVERAGE_BITS)
        if (self.max_layers is not None or self.mode == "max_layers") and self.max_layers != AUTO:
            if isinstance(self.max_layers, str):
                _fail(f"{path}.max_layers", self.max_layers, f"an integer >= 1 or '{AUTO}'")
            _check_int(f"{path}.max_layers", self.max_layers, 1)
        if self.high_bits is not None:
            _check_int(f"{path}.high_bits", self.high_bits, 3, 8)
        _check_choice(f"{path}.metric", self.metric, SENSITIVITY_METRICS)
        _check_choice(f"{path}.selection", self.selection, MIXED_SELECTIONS)
        _check_int(f"{path}.num_samples", self.num_samples, 1)

    def check_against(self, weight_bits: int, path: str = "layers.mixed_precision") -> None:
        """Errors that need the target weight bits: promotion must raise a layer's precision."""
        if not self.enabled or self.high_bits is None:
            return
        if self.high_bits <= weight_bits:
            _fail(
                f"{path}.high_bits",
                self.high_bits,
                f"an integer in [{weight_bits + 1}, 8] (above weights.bits={weight_bits}), or None for float",
            )

    @classmethod
    def from_value(cls, value: Any, path: str = "layers.mixed_precision") -> MixedPrecisionConfig:
        """A MixedPrecisionConfig from itself or a dict of its fields (missing fields take their defaults)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            _fail(path, value, "a MixedPrecisionConfig or a dict of its fields")
        if "mode" not in value:
            # Tuning the default recipe's budget (what --help lists), e.g. {"num_samples": 64}: the class's
            # own defaults would switch mixed precision off without a word.
            value = {**DEFAULT_MIXED_PRECISION, **value}
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"unknown key(s) {[f'{path}.{k}' for k in unknown]}; valid keys: {names}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
