"""`diffusers-ptq bench --ablation`: the papers' ablations in miniature, as rows of the quality benchmark.

`settings.py` (the study and its lists), `benchmark.py` (rows and runs), `report.py` (tables and plots).
"""

from diffusers_ptq.benchmark.ablation.benchmark import (
    AblationResult,
    AblationRow,
    ablation_rows,
    run_ablation,
)
from diffusers_ptq.benchmark.ablation.report import ablation_table, write_ablation_outputs
from diffusers_ptq.benchmark.ablation.settings import AblationSettings

__all__ = [
    "AblationResult",
    "AblationRow",
    "AblationSettings",
    "ablation_rows",
    "ablation_table",
    "run_ablation",
    "write_ablation_outputs",
]
