"""What reconstruction did: per unit and pass, iterations, block loss before and after, time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class UnitReport:
    """One unit in one pass. Losses are the block output error on a fixed set of cached rows with hard
    rounding (`loss_before`: round-to-nearest / initial step sizes)."""

    unit: str
    kind: str
    phase: str
    iterations: int
    loss_before: float | None = None
    loss_after: float | None = None
    rounding_binary: float | None = None  # share of h(V) at 0 or 1 when training stopped
    seconds: float = 0.0
    train_seconds: float = 0.0
    status: str = "trained"  # "trained" | "resumed" (from the checkpoint) | "skipped" (budget exhausted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitReport:
        return cls(**data)


@dataclass
class ReconstructionReport:
    config: dict[str, Any]
    rows: int
    units: list[UnitReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "rows": self.rows,
            "units": [u.to_dict() for u in self.units],
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReconstructionReport:
        units = [UnitReport.from_dict(u) for u in data["units"]]
        return cls(config=data["config"], rows=data["rows"], units=units, seconds=data["seconds"])

    def __str__(self) -> str:
        lines = [
            f"reconstruction: {len(self.units)} unit passes over {self.rows} calibration rows, "
            f"{self.seconds:.1f} s"
        ]
        for u in self.units:
            losses = ""
            if u.loss_before is not None and u.loss_after is not None:
                losses = f"loss {u.loss_before:.4g} -> {u.loss_after:.4g}"
            lines.append(f"  {u.phase:7s} {u.unit:55s} {u.status:8s} {u.iterations:6d} it  {losses}")
        return "\n".join(lines)
