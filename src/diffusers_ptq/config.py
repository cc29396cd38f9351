"""PTQConfig: what to quantize, how, and how to calibrate it.

Every field carries `help` metadata (used by the CLI and the docs) and, where the value is one of a set,
`choices`. `validate()` raises ValueError naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

from diffusers_ptq.config_fields import (
    _check_choice,
    _check_float,
    _check_int,
    _fail,
    _field,
    _section_from_dict,
    _section_to_dict,
    field_rows,
)

# Re-exported: `from diffusers_ptq.config import ...` stays the one place users and presets import from.
from diffusers_ptq.config_layers import SPECIAL_LAYER_POLICIES as SPECIAL_LAYER_POLICIES
from diffusers_ptq.config_layers import LayerSelectionConfig
from diffusers_ptq.config_mixed import DEFAULT_MIXED_PRECISION as DEFAULT_MIXED_PRECISION
from diffusers_ptq.config_mixed import MixedPrecisionConfig as MixedPrecisionConfig
from diffusers_ptq.config_quant import AUTO_GROUP_MAX_BITS as AUTO_GROUP_MAX_BITS
from diffusers_ptq.config_quant import GRANULARITIES as GRANULARITIES
from diffusers_ptq.config_quant import GROUP_SIZES as GROUP_SIZES
from diffusers_ptq.config_quant import SCALE_SEARCHES as SCALE_SEARCHES
from diffusers_ptq.config_quant import WEIGHT_ROUNDINGS as WEIGHT_ROUNDINGS
from diffusers_ptq.config_quant import ActivationQuantConfig, WeightQuantConfig
from diffusers_ptq.config_search import (
    GroupSearchConfig,
    SelectionConfig,
)
from diffusers_ptq.reconstruction.config import ReconstructionConfig

TIMESTEP_SAMPLERS = ("uniform", "staggered", "normal", "skew_normal", "all")
SAMPLE_SELECTORS = ("random", "density_diversity", "active")
BIAS_CORRECTIONS = ("off", "layer", "output")

# The method presets depend on this module, never the reverse: `diffusers_ptq.methods.registry` hands its
# builder to `set_preset_builder` when it is imported (`import diffusers_ptq` imports it), and
# `PTQConfig.preset` calls whatever builder was handed over.
PresetBuilder = Callable[[str, dict[str, Any]], "PTQConfig"]
_preset_builder: PresetBuilder | None = None


def set_preset_builder(builder: PresetBuilder) -> None:
    """Install the function behind `PTQConfig.preset(name, **overrides)` (the preset registry's)."""
    global _preset_builder
    _preset_builder = builder


@dataclass
class CalibrationConfig:
    """Which denoising steps of the pipeline's own sampling loop are recorded, and how many."""

    sampler: str = _field("uniform", "how calibration timesteps are drawn", TIMESTEP_SAMPLERS)
    selector: str = _field(
        "random",
        "how calibration samples are chosen: 'random' (the sampler's steps on random trajectories), "
        "'density_diversity' (EDA-DM TDAC: samples per step from feature density and diversity; "
        "ignores the sampler), 'active' (APQ-DM: rounds at the step of highest group-assignment "
        "entropy; needs group_search.enabled)",
        SAMPLE_SELECTORS,
    )
    num_samples: int = _field(
        256, "calibration samples: recorded (trajectory, step) pairs; with CFG each holds both halves"
    )
    num_inference_steps: int | None = _field(
        None, "sampling steps of the calibration run (None: pipeline default)"
    )
    step_interval: int = _field(
        1, "'uniform' / 'staggered': every k-th sampling step ('staggered': trajectory j from step j mod k)"
    )
    mean: float = _field(0.4, "'normal'/'skew_normal': mean timestep as a fraction of the training timesteps")
    std: float = _field(
        0.4, "'normal'/'skew_normal': standard deviation as a fraction of the training timesteps"
    )
    skewness: float = _field(
        -2.0, "'skew_normal': shape parameter alpha (negative puts the tail toward t = 0)"
    )
    guidance_scale: float | None = _field(None, "classifier-free guidance scale (None: pipeline default)")
    batch_size: int = _field(8, "trajectories per pipeline call, and samples per calibration forward")
    seed: int = _field(0, "seed for the noise, the timestep draws and the observers' subsampling")

    def validate(self, path: str = "calibration") -> None:
        _check_choice(f"{path}.sampler", self.sampler, TIMESTEP_SAMPLERS)
        _check_choice(f"{path}.selector", self.selector, SAMPLE_SELECTORS)
        _check_int(f"{path}.num_samples", self.num_samples, 1)
        if self.num_inference_steps is not None:
            _check_int(f"{path}.num_inference_steps", self.num_inference_steps, 1, 10000)
        _check_int(f"{path}.step_interval", self.step_interval, 1)
        _check_float(f"{path}.mean", self.mean, 0.0, 1.0)
        _check_float(f"{path}.std", self.std, 0.0, 10.0, open_lo=True)
        _check_float(f"{path}.skewness", self.skewness, -100.0, 100.0)
        if self.guidance_scale is not None:
            _check_float(f"{path}.guidance_scale", self.guidance_scale, 0.0, 100.0)
        _check_int(f"{path}.batch_size", self.batch_size, 1)
        _check_int(f"{path}.seed", self.seed, 0)


_SECTIONS = {
    "weights": WeightQuantConfig,
    "activations": ActivationQuantConfig,
    "calibration": CalibrationConfig,
    "layers": LayerSelectionConfig,
    "selection": SelectionConfig,
    "group_search": GroupSearchConfig,
    "reconstruction": ReconstructionConfig,
}
_UNSET: Any = object()


@dataclass
class PTQConfig:
    """The full recipe. `PTQConfig(weight_bits=4, act_bits=8)` sets the two most common fields directly."""

    weights: WeightQuantConfig = field(
        default_factory=WeightQuantConfig, metadata={"help": "weight quantizers"}
    )
    activations: ActivationQuantConfig = field(
        default_factory=ActivationQuantConfig, metadata={"help": "activation quantizers"}
    )
    calibration: CalibrationConfig = field(
        default_factory=CalibrationConfig, metadata={"help": "calibration data capture"}
    )
    layers: LayerSelectionConfig = field(
        default_factory=LayerSelectionConfig, metadata={"help": "layer selection"}
    )
    selection: SelectionConfig = field(
        default_factory=SelectionConfig, metadata={"help": "calibration sample selectors"}
    )
    group_search: GroupSearchConfig = field(
        default_factory=GroupSearchConfig, metadata={"help": "APQ-DM timestep-group search"}
    )
    reconstruction: ReconstructionConfig = field(
        default_factory=ReconstructionConfig, metadata={"help": "block reconstruction after calibration"}
    )
    method: str = field(default="custom", metadata={"help": "the preset this recipe came from, for reports"})
    bias_correction: str = _field(
        "output",
        "timestep-aware bias correction after calibration: of the noise prediction, PTQD-style ('output', "
        "default), per layer and timestep group ('layer'), or 'off' (the published presets)",
        BIAS_CORRECTIONS,
    )
    weight_bits: InitVar[int] = _UNSET
    act_bits: InitVar[int | None] = _UNSET

    def __post_init__(self, weight_bits: int, act_bits: int | None) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _section_from_dict(name, cls, value))
        if weight_bits is not _UNSET:
            self.weights.bits = weight_bits
        if act_bits is not _UNSET:
            self.activations.bits = act_bits
        self.validate()

    def validate(self) -> None:
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                _fail(name, section, f"a {cls.__name__} or a dict of its fields")
            section.validate(name)
        if not isinstance(self.method, str):
            _fail("method", self.method, "a string")
        _check_choice("bias_correction", self.bias_correction, BIAS_CORRECTIONS)
        self._validate_combination()

    def _validate_combination(self) -> None:
        """Checks across sections: the active selector and the group search need each other's parts."""
        search, acts, recon = self.group_search, self.activations, self.reconstruction
        self.layers.mixed_precision.check_against(self.weights.bits)
        if recon.enabled and acts.bits is None and not recon.learns_rounding:
            _fail(
                "reconstruction.weight_rounding",
                recon.weight_rounding,
                "'adaround' for weight-only quantization (activations.bits=None: no step size to learn)",
            )
        if self.calibration.selector == "active" and not search.enabled:
            _fail(
                "calibration.selector",
                "active",
                "group_search.enabled=True with it (active selection scores steps by the entropy of the "
                "searched group assignment), or another selector",
            )
        if not search.enabled:
            return
        if acts.bits is None:
            _fail("group_search.enabled", True, "False for weight-only quantization (activations.bits=None)")
        if not isinstance(acts.timestep_groups, int):
            _fail(
                "group_search.enabled",
                True,
                f"False with activations.timestep_groups={acts.timestep_groups!r}; the search needs an "
                "integer number of groups G",
            )

    @property
    def tag(self) -> str:
        """Short bit-width tag such as 'w4a8' or 'w8a16' ('w4' for weight-only)."""
        acts = "" if self.activations.bits is None else f"a{self.activations.bits}"
        return f"w{self.weights.bits}{acts}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: _section_to_dict(getattr(self, name)) for name in _SECTIONS}
        out["method"] = self.method
        out["bias_correction"] = self.bias_correction
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PTQConfig:
        if not isinstance(data, dict):
            raise TypeError(f"PTQConfig.from_dict expects a dict, got {type(data).__name__}")
        valid = [*_SECTIONS, "method", "bias_correction"]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown PTQConfig key(s) {unknown}; valid keys: {valid}")
        kwargs = {
            name: _section_from_dict(name, _SECTIONS[name], data[name]) for name in _SECTIONS if name in data
        }
        for name in ("method", "bias_correction"):
            if name in data:
                kwargs[name] = data[name]
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> PTQConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"PTQConfig JSON is malformed: {err}") from err
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> PTQConfig:
        """A validated copy with `overrides` applied (see `apply_overrides`)."""
        new = copy.deepcopy(self)
        apply_overrides(new, overrides)
        new.validate()
        return new

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PTQConfig:
        """A published method's recipe, e.g. `PTQConfig.preset("q-diffusion", weight_bits=4)`.

        Values a paper publishes per bit width follow the overridden bits unless set explicitly.
        """
        if _preset_builder is None:
            raise RuntimeError("no preset registry is loaded; `import diffusers_ptq` loads the presets")
        return _preset_builder(name, overrides)


