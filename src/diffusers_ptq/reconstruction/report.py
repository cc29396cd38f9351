"""What reconstruction did: per unit and pass, iterations, block loss before and after, time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class UnitReport:
    """One unit in one pass. Losses are the block output error with hard rounding, `*_before` at the unit's
    starting point and `*_after` when its training ended: `loss_*` on up to 64 of the rows it trained on,
    `holdout_*` on `holdout_rows` cached rows it never trained on. A unit whose held-out loss did not go
    down is 'reverted': it is back at its starting point exactly, whatever it learned is dropped."""

    unit: str
    kind: str
    phase: str
    iterations: int
    loss_before: float | None = None
    loss_after: float | None = None
    rounding_binary: float | None = None  # share of h(V) at 0 or 1 when training stopped
    seconds: float = 0.0
    train_seconds: float = 0.0
    exchange_seconds: float = 0.0  # of train_seconds: waiting for the gradient sums of a process group
    # "trained" (kept) | "reverted" (held-out loss not lower: starting point restored) | "resumed" (from the
    # checkpoint) | "skipped" (not started: the time budget left it no iteration)
    status: str = "trained"
    holdout_before: float | None = None
    holdout_after: float | None = None
    holdout_rows: int = 0
    # Memory while the unit's cache was built and it trained (None: not measured, e.g. resumed or skipped):
    # the process's peak resident set (RAM), torch.cuda.max_memory_allocated on a CUDA device (else None),
    # the cache's bytes and whether it was spilled to disk (reconstruction.cache_max_gb).
    peak_ram_bytes: int | None = None
    peak_device_bytes: int | None = None
    cache_bytes: int | None = None
    cache_spilled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitReport:
        return cls(**data)


SAMPLING_FIELDS = (
    "sampling_error_before",
    "sampling_error_after",
    "sampling_bias_before",
    "sampling_bias_after",
    "sampling_bias_noise",
    "sampling_samples",
    "sampling_seconds",
    "reverted_by",
)


@dataclass
class ReconstructionReport:
    config: dict[str, Any]
    rows: int
    units: list[UnitReport] = field(default_factory=list)
    seconds: float = 0.0
    # Mean squared distance of the UNet's output from the float UNet's on the held-out calibration rows, and
    # the mean square of that error's mean over the rows (bias), before and after the run;
    # `model_reverted`: one of them rose, and the whole run was undone.
    holdout_error_before: float | None = None
    holdout_error_after: float | None = None
    holdout_bias_before: float | None = None
    holdout_bias_after: float | None = None
    model_reverted: bool = False
    # The sampling check (`sampling.py`): the same two errors on the pipeline's final outputs for
    # `sampling_samples` fresh samples, before and after; `reverted_by`: which check undid the run.
    sampling_error_before: float | None = None
    sampling_error_after: float | None = None
    sampling_bias_before: float | None = None
    sampling_bias_after: float | None = None
    sampling_bias_noise: float | None = None  # the margin the bias may rise by (two standard errors)
    sampling_samples: int = 0
    sampling_seconds: float = 0.0
    reverted_by: str | None = None  # "held-out rows" | "samples"
    # Under torch.distributed: rows each rank cached, in rank order (None: one process).
    rows_per_rank: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "rows": self.rows,
            "units": [u.to_dict() for u in self.units],
            "seconds": self.seconds,
            "holdout_error_before": self.holdout_error_before,
            "holdout_error_after": self.holdout_error_after,
            "holdout_bias_before": self.holdout_bias_before,
            "holdout_bias_after": self.holdout_bias_after,
            "model_reverted": self.model_reverted,
            **{name: getattr(self, name) for name in SAMPLING_FIELDS},
            "rows_per_rank": self.rows_per_rank,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReconstructionReport:
        units = [UnitReport.from_dict(u) for u in data["units"]]
        return cls(
            config=data["config"],
            rows=data["rows"],
            units=units,
            seconds=data["seconds"],
            holdout_error_before=data.get("holdout_error_before"),
            holdout_error_after=data.get("holdout_error_after"),
            holdout_bias_before=data.get("holdout_bias_before"),
            holdout_bias_after=data.get("holdout_bias_after"),
            model_reverted=data.get("model_reverted", False),
            **{name: data[name] for name in SAMPLING_FIELDS if name in data},
            rows_per_rank=data.get("rows_per_rank"),
        )

    def __str__(self) -> str:
        lines = [
            f"reconstruction: {len(self.units)} unit passes over {self.rows} calibration rows, "
            f"{self.seconds:.1f} s"
            + ("" if self.rows_per_rank is None else f" (rows cached per rank: {self.rows_per_rank})")
        ]
        for u in self.units:
            losses = ""
            if u.loss_before is not None and u.loss_after is not None:
                losses = f"loss {u.loss_before:.4g} -> {u.loss_after:.4g}"
            if u.holdout_before is not None and u.holdout_after is not None:
                losses += f", held out {u.holdout_before:.4g} -> {u.holdout_after:.4g}"
            if u.cache_bytes is not None:
                losses += f", cache {u.cache_bytes / 2**20:.1f} MiB" + (" on disk" if u.cache_spilled else "")
            lines.append(f"  {u.phase:7s} {u.unit:55s} {u.status:8s} {u.iterations:6d} it  {losses}")
        reverted = self.reverted
        if reverted:
            lines.append(
                f"  {len(reverted)} reverted to their starting point (held-out loss not lower): "
                + ", ".join(f"{u.phase} {u.unit}" for u in reverted)
            )
        if None not in (
            self.holdout_error_before,
            self.holdout_error_after,
            self.holdout_bias_before,
            self.holdout_bias_after,
        ):
            undone = ": higher, the whole run was undone (the UNet is as calibrated)"
            lines.append(
                f"  UNet output error on held-out rows {self.holdout_error_before:.4g} -> "
                f"{self.holdout_error_after:.4g}, its mean (bias) {self.holdout_bias_before:.4g} -> "
                f"{self.holdout_bias_after:.4g}"
                + (undone if self.model_reverted and self.reverted_by != "samples" else "")
            )
        if self.sampling_error_before is not None and self.sampling_error_after is not None:
            undone = ": higher, the whole run was undone (the UNet is as calibrated)"
            lines.append(
                f"  final outputs of {self.sampling_samples} fresh samples, error "
                f"{self.sampling_error_before:.4g} -> {self.sampling_error_after:.4g}, its mean (bias) "
                f"{self.sampling_bias_before:.4g} -> {self.sampling_bias_after:.4g}"
                + ("" if self.sampling_bias_noise is None else f" (noise {self.sampling_bias_noise:.2g})")
                + (undone if self.reverted_by == "samples" else "")
            )
        elif self.sampling_error_before is not None:
            lines.append(
                f"  final outputs of {self.sampling_samples} fresh samples before the run: error "
                f"{self.sampling_error_before:.4g}, its mean (bias) {self.sampling_bias_before:.4g} (not "
                "sampled after: the held-out check had undone the run)"
            )
        return "\n".join(lines)

    @property
    def reverted(self) -> list[UnitReport]:
        """The unit passes that kept nothing: their held-out loss did not go down."""
        return [u for u in self.units if u.status == "reverted"]
