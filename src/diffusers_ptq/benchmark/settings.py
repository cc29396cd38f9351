"""What the quality benchmark runs: rows (float + preset x bit widths), sample counts, seeds."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from diffusers_ptq.methods import available_presets

# --quick: block reconstruction per row that enables it (the default presets: q-diffusion's 3 rows).
QUICK_RECONSTRUCTION_MINUTES = 0.5
_BITS = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)


def parse_bits(text: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8)."""
    match = _BITS.match(text.strip())
    if match is None:
        raise ValueError(
            f"bit setting {text!r} is not valid; expected the form W<weight bits>A<act bits>, e.g. W4A8"
        )
    return int(match.group(1)), int(match.group(2))


def check_minutes(name: str, value: object) -> None:
    """None or a positive, finite number of minutes."""
    ok = value is None or (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; expected None or a number of minutes > 0")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class BenchSettings:
    """Settings of `diffusers-ptq bench`; `BenchSettings.quick()` is the CI-sized variant."""

    presets: list[str] = field(
        default_factory=lambda: ["ptq4dm", "q-diffusion"], metadata=_help("presets, one row per bit setting")
    )
    bits: list[str] = field(default_factory=lambda: ["W8A8", "W6A6", "W4A8"], metadata=_help("bit settings"))
    num_samples: int = field(default=1000, metadata=_help("generated images per seed and row"))
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata=_help("noise seeds; rows are paired"))
    num_inference_steps: int = field(default=100, metadata=_help("DDIM steps for sampling and calibration"))
    batch_size: int = field(default=250, metadata=_help("images per pipeline call"))
    sqnr_samples: int = field(default=32, metadata=_help("float trajectories for the per-step noise error"))
    calibration_samples: int | None = field(
        default=None, metadata=_help("override each preset's calibration.num_samples (None: the preset's)")
    )
    reconstruction_minutes: float | None = field(
        default=None,
        metadata=_help(
            "per-row time budget of block reconstruction, applied as reconstruction.max_minutes to rows "
            "whose preset enables reconstruction (None: the preset's own)"
        ),
    )
    compare_quanto: bool = field(
        default=False,
        metadata=_help(
            "add a row with optimum-quanto's own W8A8 (quantize + Calibration over the q-diffusion row's "
            "calibration trajectories, then freeze); skipped with a note when optimum-quanto is missing"
        ),
    )

    @classmethod
    def quick(cls, **overrides: object) -> BenchSettings:
        """CI size: every row, DDIM 100 as in the full run, but 32 images, one seed, 64 calibration
        samples, 4 SQNR trajectories and 0.5 min of block reconstruction per reconstruction row.

        About 7 minutes on 2 CPU cores (estimated) for the default presets and bits; it shows that every
        row runs, not how good it is (FD on 32 images is mostly sampling noise).
        """
        base = {
            "num_samples": 32,
            "seeds": [0],
            "batch_size": 32,
            "sqnr_samples": 4,
            "calibration_samples": 64,
            "reconstruction_minutes": QUICK_RECONSTRUCTION_MINUTES,
        }
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        known = available_presets()
        for name in self.presets:
            if name not in known:
                raise ValueError(f"presets: {name!r} is not a preset; choose from {', '.join(known)}")
        for text in self.bits:
            parse_bits(text)
        for name in ("num_samples", "num_inference_steps", "batch_size", "sqnr_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; expected an integer >= 1")
        if self.num_samples < 2:
            raise ValueError(
                f"num_samples={self.num_samples} is invalid; FD needs at least 2 images per seed"
            )
        if not self.seeds or not all(isinstance(s, int) and s >= 0 for s in self.seeds):
            raise ValueError(f"seeds={self.seeds!r} is invalid; expected a non-empty list of integers >= 0")
        calib = self.calibration_samples
        if calib is not None and (not isinstance(calib, int) or calib < 1):
            raise ValueError(f"calibration_samples={calib!r} is invalid; expected None or an integer >= 1")
        check_minutes("reconstruction_minutes", self.reconstruction_minutes)
        if not isinstance(self.compare_quanto, bool):
            raise ValueError(f"compare_quanto={self.compare_quanto!r} is invalid; expected True or False")

    def rows(self) -> list[tuple[str, str | None, int | None, int | None]]:
        """(row name, preset, weight bits, act bits); the float row first."""
        out: list[tuple[str, str | None, int | None, int | None]] = [("float", None, None, None)]
        for text in self.bits:
            w, a = parse_bits(text)
            out += [(f"{preset} W{w}A{a}", preset, w, a) for preset in self.presets]
        return out

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