def apply_overrides(config: PTQConfig, overrides: dict[str, Any]) -> None:
    """Apply `weight_bits`/`act_bits`, `method`, whole sections, or partial section dicts to `config`."""
    for key, value in overrides.items():
        if key == "weight_bits":
            config.weights.bits = value
        elif key == "act_bits":
            config.activations.bits = value
        elif key in ("method", "bias_correction"):
            setattr(config, key, value)
        elif key in _SECTIONS:
            section_cls = _SECTIONS[key]
            if isinstance(value, section_cls):
                setattr(config, key, copy.deepcopy(value))
            elif isinstance(value, dict):
                merged = _section_to_dict(getattr(config, key))
                for name, given in value.items():
                    # A nested section (layers.mixed_precision) given in part overrides only what it names.
                    if isinstance(given, dict) and isinstance(merged.get(name), dict):
                        given = {**merged[name], **given}
                    merged[name] = given
                setattr(config, key, _section_from_dict(key, section_cls, merged))
            else:
                _fail(key, value, f"a {section_cls.__name__} or a dict of its fields")
        else:
            valid = ["weight_bits", "act_bits", "method", "bias_correction", *_SECTIONS]
            raise ValueError(f"unknown override {key!r}; valid overrides: {valid}")


def describe_fields(
    cls: type | None = None, prefix: str = "", defaults: Any = None
) -> list[tuple[str, Any, str]]:
    """(dotted name, default, help) for every field of `cls` (default: PTQConfig), for the CLI's --help and
    the docs; see `config_fields.field_rows`."""
    return field_rows(PTQConfig if cls is None else cls, prefix, defaults)
