"""What `diffusers-ptq bench --ablation` runs: the study, its lists, sample counts, seeds and cost caps.

Two studies reproduce the seed papers' ablations in miniature (recipes: `benchmark/ablation/benchmark.py`):

- "groups": timestep groups G (1, 4, 8, 16, per-step) at each bit setting (APQ-DM Table 5).
- "selectors": calibration-sample selectors at each calibration size (APQ-DM Fig. 5 / EDA-DM Table 6).
- "w4": GPTQ, group-wise scales, bias correction and timestep groups at 4-bit weights (`ablation/w4.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from math import inf

from diffusers_ptq.benchmark.quality.settings import BenchSettings, parse_bits

STUDIES = ("groups", "selectors", "w4")
# Row labels of the selectors study; "random+search" is added next to "active" (its fair baseline).
SELECTORS = ("random", "normal", "uniform", "density_diversity", "active")
PER_STEP = "per_step"
MAX_GROUPS = 1000  # activations.timestep_groups' own limit
DEFAULT_BITS = {"groups": ["W6A6", "W8A8"], "selectors": ["W6A6"], "w4": ["W4A8"]}
_GROUPS_EXPECTED = f"an integer in [1, {MAX_GROUPS}] or 'per_step'"


def parse_groups(text: str) -> int | str:
    """'8' -> 8, 'per_step' / 'per-step' -> 'per_step'; anything else is a ValueError naming the choices."""
    value = text.strip().lower().replace("-", "_")
    if value == PER_STEP:
        return PER_STEP
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"groups: {text!r} is not valid; expected {_GROUPS_EXPECTED}") from None


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class AblationSettings:
    """Settings of `diffusers-ptq bench --ablation`; `AblationSettings.quick(study)`: smoke-test size."""

    study: str = field(default="groups", metadata=_help("which ablation: 'groups', 'selectors' or 'w4'"))
    bits: list[str] | None = field(
        default=None,
        metadata=_help("bit settings (None: W6A6,W8A8 for 'groups', W6A6 for 'selectors', W4A8 for 'w4')"),
    )
    groups: list[int | str] = field(
        default_factory=lambda: [1, 4, 8, 16, PER_STEP],
        metadata=_help("'groups': timestep groups G; 1 and 'per_step' without search, others searched"),
    )
    selectors: list[str] = field(
        default_factory=lambda: list(SELECTORS), metadata=_help("'selectors': the selectors to compare")
    )
    sizes: list[int] = field(
        default_factory=lambda: [128, 256, 512, 1024],
        metadata=_help("'selectors': calibration sizes (calibration.num_samples)"),
    )
    calibration_samples: int | None = field(
        default=None,
        metadata=_help(
            "'groups' / 'w4': calibration samples of every row (None: apq-dm's 1,024 / the default recipe's)"
        ),
    )
    calibration_seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata=_help(
            "seeds of the calibration draws (calibration.seed: the calibration trajectories' noise and the "
            "observers' subsample); every quantized row runs once per draw, on the same sampling noise "
            "(`seeds`) and float row, and several draws add a per-recipe summary (mean and spread)"
        ),
    )
    search_epochs: int | None = field(
        default=None, metadata=_help("group-search epochs after selection (None: apq-dm's 10)")
    )
    search_images: int | None = field(
        default=None,
        metadata=_help("clean images the group search's noise target is drawn from (None: apq-dm's 1,024)"),
    )
    search_lambda: float | None = field(
        default=None, metadata=_help("the group search's entropy weight (None: apq-dm's 0.8)")
    )
    search_init_logit: float | None = field(
        default=None, metadata=_help("the group search's starting logit of the initial group (None: 1.0)")
    )
    feature_samples: int | None = field(
        default=None,
        metadata=_help("'density_diversity': trajectories of the float feature pass (None: eda-dm's 1,024)"),
    )
    rows: list[str] | None = field(
        default=None,
        metadata=_help("'w4': the row labels to run, in the study's order (None: all of them)"),
    )
    reconstruction_minutes: float | None = field(
        default=None,
        metadata=_help("'w4': time cap of the rows that reconstruct (reconstruction.max_minutes; None: 5)"),
    )
    num_samples: int = field(default=250, metadata=_help("generated images per seed and row"))
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata=_help("noise seeds; rows are paired"))
    num_inference_steps: int = field(default=100, metadata=_help("DDIM steps for sampling and calibration"))
    batch_size: int = field(default=250, metadata=_help("images per pipeline call"))
    sqnr_samples: int = field(default=32, metadata=_help("float trajectories for the per-step noise error"))

    @classmethod
    def quick(cls, study: str = "groups", **overrides: object) -> AblationSettings:
        """Every row of the study at toy sizes (DDIM 20, 16 images, 16/32 calibration samples, one search
        epoch): a smoke test that the study runs end to end, in about a minute on the shipped model."""
        base = {
            "study": study,
            "sizes": [16, 32],
            "calibration_samples": 32,
            "search_epochs": 1,
            "search_images": 16,
            "feature_samples": 8,
            "num_samples": 16,
            "seeds": [0],
            "num_inference_steps": 20,
            "batch_size": 16,
            "sqnr_samples": 4,
        }
        if study == "w4":
            base["reconstruction_minutes"] = 0.05
        return cls(**{**base, **overrides})

    @property
    def bit_settings(self) -> list[str]:
        return list(DEFAULT_BITS.get(self.study, [])) if self.bits is None else list(self.bits)

    def sampling(self) -> BenchSettings:
        """The sampling half as the quality benchmark's settings (what `run_row` reads)."""
        return BenchSettings(
            presets=[],
            bits=[],
            num_samples=self.num_samples,
            seeds=list(self.seeds),
            num_inference_steps=self.num_inference_steps,
            batch_size=self.batch_size,
            sqnr_samples=self.sqnr_samples,
        )

    def validate(self) -> None:
        """ValueError naming the setting, the bad value and what is allowed; nothing runs before this."""
        if self.study not in STUDIES:
            raise ValueError(f"study={self.study!r} is invalid; expected one of {', '.join(STUDIES)}")
        if not self.bit_settings:
            raise ValueError("bits=[] is invalid; expected at least one bit setting such as W6A6")
        for text in self.bit_settings:
            parse_bits(text)
        self.sampling().validate()
        if self.study == "groups":
            self._validate_groups()
        elif self.study == "selectors":
            self._validate_selectors()
        self._validate_rows()
        if not self.calibration_seeds:
            raise ValueError("calibration_seeds=[] is invalid; expected at least one seed, an integer >= 0")
        for seed in self.calibration_seeds:
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise ValueError(f"calibration_seeds: {seed!r} is not a valid seed; expected integers >= 0")
        _no_repeats("calibration_seeds", self.calibration_seeds)
        for name in ("calibration_samples", "search_images", "feature_samples"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"{name}={value!r} is invalid; expected None or an integer >= 1")
        for name in ("search_lambda", "search_init_logit"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and not (number and 0 <= value < inf):
                raise ValueError(f"{name}={value!r} is invalid; expected None or a finite number >= 0")
        minutes = self.reconstruction_minutes
        if minutes is not None:
            number = isinstance(minutes, (int, float)) and not isinstance(minutes, bool)
            if not (number and 0 < minutes < inf):
                raise ValueError(
                    f"reconstruction_minutes={minutes!r} is invalid; expected None or a number > 0"
                )
            if self.study != "w4":
                raise ValueError(f"reconstruction_minutes applies to the 'w4' study only, not {self.study!r}")
        epochs = self.search_epochs
        if epochs is not None and not (_positive_int(epochs) or epochs == 0):
            raise ValueError(f"search_epochs={epochs!r} is invalid; expected None or an integer >= 0")

    def _validate_rows(self) -> None:
        if self.rows is None:
            return
        if self.study != "w4":
            raise ValueError(f"rows={self.rows!r} applies to the 'w4' study only, not {self.study!r}")
        # Imported here: w4.py builds PTQConfig recipes, which this settings module does not otherwise need.
        from diffusers_ptq.benchmark.ablation.w4 import W4_ROWS

        if not self.rows:
            raise ValueError(f"rows=[] is invalid; expected some of {', '.join(W4_ROWS)}")
        for label in self.rows:
            if label not in W4_ROWS:
                raise ValueError(f"rows: {label!r} is not a w4 row; choose from {', '.join(W4_ROWS)}")
        _no_repeats("rows", self.rows)

    def _validate_groups(self) -> None:
        if not self.groups:
            raise ValueError(f"groups=[] is invalid; expected a list of {_GROUPS_EXPECTED}")
        for g in self.groups:
            ok = g == PER_STEP or (_positive_int(g) and g <= MAX_GROUPS)
            if not ok:
                raise ValueError(f"groups: {g!r} is not valid; expected {_GROUPS_EXPECTED}")
        _no_repeats("groups", self.groups)

    def _validate_selectors(self) -> None:
        if not self.selectors:
            raise ValueError(f"selectors=[] is invalid; expected some of {', '.join(SELECTORS)}")
        for name in self.selectors:
            if name not in SELECTORS:
                raise ValueError(f"selectors: {name!r} is not a selector; choose from {', '.join(SELECTORS)}")
        _no_repeats("selectors", self.selectors)
        if not self.sizes:
            raise ValueError("sizes=[] is invalid; expected calibration sizes, integers >= 1")
        for size in self.sizes:
            if not _positive_int(size):
                raise ValueError(f"sizes: {size!r} is not a valid calibration size; expected an integer >= 1")
        _no_repeats("sizes", self.sizes)

    def to_dict(self) -> dict[str, object]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bits"] = self.bit_settings
        return out


def _no_repeats(name: str, values: list) -> None:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{name}: {', '.join(repeated)} listed more than once; list each value once")
