"""What the quality benchmark runs: rows (float + preset x bit widths), sample counts, seeds."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from diffusers_ptq.benchmark.metrics.clip_score import DEFAULT_CLIP_MODEL
from diffusers_ptq.methods import available_presets

# --quick: block reconstruction per row that enables it (the default presets: q-diffusion's 3 rows).
QUICK_RECONSTRUCTION_MINUTES = 0.5
_BITS = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)
# Settings of text-to-image runs only; left out of to_dict() without prompts, so unconditional runs record
# exactly what they recorded before text-to-image rows existed.
TEXT_FIELDS = ("prompts", "guidance_scale", "clip_model")


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


def check_seed(name: str, value: object) -> None:
    """An integer >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= 0")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class BenchSettings:
    """Settings of `diffusers-ptq bench`; `BenchSettings.quick()` is the CI-sized variant."""

    presets: list[str] = field(
        default_factory=lambda: ["default", "ptq4dm", "q-diffusion"],
        metadata=_help("presets, one row per bit setting ('default': PTQConfig(), the default recipe)"),
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
    calibration_seed: int = field(
        default=0,
        metadata=_help(
            "seed of the calibration draw (calibration.seed: the calibration trajectories' noise and the "
            "observers' subsample), the same for every row; the sampling noise is `seeds`"
        ),
    )
    reconstruction_minutes: float | None = field(
        default=None,
        metadata=_help(
            "per-row time budget of block reconstruction, applied as reconstruction.max_minutes to rows "
            "whose preset enables reconstruction (None: the preset's own)"
        ),
    )
    reconstruction: bool = field(
        default=True,
        metadata=_help(
            "False: every preset runs with block reconstruction off (--no-reconstruction), so the table can "
            "be reproduced on a CPU; True: presets reconstruct as published (q-diffusion: ~11 h per row on "
            "2 CPU cores)"
        ),
    )
    compare_quanto: bool = field(
        default=False,
        metadata=_help(
            "add a row with optimum-quanto's own W8A8 (quantize + Calibration over the q-diffusion row's "
            "calibration trajectories, then freeze); skipped with a note when optimum-quanto is missing"
        ),
    )
    prompts: list[str] | None = field(
        default=None,
        metadata=_help(
            "text-to-image models: image i of every seed and row is generated from prompt i mod "
            "len(prompts); the same list, cycled, is the calibration prompts. None: unconditional models"
        ),
    )
    guidance_scale: float = field(
        default=7.5,
        metadata=_help("text-to-image: classifier-free guidance scale for sampling and calibration"),
    )
    clip_model: str = field(
        default=DEFAULT_CLIP_MODEL,
        metadata=_help(
            "text-to-image: CLIP model of the CLIP score (Hub id already in the local cache, or a local "
            "directory; never downloaded)"
        ),
    )

    @classmethod
    def quick(cls, **overrides: object) -> BenchSettings:
        """CI size: every row, DDIM 100 as in the full run, but 32 images, one seed, 64 calibration
        samples, 4 SQNR trajectories and 0.5 min of block reconstruction per reconstruction row.

        It shows that every row runs, not how good it is (FD on 32 images is mostly sampling noise).
        """
        base = {
            "num_samples": 32,
            "seeds": [0],
            "batch_size": 32,
            "sqnr_samples": 4,
            "calibration_samples": 64,
        }
        if overrides.get("reconstruction", True):  # no time budget for reconstruction that does not run
            base["reconstruction_minutes"] = QUICK_RECONSTRUCTION_MINUTES
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
        check_seed("calibration_seed", self.calibration_seed)
        check_minutes("reconstruction_minutes", self.reconstruction_minutes)
        if not isinstance(self.reconstruction, bool):
            raise ValueError(f"reconstruction={self.reconstruction!r} is invalid; expected True or False")
        if not self.reconstruction and self.reconstruction_minutes is not None:
            raise ValueError(
                f"reconstruction_minutes={self.reconstruction_minutes!r} applies only with reconstruction; "
                "drop --reconstruction-minutes or --no-reconstruction"
            )
        if not isinstance(self.compare_quanto, bool):
            raise ValueError(f"compare_quanto={self.compare_quanto!r} is invalid; expected True or False")
        self._validate_text()

    def _validate_text(self) -> None:
        prompts = self.prompts
        if prompts is not None and (
            not isinstance(prompts, list)
            or not prompts
            or not all(isinstance(p, str) and p.strip() for p in prompts)
        ):
            shown = prompts if not isinstance(prompts, list) or len(prompts) <= 3 else [*prompts[:3], "..."]
            raise ValueError(
                f"prompts={shown!r} is invalid; expected None (unconditional models) or a non-empty list of "
                "non-empty strings"
            )
        scale = self.guidance_scale
        if not (
            isinstance(scale, int | float)
            and not isinstance(scale, bool)
            and math.isfinite(scale)
            and scale >= 0
        ):
            raise ValueError(f"guidance_scale={scale!r} is invalid; expected a finite number >= 0")
        if not isinstance(self.clip_model, str) or not self.clip_model.strip():
            raise ValueError(
                f"clip_model={self.clip_model!r} is invalid; expected a Hub model id or a local directory"
            )
        if prompts is not None and self.compare_quanto:
            raise ValueError(
                "compare_quanto=True is invalid with prompts: the optimum-quanto row calibrates "
                "unconditional pipelines only; drop compare_quanto (--compare-quanto) for text-to-image"
            )

    def rows(self) -> list[tuple[str, str | None, int | None, int | None]]:
        """(row name, preset, weight bits, act bits); the float row first."""
        out: list[tuple[str, str | None, int | None, int | None]] = [("float", None, None, None)]
        for text in self.bits:
            w, a = parse_bits(text)
            out += [(f"{preset} W{w}A{a}", preset, w, a) for preset in self.presets]
        return out

    def to_dict(self) -> dict[str, object]:
        skip = TEXT_FIELDS if self.prompts is None else ()
        if self.reconstruction:  # recorded only when off, so earlier runs' results.json read the same
            skip = (*skip, "reconstruction")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
