"""Name -> preset factory registry.

A preset may also register an `adapt(config, overrides)` hook: hyperparameters that the paper publishes per
bit width (EDA-DM's reconstruction learning rates, say) are then chosen after the caller's bit overrides are
applied, unless the caller set those values explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers_ptq.config import PTQConfig, set_preset_builder

Adapt = Callable[["PTQConfig", dict[str, Any]], None]

_PRESETS: dict[str, Callable[[], PTQConfig]] = {}
_ADAPT: dict[str, Adapt] = {}


def register_preset(
    name: str, adapt: Adapt | None = None
) -> Callable[[Callable[[], PTQConfig]], Callable[[], PTQConfig]]:
    """Decorator: register a zero-argument factory that returns the method's PTQConfig.

    `adapt(config, overrides)` (optional) edits the config in place after the overrides of
    `PTQConfig.preset(name, **overrides)` are applied.
    """

    def decorator(factory: Callable[[], PTQConfig]) -> Callable[[], PTQConfig]:
        if name in _PRESETS and _PRESETS[name] is not factory:
            raise ValueError(f"preset {name!r} is already registered")
        _PRESETS[name] = factory
        if adapt is not None:
            _ADAPT[name] = adapt
        return factory

    return decorator


def available_presets() -> list[str]:
    return sorted(_PRESETS)


def _key(name: str) -> str:
    key = str(name).lower().replace("_", "-")
    if key not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {available_presets()}")
    return key


def get_preset(name: str) -> PTQConfig:
    """A fresh PTQConfig for the preset `name` (case-insensitive, '_' and '-' interchangeable)."""
    return _PRESETS[_key(name)]()


def build_preset(name: str, overrides: dict[str, Any]) -> PTQConfig:
    """The preset with `overrides` applied (see `PTQConfig.replace`), then its adapt hook, validated."""
    key = _key(name)
    config = _PRESETS[key]().replace(**overrides)
    if key in _ADAPT:
        _ADAPT[key](config, overrides)
        config.validate()
    return config


set_preset_builder(build_preset)  # PTQConfig.preset(name, ...) builds through this registry
