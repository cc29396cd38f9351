"""Name -> preset factory registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers_ptq.config import PTQConfig

_PRESETS: dict[str, Callable[[], PTQConfig]] = {}


def register_preset(name: str) -> Callable[[Callable[[], PTQConfig]], Callable[[], PTQConfig]]:
    """Decorator: register a zero-argument factory that returns the method's PTQConfig."""

    def decorator(factory: Callable[[], PTQConfig]) -> Callable[[], PTQConfig]:
        if name in _PRESETS and _PRESETS[name] is not factory:
            raise ValueError(f"preset {name!r} is already registered")
        _PRESETS[name] = factory
        return factory

    return decorator


def available_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> PTQConfig:
    """A fresh PTQConfig for the preset `name` (case-insensitive, '_' and '-' interchangeable)."""
    key = str(name).lower().replace("_", "-")
    if key not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {available_presets()}")
    return _PRESETS[key]()
