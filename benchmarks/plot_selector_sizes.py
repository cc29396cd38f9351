"""One FD / SQNR vs calibration-size plot from several `bench --ablation selectors` runs.

Each run of the selector ablation plots the sizes it ran; sizes run separately (54–123 min each on CPU-2:
the `total` in each run's table.md) are merged here from their results.json files:

    python benchmarks/plot_selector_sizes.py benchmarks/results/ablation_selectors_{128,256,512,1024} \
        --output benchmarks/results/selectors_fd_vs_size.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from diffusers_ptq.benchmark.plotting import pyplot


def load_rows(directories: list[Path]) -> tuple[dict[str, dict[int, tuple[float, float]]], float | None]:
    """selector -> size -> (mean FD, SQNR dB), and the float FD (the runs must share it: same noise)."""
    series: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    float_fd = None
    for directory in directories:
        result = json.loads((directory / "results.json").read_text(encoding="utf-8"))
        if result.get("study") != "selectors":
            raise ValueError(f"{directory} holds a {result.get('study')!r} study, not 'selectors'")
        for row in result["rows"]:
            fd = row["metrics"].get("FD")
            mean_fd = sum(fd) / len(fd) if fd else float("nan")
            if row["selector"] is None:
                float_fd = mean_fd
                continue
            series[row["selector"]][row["size"]] = (mean_fd, row["sqnr_db"])
    return series, float_fd


def plot(series: dict[str, dict[int, tuple[float, float]]], float_fd: float | None, path: Path) -> None:
    plt = pyplot()
    fig, (ax_fd, ax_sqnr) = plt.subplots(1, 2, figsize=(11, 4))
    for selector, by_size in sorted(series.items()):
        sizes = sorted(by_size)
        ax_fd.plot(sizes, [by_size[n][0] for n in sizes], marker="o", label=selector)
        ax_sqnr.plot(sizes, [by_size[n][1] for n in sizes], marker="o", label=selector)
    if float_fd is not None:
        ax_fd.axhline(float_fd, color="black", linestyle="--", linewidth=1, label="float")
    all_sizes = sorted({n for by_size in series.values() for n in by_size})
    for ax, ylabel in ((ax_fd, "FD (lower is better)"), (ax_sqnr, "noise SQNR, dB (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_sizes, labels=[str(n) for n in all_sizes])
        ax.minorticks_off()
        ax.set_xlabel("calibration samples N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_fd.legend(fontsize=8)
    fig.suptitle("Calibration-sample selectors (W6A6, shipped Fashion-MNIST DDPM)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("runs", nargs="+", type=Path, help="output directories of selector ablation runs")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    series, float_fd = load_rows(args.runs)
    plot(series, float_fd, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
