"""The diffusers `quantization_config` of a diffusers-ptq UNet, stored in its `config.json`.

diffusers looks quantizers up by `quant_method` and reads `quant_method.value` (for its user agent), so the
method must be an Enum member whose value is the registry key. diffusers' own `QuantizationMethod` cannot
take a new member: an Enum with members cannot be subclassed, and adding members at runtime would patch a
library type behind its back. `PTQQuantizationMethod` is a separate `str` Enum instead: a `str` mix-in
member compares and hashes equal to its value, so it works as a key of diffusers' AUTO mappings, in
`==` comparisons with diffusers' members' values, and serialises to JSON as the plain string.
"""

from __future__ import annotations

import copy
import math
from enum import Enum
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from diffusers_ptq.config import PTQConfig
from diffusers_ptq.serialization.layout import FORMAT_VERSION, CheckpointError, check_format_version
from diffusers_ptq.version import __version__


class PTQQuantizationMethod(str, Enum):
    """`quant_method` of diffusers-ptq checkpoints (the key in diffusers' quantizer registry)."""

    DIFFUSERS_PTQ = "diffusers_ptq"


_FIELDS = (
    "quant_method",
    "format_version",
    "ptq_config",
    "num_train_timesteps",
    "num_timestep_groups",
    "base_model",
    "calibration_prompts",
    "report",
    "metrics",
    "library_version",
)


class PTQQuantizationConfig(QuantizationConfigMixin):
    """diffusers quantization config for diffusers-ptq.

    After `quantize_pipeline` the UNet carries one (with the full recipe and calibration details) and
    `save_pretrained` writes it into `config.json`. It can also be passed to `from_pretrained`, e.g. in
    `PipelineQuantizationConfig(quant_mapping={"unet": PTQQuantizationConfig(PTQConfig(act_bits=None))})`:
    a weight-only recipe quantizes a float checkpoint's weights while loading (activation quantization
    needs calibration data, so it only comes from a checkpoint saved after `quantize_pipeline`).
    """

    def __init__(
        self,
        ptq_config: PTQConfig | dict[str, Any] | None = None,
        *,
        quant_method: str | PTQQuantizationMethod = PTQQuantizationMethod.DIFFUSERS_PTQ,
        format_version: int = FORMAT_VERSION,
        num_train_timesteps: int | None = None,
        num_timestep_groups: int | None = None,
        base_model: str | None = None,
        calibration_prompts: int | None = None,
        report: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        library_version: str | None = None,
    ) -> None:
        if quant_method != PTQQuantizationMethod.DIFFUSERS_PTQ:
            raise ValueError(
                f"quantization_config.quant_method={quant_method!r} is not diffusers-ptq's "
                f"({PTQQuantizationMethod.DIFFUSERS_PTQ.value!r})"
            )
        self.quant_method = PTQQuantizationMethod.DIFFUSERS_PTQ
        self.format_version = check_format_version(format_version, "quantization_config.format_version")
        if ptq_config is None:
            ptq_config = PTQConfig()
        if isinstance(ptq_config, dict):
            try:
                ptq_config = PTQConfig.from_dict(ptq_config)
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"quantization_config.ptq_config is invalid: {err}") from err
        if not isinstance(ptq_config, PTQConfig):
            raise TypeError(f"ptq_config must be a PTQConfig or a dict, got {type(ptq_config).__name__}")
        ptq_config.validate()
        self.ptq_config = ptq_config.to_dict()
        self.num_train_timesteps = _optional_int("num_train_timesteps", num_train_timesteps)
        self.num_timestep_groups = _optional_int("num_timestep_groups", num_timestep_groups)
        self.base_model = base_model
        self.calibration_prompts = _optional_int("calibration_prompts", calibration_prompts)
        self.report = copy.deepcopy(report)
        self.metrics = _metrics(metrics or {})
        self.library_version = str(__version__ if library_version is None else library_version)

    @property
    def ptq(self) -> PTQConfig:
        """The recipe as a PTQConfig (a fresh copy)."""
        return PTQConfig.from_dict(copy.deepcopy(self.ptq_config))

    @classmethod
    def from_dict(
        cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any
    ) -> PTQQuantizationConfig | tuple[PTQQuantizationConfig, dict[str, Any]]:
        """Build from the `quantization_config` of a `config.json`, rejecting what this version can't read."""
        if not isinstance(config_dict, dict):
            raise CheckpointError(
                f"quantization_config must be a JSON object, got {type(config_dict).__name__}"
            )
        # The version first: a newer format may well have fields this version does not know.
        check_format_version(config_dict.get("format_version"), "quantization_config.format_version")
        unknown = sorted(set(config_dict) - set(_FIELDS))
        if unknown:
            raise CheckpointError(
                f"quantization_config has unknown field(s) {unknown}; fields of format_version "
                f"{FORMAT_VERSION}: {list(_FIELDS)}. Fix or remove them in config.json."
            )
        if "ptq_config" not in config_dict:
            raise CheckpointError("quantization_config has no 'ptq_config' (the quantization recipe)")
        config_dict = {**config_dict, "ptq_config": with_legacy_fields(config_dict["ptq_config"])}
        config = cls(**config_dict)
        unused = {}
        for key, value in kwargs.items():
            if key in _FIELDS:
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in _FIELDS}

    def to_diff_dict(self) -> dict[str, Any]:
        # diffusers' repr calls to_json_string(use_diff=True); every field matters here.
        return self.to_dict()

    @property
    def tag(self) -> str:
        return self.ptq.tag

    @classmethod
    def from_model(cls, unet: Any) -> PTQQuantizationConfig:
        """The config describing a UNet quantized by diffusers-ptq (recipe, calibration, metrics)."""
        state = getattr(unet, "ptq_state", None)
        if state is None:
            raise ValueError(f"this {type(unet).__name__} was not quantized by diffusers-ptq (no ptq_state)")
        return cls(
            state.config,
            num_train_timesteps=state.context.num_train_timesteps,
            num_timestep_groups=int(state.group_map.max()) + 1,
            base_model=state.base_model,
            calibration_prompts=state.num_prompts,
            report=state.report.to_dict() if state.report is not None else None,
            metrics=state.metrics,
        )


# Recipe fields added after checkpoints were first written, with the value every earlier checkpoint ran
# with. A saved recipe without the key predates the field, so it means that value, not today's default.
_LEGACY_FIELDS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("weights", "rounding"), "nearest"),
    (("bias_correction",), "off"),
    (("layers", "mixed_precision"), {"mode": "off"}),
)


def with_legacy_fields(recipe: Any) -> Any:
    """A copy of a saved recipe dict with the fields it predates filled in as they ran then."""
    if not isinstance(recipe, dict):
        return recipe  # PTQQuantizationConfig reports the type error
    recipe = copy.deepcopy(recipe)
    for path, value in _LEGACY_FIELDS:
        node = recipe
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(path[-1], copy.deepcopy(value))
    return recipe


def _optional_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"quantization_config.{name}={value!r} is invalid; expected an integer >= 1")
    return value


def _metrics(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, dict):
        raise CheckpointError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out = {}
    for name, value in metrics.items():
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not isinstance(name, str) or not ok:
            raise CheckpointError(
                f"metrics[{name!r}]={value!r} is invalid; expected a finite number under a str name"
            )
        out[name] = float(value)
    return out
