"""matplotlib, imported on demand with a headless backend and an install hint when it is missing."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'diffusers-ptq[plot]'") from err
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt
