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
    _check_bool,
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
from diffusers_ptq.config_search import (
    GroupSearchConfig,
    SelectionConfig,
)
from diffusers_ptq.reconstruction.config import ReconstructionConfig

SCALE_SEARCHES = ("minmax", "mse", "percentile")
GRANULARITIES = ("auto", "per_channel", "per_tensor", "per_group")
GROUP_SIZES = (32, 64, 128, 256, 512)
# 'auto' weight scales: groups of `group_size` inputs at this many bits or fewer, per channel above. Groups
# of 64 measured better than per-channel scales at W4A8 on the colour model and tied on the shipped one, and
# tied at W6A6 (shipped model) and W8A8 (colour model) (BENCHMARKS.md §8), where they would cost checkpoint
# size and the CPU's int8 GEMM for nothing.
AUTO_GROUP_MAX_BITS = 4
WEIGHT_ROUNDINGS = ("nearest", "gptq")
TIMESTEP_SAMPLERS = ("uniform", "normal", "skew_normal", "all")
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


def _check_search(path: str, cfg: WeightQuantConfig | ActivationQuantConfig) -> None:
    _check_choice(f"{path}.scale_search", cfg.scale_search, SCALE_SEARCHES)
    _check_float(f"{path}.lp_norm", cfg.lp_norm, 0.0, 10.0, open_lo=True)
    _check_int(f"{path}.num_candidates", cfg.num_candidates, 1, 1000)
    _check_float(f"{path}.percentile", cfg.percentile, 50.0, 100.0, open_lo=True)


@dataclass
class WeightQuantConfig:
    """How weights are quantized."""

    bits: int = _field(8, "weight bit width, 2-8")
    granularity: str = _field(
        "auto",
        "one scale per output channel, one per tensor, or one per group of `group_size` inputs of each "
        "output channel; 'auto' (default): per group for layers at 4 bits or fewer, per channel above",
        GRANULARITIES,
    )
    group_size: int = _field(
        64,
        "'per_group' (and 'auto' at <= 4 bits): inputs per scale, contiguous along K in the integer "
        "kernels' order ((kh, kw, C_in) for a conv)",
        GROUP_SIZES,
    )
    strict_groups: bool = _field(
        False,
        "'per_group': raise instead of falling back to per-channel scales (with one warning listing them) "
        "for layers whose input size K is not a multiple of group_size; 'auto' falls back silently",
    )
    symmetric: bool = _field(True, "signed range with zero-point 0 (True) or an affine range (False)")
    scale_search: str = _field("mse", "how the clipping range is chosen", SCALE_SEARCHES)
    lp_norm: float = _field(2.4, "p of the |x - Q(x)|^p error minimised by the 'mse' search")
    num_candidates: int = _field(100, "'mse' search: candidate ranges min/max * (1 - 0.01 i), i < this")
    percentile: float = _field(99.99, "'percentile' search: clip at this percentile of the values")
    rounding: str = _field(
        "gptq",
        "'gptq' (default): second-order rounding (GPTQ) on the calibration inputs, layer by layer; "
        "'nearest': round each weight to its nearest code (the published presets; no calibration data)",
        WEIGHT_ROUNDINGS,
    )
    gptq_damp: float = _field(0.01, "gptq: added to H's diagonal, as a fraction of its mean diagonal")
    gptq_act_order: bool = _field(False, "gptq: quantize columns in order of decreasing H diagonal")
    gptq_block_size: int = _field(128, "gptq: columns per lazy-batch block update")

    def granularity_in_effect(self) -> str:
        """`granularity` with 'auto' resolved for `bits` (a layer's copy carries that layer's bit width)."""
        if self.granularity != "auto":
            return self.granularity
        return "per_group" if self.bits <= AUTO_GROUP_MAX_BITS else "per_channel"

    def describe_scales(self) -> str:
        """'per_channel', 'per_tensor' or 'group 64', with '(auto)' when 'auto' chose it."""
        kind = self.granularity_in_effect()
        text = f"group {self.group_size}" if kind == "per_group" else kind
        return f"{text} (auto)" if self.granularity == "auto" else text

    def validate(self, path: str = "weights") -> None:
        _check_int(f"{path}.bits", self.bits, 2, 8)
        _check_choice(f"{path}.granularity", self.granularity, GRANULARITIES)
        size = self.group_size
        if not isinstance(size, int) or isinstance(size, bool) or size not in GROUP_SIZES:
            _fail(f"{path}.group_size", size, "one of " + ", ".join(map(str, GROUP_SIZES)))
        _check_bool(f"{path}.strict_groups", self.strict_groups)
        _check_bool(f"{path}.symmetric", self.symmetric)
        _check_search(path, self)
        _check_choice(f"{path}.rounding", self.rounding, WEIGHT_ROUNDINGS)
        _check_float(f"{path}.gptq_damp", self.gptq_damp, 0.0, 1.0)
        _check_bool(f"{path}.gptq_act_order", self.gptq_act_order)
        _check_int(f"{path}.gptq_block_size", self.gptq_block_size, 1)


@dataclass
class ActivationQuantConfig:
    """How layer inputs (and attention matmul operands) are quantized."""

    bits: int | None = _field(8, "activation bit width, 2-16, or None for weight-only quantization")
    symmetric: bool = _field(False, "signed range with zero-point 0 (True) or an affine range (False)")
    scale_search: str = _field("mse", "how each clipping range is chosen", SCALE_SEARCHES)
    lp_norm: float = _field(2.4, "p of the |x - Q(x)|^p error minimised by the 'mse' search")
    num_candidates: int = _field(100, "'mse' search: candidate ranges min/max * (1 - 0.01 i), i < this")
    percentile: float = _field(99.99, "'percentile' search: clip at this percentile of the values")
    timestep_groups: int | str = _field(
        1,
        "1: one scale for all timesteps; G > 1: G contiguous groups over the training timesteps; "
        "'per_step': one group per sampling step of the calibration schedule",
    )
    quantize_attention: bool = _field(True, "quantize q, k, v and the softmax output of attention matmuls")
    softmax_bits: int = _field(8, "bits of the (unsigned) softmax output; 16 leaves it effectively float")
    observer_samples: int = _field(
        8192, "values kept per quantizer and timestep group (random subsample) for the scale search"
    )

    def validate(self, path: str = "activations") -> None:
        if self.bits is not None:
            _check_int(f"{path}.bits", self.bits, 2, 16)
        _check_bool(f"{path}.symmetric", self.symmetric)
        _check_search(path, self)
        groups = self.timestep_groups
        if groups != "per_step":
            ok = isinstance(groups, int) and not isinstance(groups, bool) and 1 <= groups <= 1000
            if not ok:
                _fail(f"{path}.timestep_groups", groups, "an integer in [1, 1000] or 'per_step'")
        _check_bool(f"{path}.quantize_attention", self.quantize_attention)
        _check_int(f"{path}.softmax_bits", self.softmax_bits, 2, 16)
        _check_int(f"{path}.observer_samples", self.observer_samples, 16)

    @property
    def enabled(self) -> bool:
        return self.bits is not None


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
    step_interval: int = _field(1, "'uniform': record every k-th sampling step")
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
