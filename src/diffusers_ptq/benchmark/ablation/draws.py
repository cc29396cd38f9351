"""Several calibration draws in one ablation: how their rows are named, and each recipe's summary over draws.

The calibration draw (`calibration.seed`: which noise trajectories calibrate, which samples the observers
keep) moves a recipe's FD by several points on the benchmark models (BENCHMARKS.md §8), as much as the
differences between the recipes compared there. `AblationSettings.calibration_seeds` runs every quantized
row once per draw, on the same sampling noise and against the same float row; this module summarises each
recipe over its draws: the FD change per draw, its mean and its spread (max - min), with the mean noise
SQNR and noise bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from diffusers_ptq.benchmark.quality.benchmark import RowResult


class AblationRow(Protocol):
    """What this module reads of `ablation.benchmark.AblationRow` (not imported: that module imports this)."""

    recipe: str
    calibration_seed: int | None
    config: Any


def draw_name(recipe: str, seed: int, draws: int) -> str:
    """A row's name: the recipe's alone with one draw (as in results made before draws existed), else the
    recipe tagged with its calibration seed."""
    return recipe if draws == 1 else f"{recipe} [calibration seed {seed}]"


def row_bias(row: RowResult) -> float | None:
    """The noise bias averaged over steps; None without a trajectory or for the float row."""
    steps = row.bias_per_step
    return None if not steps or row.weight_bits is None else float(np.mean(steps))


def _mean(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else float(np.mean(values))


@dataclass
class DrawSummary:
    """One recipe over its calibration draws (lists in the order of `seeds`)."""

    recipe: str
    seeds: list[int]
    fd_change: list[float | None]  # FD vs float in percent per draw (None: no fidelity metric)
    sqnr_db: list[float | None]
    bias: list[float | None]

    @property
    def fd_change_mean(self) -> float | None:
        return _mean(self.fd_change)

    @property
    def fd_change_spread(self) -> float | None:
        """max - min of the FD change over draws, in percentage points."""
        if self.fd_change_mean is None:
            return None
        values = [v for v in self.fd_change if v is not None]
        return max(values) - min(values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "calibration_seeds": self.seeds,
            "fd_change_pct": self.fd_change,
            "fd_change_mean_pct": self.fd_change_mean,
            "fd_change_spread_points": self.fd_change_spread,
            "sqnr_db": self.sqnr_db,
            "sqnr_db_mean": _mean(self.sqnr_db),
            "bias": self.bias,
            "bias_mean": _mean(self.bias),
        }


def by_recipe(pairs: Sequence[tuple[AblationRow, RowResult]]) -> list[tuple[AblationRow, list[RowResult]]]:
    """The quantized rows grouped by recipe, in order of first appearance; each recipe's first row spec
    stands for all of its draws (they differ in the calibration seed only)."""
    groups: dict[str, tuple[AblationRow, list[RowResult]]] = {}
    for spec, row in pairs:
        if spec.config is not None:
            groups.setdefault(spec.recipe, (spec, []))[1].append(row)
    return list(groups.values())


def summarise_draws(
    pairs: Sequence[tuple[AblationRow, RowResult]], float_fd: float | None
) -> list[DrawSummary]:
    """Per recipe: FD change against `float_fd` (the float row's mean FD), SQNR and bias, per draw."""
    summaries = []
    for spec, rows in by_recipe(pairs):
        seeds = [s.calibration_seed for s, _ in pairs if s.config is not None and s.recipe == spec.recipe]
        changes = []
        for row in rows:
            fd = row.mean("FD")
            changes.append(None if fd is None or not float_fd else 100.0 * (fd - float_fd) / float_fd)
        sqnr = [row.sqnr_db for row in rows]
        summaries.append(DrawSummary(spec.recipe, seeds, changes, sqnr, [row_bias(row) for row in rows]))
    return summaries


def _cell(value: float | None, form: str) -> str:
    return "–" if value is None else format(value, form)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1f} %"


def draws_table(summaries: Sequence[DrawSummary]) -> str:
    """One line per recipe: FD vs float on each draw, its mean and spread, mean SQNR and bias."""
    head = [
        "recipe",
        "FD vs float per draw (calibration seed: change)",
        "mean",
        "spread (max − min, points)",
        "noise SQNR (dB), mean",
        "noise bias, mean",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        per_draw = ", ".join(f"{seed}: {_pct(v)}" for seed, v in zip(s.seeds, s.fd_change))
        cells = [
            s.recipe,
            per_draw,
            _pct(s.fd_change_mean),
            _cell(s.fd_change_spread, ".1f"),
            _cell(_mean(s.sqnr_db), ".2f"),
            _cell(_mean(s.bias), ".4f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
