"""The default recipe's data-dependent parts, pinned off for tests of one other mechanism.

The default recipe rounds weights with GPTQ, corrects the noise prediction's mean error and keeps the four
most sensitive layers float. A test of reconstruction, the group search, layer bias tables or the
sensitivity pass measures its own mechanism only when those are off; `plain(**fields)` builds such a recipe
(dict sections given are merged over the pins). `QUICK_LAYERS` keeps the default recipe whole but ranks
layers on fewer rows, for fixtures that only need a quantized pipeline.
"""

from __future__ import annotations

from typing import Any

from diffusers_ptq import PTQConfig

PLAIN_WEIGHTS: dict[str, Any] = {"rounding": "nearest"}
PLAIN_LAYERS: dict[str, Any] = {"mixed_precision": {"mode": "off"}}
PLAIN: dict[str, Any] = {"weights": PLAIN_WEIGHTS, "layers": PLAIN_LAYERS, "bias_correction": "off"}
# The default recipe's mixed precision, ranked on 8 rows instead of 32: about 4 s less per text-to-image
# fixture on 2 CPU cores (test_integer's SD fixture promoted the same 4 layers either way, checked once).
QUICK_LAYERS: dict[str, Any] = {"mixed_precision": {"num_samples": 8}}


def plain(**fields: Any) -> PTQConfig:
    """PTQConfig(**fields) with nearest rounding, no bias correction and no mixed precision unless given."""
    merged: dict[str, Any] = dict(fields)
    for key, pins in PLAIN.items():
        given = fields.get(key)
        if isinstance(pins, dict) and (given is None or isinstance(given, dict)):
            merged[key] = {**pins, **(given or {})}
        elif given is None:
            merged[key] = pins
    return PTQConfig(**merged)
