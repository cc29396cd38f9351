"""The ablation's outputs: a markdown table per study, results.json, grids and a PNG plot.

- groups: `fd_vs_groups.png`, FD (and noise SQNR) against G, one line per bit setting.
- selectors: `fd_vs_calibration_size.png`, FD (and noise SQNR) against the calibration size (log2 axis),
  one line per selector (and bit setting).

The float model's FD is drawn as a horizontal line. Without a fidelity metric only the SQNR panel is drawn.
With one calibration draw the error bars are the sd over sampling seeds; with several, each point is a
recipe's mean over its draws and the error bar the sd over draws (the table then gains a summary per recipe,
`draws.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffusers_ptq.benchmark.ablation.benchmark import SEARCH_LABEL, AblationResult, AblationRow
from diffusers_ptq.benchmark.ablation.draws import by_recipe, draws_table, row_bias, summarise_draws
from diffusers_ptq.benchmark.ablation.settings import PER_STEP
from diffusers_ptq.benchmark.ablation.w4 import describe_recipe
from diffusers_ptq.benchmark.plotting import pyplot
from diffusers_ptq.benchmark.quality.benchmark import RowResult
from diffusers_ptq.benchmark.quality.report import _fmt, _spread, write_tables_and_grids
from diffusers_ptq.benchmark.quality.settings import parse_bits

PLOT_FILES = {"groups": "fd_vs_groups.png", "selectors": "fd_vs_calibration_size.png", "w4": "w4_parts.png"}


def _at_bits(result: AblationResult, bits: str) -> list[tuple[AblationRow, list[RowResult]]]:
    """The quantized recipes at the bit setting `bits` (e.g. 'W6A6'), each with its rows (one per draw)."""
    w, a = parse_bits(bits)
    return [(s, rows) for s, rows in by_recipe(result.pairs()) if (s.weight_bits, s.act_bits) == (w, a)]


def _groups_label(g: int | str | None) -> str:
    return "–" if g is None else ("per-step" if g == PER_STEP else str(g))


def ablation_table(result: AblationResult) -> str:
    """One line per row: what the row varies, FD (mean ± sd over seeds), gap to float, IS, SQNR, times."""
    float_fd = result.results[0].mean("FD")
    w4 = result.settings.study == "w4"
    if w4:
        varied = ["rounding", "weight scales", "bias correction", "G", "layers off the grid"]

        def cells_of(spec: AblationRow) -> list[str]:
            return ["–"] * len(varied) if spec.config is None else describe_recipe(spec.config)
    elif result.settings.study == "groups":
        varied = ["G", "group search"]

        def cells_of(spec: AblationRow) -> list[str]:
            return [
                _groups_label(spec.groups),
                "–" if spec.weight_bits is None else ("yes" if spec.search else "no"),
            ]
    else:
        varied = ["selector", "N", "G"]

        def cells_of(spec: AblationRow) -> list[str]:
            size = "–" if spec.size is None else str(spec.size)
            return [spec.selector or "–", size, _groups_label(spec.groups)]

    head = [
        "row",
        *varied,
        "FD ↓",
        "FD vs float",
        "IS ↑",
        "noise SQNR (dB) ↑",
        *(["noise bias ↓"] if w4 else []),
        "calibration (s)",
        "search (s, in calibration)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec, row in result.pairs():
        fd = row.mean("FD")
        gap = (
            "–"
            if fd is None or float_fd is None or spec.config is None
            else f"{100 * (fd - float_fd) / float_fd:+.1f} %"
        )
        cells = [
            row.name,
            *cells_of(spec),
            "–" if fd is None else f"{fd:.2f}{_spread(row.metrics['FD'])}",
            gap,
            _fmt(row.mean("IS")),
            _fmt(row.sqnr_db),
            *([_mean_bias(row)] if w4 else []),
            "–" if spec.config is None else f"{row.calibration_s:.1f}",
            "–" if row.search_s is None else f"{row.search_s:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if len(result.settings.calibration_seeds) > 1:
        summary = draws_table(summarise_draws(result.pairs(), float_fd))
        table += f"\n\nOver calibration draws (seeds {_seeds(result)}):\n\n{summary}"
    return table


def _seeds(result: AblationResult) -> str:
    return ", ".join(map(str, result.settings.calibration_seeds))


def _mean_bias(row: RowResult) -> str:
    """The noise bias averaged over steps, or '–' (the float row, or no trajectory)."""
    bias = row_bias(row)
    return "–" if bias is None else f"{bias:.4f}"


def _metric(rows: list[RowResult], name: str) -> tuple[float, float]:
    """One row: (mean, sd over seeds) of FD, or (SQNR, 0). Several rows (draws of one recipe): the mean of
    their values and the sd over draws. NaN when missing."""
    if len(rows) > 1:
        values = [_metric([row], name)[0] for row in rows]
        return float(np.mean(values)), float(np.std(values, ddof=1))
    row = rows[0]
    if name == "sqnr":
        return (np.nan if row.sqnr_db is None else row.sqnr_db), 0.0
    values = row.metrics.get(name) or []
    if not values:
        return np.nan, 0.0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _panels(result: AblationResult) -> list[tuple[str, str]]:
    has_fd = any(row.metrics.get("FD") for row in result.results)
    panels = [("FD", "FD ↓ (classifier features)")] if has_fd else []
    return [*panels, ("sqnr", "noise SQNR vs float (dB) ↑")]


def _plot(result: AblationResult, path: Path, draw: Callable, xlabel: str, title: str) -> None:
    plt = pyplot()
    panels = _panels(result)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), dpi=120, squeeze=False)
    for ax, (metric, ylabel) in zip(axes[0], panels):
        draw(ax, metric)
        if metric == "FD":
            float_fd = result.results[0].mean("FD")
            if float_fd is not None:
                ax.axhline(float_fd, color="0.4", linestyle=":", linewidth=1.2, label="float")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if len(result.settings.calibration_seeds) > 1:
        title += f"\n(each recipe: mean ± sd over calibration seeds {_seeds(result)})"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_groups_plot(result: AblationResult, path: Path) -> None:
    """FD and SQNR against the number of timestep groups, one line per bit setting."""
    groups = list(result.settings.groups)
    labels = [_groups_label(g) for g in groups]

    def draw(ax: object, metric: str) -> None:
        for bits in result.settings.bit_settings:
            stats = {spec.groups: _metric(rows, metric) for spec, rows in _at_bits(result, bits)}
            mean = [stats.get(g, (np.nan, 0.0))[0] for g in groups]
            sd = [stats.get(g, (np.nan, 0.0))[1] for g in groups]
            ax.errorbar(range(len(groups)), mean, yerr=sd, marker="o", capsize=3, label=bits.upper())
        ax.set_xticks(range(len(groups)), labels)

    _plot(result, path, draw, "timestep groups G", "Timestep groups: G = 1 (no search), searched G, per-step")


def save_selectors_plot(result: AblationResult, path: Path) -> None:
    """FD and SQNR against the calibration size (log2 axis), one line per selector and bit setting."""
    sizes = sorted(result.settings.sizes)
    several_bits = len(result.settings.bit_settings) > 1
    labels = list(dict.fromkeys(spec.selector for spec in result.rows if spec.selector is not None))

    def draw(ax: object, metric: str) -> None:
        for bits in result.settings.bit_settings:
            for label in labels:
                at_bits = _at_bits(result, bits)
                stats = {spec.size: _metric(rows, metric) for spec, rows in at_bits if spec.selector == label}
                mean = [stats.get(n, (np.nan, 0.0))[0] for n in sizes]
                sd = [stats.get(n, (np.nan, 0.0))[1] for n in sizes]
                name = f"{bits.upper()} {label}" if several_bits else label
                style = "--" if label == SEARCH_LABEL else "-"
                ax.errorbar(sizes, mean, yerr=sd, marker="o", linestyle=style, capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])

    _plot(
        result, path, draw, "calibration samples N (log2)", "Calibration-sample selectors by calibration size"
    )


def save_w4_plot(result: AblationResult, path: Path) -> None:
    """FD and SQNR of every row as bars (one colour per bit setting), float FD as a dotted line."""
    quantized = by_recipe(result.pairs())

    def draw(ax: object, metric: str) -> None:
        for bits in result.settings.bit_settings:
            w, a = parse_bits(bits)
            index = [i for i, (s, _) in enumerate(quantized) if (s.weight_bits, s.act_bits) == (w, a)]
            stats = [_metric(quantized[i][1], metric) for i in index]
            ax.bar(
                index,
                [m for m, _ in stats],
                yerr=[sd for _, sd in stats],
                capsize=2,
                label=bits.upper(),
            )
        ax.set_xticks(range(len(quantized)), [spec.recipe for spec, _ in quantized], rotation=60, ha="right")

    _plot(result, path, draw, "", "4-bit weights: rounding, group scales, bias correction, timestep groups")


def write_ablation_outputs(result: AblationResult, directory: Path, header: str = "") -> None:
    """results.json, table.md, the study's plot and grids/<row>.png into `directory` (which exists)."""
    table = ablation_table(result)
    write_tables_and_grids(directory, result.to_dict(), table, result.notes, result.grids, header)
    plots = {"groups": save_groups_plot, "selectors": save_selectors_plot, "w4": save_w4_plot}
    plot = plots[result.settings.study]
    plot(result, directory / PLOT_FILES[result.settings.study])
