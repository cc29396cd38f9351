"""The quality benchmark's outputs: a markdown table, a PNG sample grid per row, PNG per-step plots of the
noise SQNR and of the noise bias."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from diffusers_ptq.benchmark.plotting import pyplot
from diffusers_ptq.benchmark.quality.benchmark import BenchResult, RowResult


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f" ± {np.std(values, ddof=1):.2f}"


def _gap(row: RowResult, float_fd: float | None) -> str:
    fd = row.mean("FD")
    if fd is None or float_fd is None or row.preset is None:
        return "–"
    return f"{100.0 * (fd - float_fd) / float_fd:+.1f} %"


def markdown_table(result: BenchResult) -> str:
    """One line per row: FD (mean ± sd over seeds), gap to float, IS, extra metrics, noise error, times."""
    float_fd = result.rows[0].mean("FD")
    extra = sorted({name for row in result.rows for name in row.metrics} - {"FD", "IS"})
    head = ["row", "FD ↓", "FD vs float", "IS ↑", *extra, "noise MSE ↓", "noise SQNR (dB) ↑", "noise bias ↓"]
    searched = any(row.search_s is not None for row in result.rows)
    head += ["calibration (s)", *(["search (s, in calibration)"] if searched else []), "sampling (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.rows:
        fd = row.mean("FD")
        cells = [
            row.name,
            "–" if fd is None else f"{fd:.2f}{_spread(row.metrics['FD'])}",
            _gap(row, float_fd),
            _fmt(row.mean("IS")),
            *(_fmt(row.mean(name)) for name in extra),
            "–" if not row.mse_per_step else f"{np.mean(row.mse_per_step):.2e}",
            _fmt(row.sqnr_db),
            "–" if not row.bias_per_step else f"{np.mean(row.bias_per_step):.2e}",
            "–" if row.preset is None else f"{row.calibration_s:.1f}",
            *([_fmt(row.search_s, 1)] if searched else []),
            f"{row.sampling_s:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_table(references: dict[str, dict[str, float]], result: BenchResult) -> str:
    """What the metric says of real data and of noise, next to the float model: it must discriminate."""
    lines = ["| images | FD | IS |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(v['FD'])} | {_fmt(v.get('IS'))} |" for name, v in references.items()]
    float_row = result.rows[0]
    label = f"float model samples ({result.settings.num_samples} per seed, mean)"
    lines.append(f"| {label} | {_fmt(float_row.mean('FD'))} | {_fmt(float_row.mean('IS'))} |")
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 8, scale: int = 3) -> None:
    """Images (N, C, H, W) in [-1, 1] as one PNG grid, upscaled by `scale` (nearest)."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = torch.ones(c, rows * (h + 2), columns * (w + 2))
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        canvas[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, k * (w + 2) + 1 : k * (w + 2) + 1 + w] = image
    pixels = ((canvas.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def _per_step_plot(result: BenchResult, path: Path, values: str, ylabel: str, title: str, log: bool) -> None:
    """One line per quantized row of `row.<values>` against the sampling timesteps."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for row in result.rows:
        if getattr(row, values):
            style = "-" if row.preset == result.settings.presets[0] else "--"
            ax.plot(result.timesteps, getattr(row, values), style, label=row.name, linewidth=1.3)
    ax.set_xlabel("timestep t (sampling runs left to right)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_sqnr_plot(result: BenchResult, path: Path) -> None:
    """Noise-prediction SQNR against the float UNet, per sampling step, one line per quantized row."""
    ylabel = "noise-prediction SQNR vs float (dB)"
    title = "Per-step error of the quantized UNet on float DDIM trajectories"
    _per_step_plot(result, path, "sqnr_per_step", ylabel, title, log=False)


def save_bias_plot(result: BenchResult, path: Path) -> None:
    """Noise-prediction bias per sampling step (`mean_error_rms`), one line per quantized row, log scale."""
    ylabel = "RMS over (C, H, W) of mean over samples of eps_q - eps"
    title = "Per-step bias of the quantized UNet's noise prediction on float DDIM trajectories"
    _per_step_plot(result, path, "bias_per_step", ylabel, title, log=True)


def write_tables_and_grids(
    directory: Path, data: dict, table: str, notes: list[str], grids: dict[str, torch.Tensor], header: str
) -> None:
    """results.json, table.md (header, table, notes) and grids/<row>.png into `directory` (which exists)."""
    (directory / "results.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    quoted = "".join(f"\n> {note}\n" for note in notes)
    (directory / "table.md").write_text(f"{header}{table}\n{quoted}", encoding="utf-8")
    folder = directory / "grids"
    folder.mkdir(exist_ok=True)
    for name, images in grids.items():
        if images.numel():
            save_image_grid(images, folder / f"{_slug(name)}.png")


def write_outputs(result: BenchResult, directory: Path, header: str = "") -> None:
    """results.json, table.md, sqnr_per_step.png, noise_bias_per_step.png and grids/<row>.png into
    `directory` (which exists)."""
    table = markdown_table(result)
    write_tables_and_grids(directory, result.to_dict(), table, result.notes, result.grids, header)
    if any(row.sqnr_per_step for row in result.rows):
        save_sqnr_plot(result, directory / "sqnr_per_step.png")
    if any(row.bias_per_step for row in result.rows):
        save_bias_plot(result, directory / "noise_bias_per_step.png")
