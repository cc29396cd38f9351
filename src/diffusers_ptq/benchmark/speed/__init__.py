"""The speed benchmark: per-step UNet latency and peak memory of float, fake-quant, int8 and other libraries.

`settings.py` (what runs), `models.py` (the UNets and their inputs), `rows.py` (building each row),
`measure.py` (timing and memory), `benchmark.py` (the run), `report.py` (outputs), `cli.py` (its command line,
`python benchmarks/speed.py`).
"""

from diffusers_ptq.benchmark.speed.benchmark import ModelResult, SpeedResult, SpeedRow, run_speed_benchmark
from diffusers_ptq.benchmark.speed.report import markdown_report, write_speed_outputs
from diffusers_ptq.benchmark.speed.settings import SpeedSettings

__all__ = [
    "ModelResult",
    "SpeedResult",
    "SpeedRow",
    "SpeedSettings",
    "markdown_report",
    "run_speed_benchmark",
    "write_speed_outputs",
]
