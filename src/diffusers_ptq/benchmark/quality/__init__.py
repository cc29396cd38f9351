"""The quality benchmark: float vs each preset at each bit setting on identical noise, and its report.

`settings.py` (what runs), `sampling.py` (paired sampling, float trajectories), `benchmark.py` (the rows),
`report.py` (markdown table, sample grids, SQNR plot).
"""

from diffusers_ptq.benchmark.quality.benchmark import (
    BenchResult,
    RowResult,
    RowSpec,
    run_quality_benchmark,
    run_rows,
)
from diffusers_ptq.benchmark.quality.report import markdown_table, write_outputs
from diffusers_ptq.benchmark.quality.settings import BenchSettings, parse_bits

__all__ = [
    "BenchResult",
    "BenchSettings",
    "RowResult",
    "RowSpec",
    "markdown_table",
    "parse_bits",
    "run_quality_benchmark",
    "run_rows",
    "write_outputs",
]
