"""The speed benchmark's outputs: table.md, results.json and speed.png (latency and peak memory bars)."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers_ptq.benchmark.plotting import pyplot
from diffusers_ptq.benchmark.speed.benchmark import ModelResult, SpeedResult
from diffusers_ptq.benchmark.speed.check import SQNR_CAP_DB

MB = 1e6


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.2f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / MB:,.1f}"


def _sqnr_note(sqnr: float | None) -> list[str]:
    if sqnr is None:
        return []
    return ["output identical to float" if sqnr >= SQNR_CAP_DB else f"output SQNR {sqnr:g} dB vs float"]


def model_table(model: ModelResult) -> str:
    """One line per row: latency (median, quartiles), speedup, peak memory and weights against float."""
    head = [
        "row", "median ms / step", "p25–p75 ms", "speedup vs float", "peak memory (MB)", "vs float",
        "weights (MB)", "vs float", "first call (s)", "notes",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for row in model.rows:
        if not row.ok:
            status = "ERROR" if row.error else "skipped"
            cells = [row.label, *["–"] * (len(head) - 2), f"{status}: {row.reason}"]
        else:
            cells = [
                row.label,
                _ms(row.median_ms),
                f"{_ms(row.p25_ms)}–{_ms(row.p75_ms)}",
                _ratio(row.speedup),
                _mb(row.peak_bytes),
                _ratio(row.memory_ratio),
                _mb(row.weight_bytes),
                _ratio(row.weight_ratio),
                "–" if row.first_call_s is None else f"{row.first_call_s:.1f}",
                "; ".join(row.notes + _sqnr_note(row.output_sqnr_db)),
            ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def markdown_report(result: SpeedResult) -> str:
    """Every model's table under a heading naming the model, its inputs and what peak memory means."""
    parts = []
    for model in result.models:
        params = "" if model.parameters is None else f", {model.parameters / 1e6:,.1f} M parameters"
        inputs = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in model.inputs.items())
        kinds = sorted({row.peak_kind for row in model.rows if row.ok})
        lines = [f"### {model.name}: {model.description}{params}", ""]
        if inputs:
            lines += [f"Inputs: {inputs}. Peak memory: {', '.join(kinds) or '–'}.", ""]
        lines.append(model_table(model))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def header(result: SpeedResult, command: str | None = None) -> str:
    s = result.settings
    memory = (
        "GPU: torch.cuda.max_memory_allocated over the timed calls"
        if result.device_type == "cuda"
        else "CPU: process peak RSS over the row's timed calls (includes the float UNet kept for the other "
        "rows and the Python process); 'weights' counts the row's parameters, buffers and prepacked copies"
    )
    libs = ", ".join(f"{k} {v or 'not installed'}" for k, v in result.libraries.items())
    lines = [
        *([f"Command: `{command}`  "] if command else []),
        f"Device: {result.device}; dtype {result.dtype}; {libs}.  ",
        f"Per row: 1 untimed first call (compiles), {s.warmup} warm-up, {s.repeats} timed UNet calls "
        f"cycling over 10 timesteps; total {result.seconds / 60:.1f} min.  ",
        f"Memory: {memory}.",
    ]
    return "\n".join(lines) + "\n\n"


def save_speed_plot(result: SpeedResult, path: Path) -> None:
    """Per model: median latency per step (whiskers: min-max), peak memory and weight bytes; skipped rows
    are marked."""
    plt = pyplot()
    n = len(result.models)
    fig, axes = plt.subplots(n, 2, figsize=(13, 3.2 + 0.35 * 7 * n), dpi=110, squeeze=False)
    for (ax_t, ax_m), model in zip(axes, result.models):
        labels = [row.label for row in model.rows]
        y = list(range(len(labels)))
        titles = ("median ms per UNet step (whiskers: min-max)", "peak memory; black: weights (MB)")
        for ax, title in zip((ax_t, ax_m), titles):
            ax.set_yticks(y, labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{model.name}: {title}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        for i, row in enumerate(model.rows):
            if not row.ok:
                for ax in (ax_t, ax_m):
                    ax.text(0, i, "  skipped", va="center", fontsize=7, color="grey")
                continue
            err = [[row.median_ms - row.min_ms], [row.max_ms - row.median_ms]]
            color = "tab:blue" if row.id.startswith(("int8", "fake")) else "tab:grey"
            ax_t.barh(i, row.median_ms, xerr=err, color=color, capsize=2)
            if row.speedup is not None:
                ax_t.text(row.median_ms, i, f" {row.speedup:.2f}x", va="center", fontsize=7)
            if row.peak_bytes is not None:
                ax_m.barh(i, row.peak_bytes / MB, color=color, alpha=0.45)
            if row.weight_bytes is not None:
                ax_m.barh(i, row.weight_bytes / MB, height=0.3, color="black")
    fig.suptitle(f"{result.device}; {result.dtype}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_speed_outputs(result: SpeedResult, directory: Path, command: str | None = None) -> None:
    """results.json, table.md and speed.png into `directory` (which exists)."""
    data = {"command": command, **result.to_dict()}
    (directory / "results.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    table = header(result, command) + markdown_report(result)
    (directory / "table.md").write_text(table, encoding="utf-8")
    save_speed_plot(result, directory / "speed.png")
