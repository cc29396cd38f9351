"""SensitivityReport: per unit and per step noise-prediction error and bias, ranked; table, JSON and plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers_ptq.benchmark.plotting import pyplot
from diffusers_ptq.config_mixed import SENSITIVITY_METRICS


@dataclass
class UnitSensitivity:
    """One unit's numbers: overall and per step (aligned with `SensitivityReport.steps`)."""

    name: str
    kind: str  # "layer" | "attention" | "group"
    size: int  # quantized modules switched on together
    mse: float
    sqnr_db: float
    bias: float  # mean over steps of the per-step bias
    mse_per_step: list[float]
    sqnr_per_step: list[float]
    bias_per_step: list[float]

    def score(self, metric: str) -> float:
        return self.mse if metric == "mse" else self.bias


@dataclass
class SensitivityReport:
    """Everything `measure_sensitivity` found; `ranked()` orders units, most sensitive first."""

    tag: str  # the recipe's bit widths, e.g. 'w4a8'
    metric: str  # the default ranking metric
    rows: int  # calibration rows measured
    steps: list[int]  # sampling-step indices with rows
    timesteps: list[float]  # their timesteps
    units: list[UnitSensitivity] = field(default_factory=list)

    def ranked(
        self, kind: str | tuple[str, ...] | None = None, metric: str | None = None
    ) -> list[UnitSensitivity]:
        """Units (of `kind`, e.g. 'layer' or ('layer', 'attention')), most sensitive first by `metric`."""
        metric = metric or self.metric
        if metric not in SENSITIVITY_METRICS:
            raise ValueError(f"metric={metric!r} is invalid; expected one of {SENSITIVITY_METRICS}")
        kinds = (kind,) if isinstance(kind, str) else kind
        chosen = [u for u in self.units if kinds is None or u.kind in kinds]
        return sorted(chosen, key=lambda u: (-_finite(u.score(metric)), u.name))

    def get(self, name: str) -> UnitSensitivity:
        for unit in self.units:
            if unit.name == name:
                return unit
        raise KeyError(f"no unit named {name!r}; units: {[u.name for u in self.units][:8]} ...")

    def table(self, kind: str | tuple[str, ...] | None = None, top: int | None = None) -> str:
        """Markdown table of the ranked units."""
        lines = [
            "| rank | unit | kind | modules | noise MSE | SQNR dB | bias (mean over steps) |",
            "|---:|---|---|---:|---:|---:|---:|",
        ]
        for i, u in enumerate(self.ranked(kind)[:top], start=1):
            lines.append(
                f"| {i} | {u.name} | {u.kind} | {u.size} | {u.mse:.4g} | {u.sqnr_db:.2f} | {u.bias:.4g} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "metric": self.metric,
            "rows": self.rows,
            "steps": self.steps,
            "timesteps": self.timesteps,
            "units": [u.__dict__ for u in self.ranked()],
        }

    def plot(self, path: str | Path, top: int = 12) -> None:
        """PNG: ranked bars of the top layers and of the groups, and per-step curves of the top layers."""
        plt = pyplot()
        layers = self.ranked(("layer", "attention"))[:top]
        groups = self.ranked("group")
        metric = self.metric
        label = "noise MSE" if metric == "mse" else "bias ||E[eps_q - eps]||"
        fig, axes = plt.subplots(1, 3, figsize=(16, max(3.5, 0.28 * max(len(layers), len(groups)) + 1.5)))
        # Groups span orders of magnitude (embeddings vs everything): a log axis; the top layers a linear one.
        panels = ((axes[0], layers, "layers", "linear"), (axes[1], groups, "groups", "log"))
        for ax, units, title, scale in panels:
            names = [u.name for u in units][::-1]
            ax.barh(names, [u.score(metric) for u in units][::-1], color="tab:red")
            ax.set_title(f"{title}, quantized alone ({self.tag}): {label}", fontsize=8)
            ax.set_xscale(scale)
            ax.tick_params(labelsize=6, which="both")
        ax = axes[2]
        for u in layers[: min(6, len(layers))]:
            ax.plot(self.timesteps, u.mse_per_step if metric == "mse" else u.bias_per_step, label=u.name)
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("timestep (sampling runs left to right)", fontsize=8)
        ax.set_title(f"{label} per step, most sensitive layers", fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf
