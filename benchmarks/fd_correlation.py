"""How well does each per-step metric predict FD? Rank correlation over the quantized rows of bench results.

Reads the `results.json` of one or more `diffusers-ptq bench` runs (main table or `--ablation`) of one
model, takes every quantized row that has an FD, and reports the Spearman rank correlation of its FD with
its noise SQNR (mean over steps) and with its noise bias (norm of the per-step mean error, averaged over
steps; rows from before that metric existed have none and count only for SQNR). A metric that sees what
DDIM accumulates should rank rows as FD does: correlation near -1 for SQNR (higher SQNR, lower FD) and
near +1 for the bias.

    python benchmarks/fd_correlation.py --model fashion RESULTS.json [...] --output OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench_io import write_json


def ranks(values: list[float]) -> list[float]:
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks."""
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"need at least 3 paired values, got {len(x)} and {len(y)}")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var


def quantized_rows(paths: list[Path]) -> list[dict]:
    """One entry per quantized row with an FD: name, FD (mean over seeds), SQNR, bias (or None)."""
    rows, seen = [], set()
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            fd = row.get("metrics", {}).get("FD")
            if row.get("weight_bits") is None or not fd or row["name"] in seen:
                continue
            seen.add(row["name"])
            bias = row.get("bias_per_step")
            rows.append(
                {
                    "name": row["name"],
                    "fd": sum(fd) / len(fd),
                    "sqnr_db": row["sqnr_db"],
                    "bias": None if not bias else sum(bias) / len(bias),
                    "source": str(path),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of one model's bench runs")
    parser.add_argument("--model", required=True, help="the model the runs sampled (recorded in the output)")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    rows = quantized_rows(args.results)
    with_bias = [r for r in rows if r["bias"] is not None]
    result = {
        "model": args.model,
        "rows": len(rows),
        "spearman_fd_vs_sqnr": spearman([r["fd"] for r in rows], [r["sqnr_db"] for r in rows]),
        "rows_with_bias": len(with_bias),
        "spearman_fd_vs_bias": spearman([r["fd"] for r in with_bias], [r["bias"] for r in with_bias]),
        "table": rows,
    }
    write_json(args.output, result)
    print(
        f"{args.model}: {len(rows)} rows, Spearman(FD, SQNR) = {result['spearman_fd_vs_sqnr']:+.2f}; "
        f"{len(with_bias)} rows with bias, Spearman(FD, bias) = {result['spearman_fd_vs_bias']:+.2f}"
    )


if __name__ == "__main__":
    main()
