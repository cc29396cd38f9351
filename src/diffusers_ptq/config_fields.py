"""Building blocks of the config dataclasses: fields with `help` metadata, validators whose errors name
the field, the bad value and what is allowed, and a section's dict form (nested sections included)."""

from __future__ import annotations

import copy
import math
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any


def _field(default: Any, help: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _fail(path: str, value: Any, expected: str) -> None:
    raise ValueError(f"{path}={value!r} is invalid; expected {expected}.")


def _check_choice(path: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(path, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_bool(path: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(path, value, "True or False")


def _check_int(path: str, value: Any, lo: int, hi: int | None = None) -> None:
    ok = (
        isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    )
    if not ok:
        _fail(path, value, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")


def _check_float(path: str, value: Any, lo: float, hi: float, *, open_lo: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if open_lo else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if open_lo else "["
        _fail(path, value, f"a number in {bracket}{lo}, {hi}]")


def _section_to_dict(section: Any) -> dict[str, Any]:
    out = {}
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):  # a nested section (layers.mixed_precision)
            value = _section_to_dict(value)
        out[f.name] = list(value) if isinstance(value, tuple | list) else value
    return out


def _section_from_dict(name: str, cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        _fail(name, data, f"a dict of {cls.__name__} fields")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(
            f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid keys of {name!r}: {names}"
        )
    section = cls(**data)
    for f in fields(cls):
        if isinstance(getattr(section, f.name), tuple):
            setattr(section, f.name, list(getattr(section, f.name)))
    return section


def field_rows(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, Any, str]]:
    """(dotted name, default, help) for every field, for the CLI's --help and the docs.

    `defaults`: the instance a nested section's defaults come from (its parent's default factory may set
    values other than the section class's own, as `layers.mixed_precision` does).
    """
    rows = []
    for f in fields(cls):
        if f.name in ("weight_bits", "act_bits"):
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if is_dataclass(default):
            rows.extend(field_rows(type(default), f"{prefix}{f.name}.", default))
            continue
        help_text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_text += " (choices: " + ", ".join(map(str, f.metadata["choices"])) + ")"
        rows.append((prefix + f.name, default, help_text))
    return rows
