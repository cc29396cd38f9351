"""A wall-clock budget (`max_minutes`) shared by the units still to reconstruct.

Before a unit trains, time is set aside for the caching and evaluation of the units after it (at the
largest cost measured so far: deeper units cost more to cache); of the rest, the unit gets the share that
its configured iterations are of all remaining configured iterations. Its iteration count is fixed before
its first step, from the measured time of a few real optimiser steps, as as many steps as fit in that share
(at most its configured iterations), and its schedules are laid over that count. It then runs them all: a
unit is never stopped half-way through its schedule. A unit the share fits no step of is not started.
Time a unit leaves unused goes to later units.
"""

from __future__ import annotations

import math
import time


class Budget:
    def __init__(self, max_minutes: float | None, total_weight: float, units: int) -> None:
        self.limited = max_minutes is not None
        self.deadline = time.monotonic() + max_minutes * 60 if max_minutes is not None else math.inf
        self.remaining_weight = float(total_weight)
        self.remaining_units = units
        self.overheads: list[float] = []

    def remaining_seconds(self) -> float:
        return self.deadline - time.monotonic()

    def exhausted(self) -> bool:
        return self.limited and self.remaining_seconds() <= 0

    def share(self, weight: float) -> float:
        """Training seconds for the current unit, of configured iterations `weight`."""
        if not self.limited:
            return math.inf
        later = max(self.remaining_units - 1, 0)
        reserve = later * max(self.overheads) if self.overheads else 0.0
        available = max(self.remaining_seconds() - reserve, 0.0)
        if self.remaining_weight <= 0:
            return available
        return available * min(1.0, weight / self.remaining_weight)

    def iterations(self, configured: int, weight: float, seconds_per_step: float) -> int:
        """Steps of the current unit: as many as fit in its share, at most `configured`."""
        if not self.limited:
            return configured
        fit = self.share(weight) / max(seconds_per_step, 1e-9)
        return max(0, min(configured, int(fit)))

    def spend(self, weight: float, overhead_seconds: float | None = None) -> None:
        """The current unit is done (trained, resumed or skipped); `overhead_seconds` is what it spent
        outside its training steps (caching, evaluation), the estimate for the units after it."""
        self.remaining_weight = max(0.0, self.remaining_weight - weight)
        self.remaining_units = max(0, self.remaining_units - 1)
        if overhead_seconds is not None:
            self.overheads.append(overhead_seconds)
