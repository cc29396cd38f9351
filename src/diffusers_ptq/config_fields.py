"""Building blocks of the config dataclasses: fields with `help` metadata and validators whose errors name
the field, the bad value and what is allowed."""

from __future__ import annotations

import copy
import math
from dataclasses import field
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
