"""What quantization did, in a form people read: counts by bit width, what stayed float and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from diffusers_ptq.prepare import QuantPlan


@dataclass
class QuantizationReport:
    method: str
    tag: str
    layers_by_bits: dict[str, int]
    shortcut_splits: int
    attention_blocks: int
    softmax_bits: int | None
    kept_float: list[tuple[str, str]]
    calibration_samples: int
    calibration_rows: int
    samples_per_group: list[int]
    num_inference_steps: int
    scheduler: str
    borrowed_groups: list[int] = field(default_factory=list)
    seconds: float = 0.0
    # GPTQReport.to_dict() when weights.rounding='gptq' ran; None for round-to-nearest.
    gptq: dict[str, Any] | None = None
    # layers.mixed_precision: its config, `promoted` [[layer, bits or None (float)], ...] and `ranking`
    # [[layer, score], ...] (both most sensitive first), `average_weight_bits` [before, after].
    mixed_precision: dict[str, Any] | None = None
    # Distinct calibration prompts (text-conditioned pipelines; cycled with fresh noise when fewer than the
    # trajectories); the pipeline class calibration ran.
    distinct_prompts: int | None = None
    pipeline: str | None = None
    # With a torch.distributed group: {"world_size", "trajectories_per_rank", "samples_per_rank"}.
    distributed: dict[str, Any] | None = None

    @classmethod
    def build(cls, plan: QuantPlan, **kwargs: Any) -> QuantizationReport:
        bits = Counter(
            f"W{layer.weight_bits}A{layer.act_bits if layer.act_bits is not None else '-'}"
            for layer in plan.layers
        )
        softmax = plan.attentions[0].softmax_bits if plan.attentions else None
        return cls(
            layers_by_bits=dict(sorted(bits.items())),
            shortcut_splits=sum(layer.split is not None for layer in plan.layers),
            attention_blocks=len(plan.attentions),
            softmax_bits=softmax,
            kept_float=list(plan.kept_float),
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(map(list, v)) if k == "kept_float" else v) for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        n_layers = sum(self.layers_by_bits.values())
        by_bits = ", ".join(f"{n} at {b}" for b, n in self.layers_by_bits.items())
        lines = [f"diffusers-ptq: {self.method} {self.tag}, {self.seconds:.1f} s"]
        lines.append(
            f"  quantized layers: {n_layers} ({by_bits}); shortcut-split convs: {self.shortcut_splits}"
        )
        if self.attention_blocks:
            softmax = "float" if self.softmax_bits is None else f"{self.softmax_bits}-bit"
            lines.append(
                f"  attention matmuls: {self.attention_blocks} blocks (q/k/v quantized, softmax {softmax})"
            )
        reasons = Counter(reason for _, reason in self.kept_float)
        for reason, count in reasons.items():
            names = [n for n, r in self.kept_float if r == reason]
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            lines.append(f"  kept float: {count} - {reason}: {shown}")
        lines.append(
            f"  calibration: {self.calibration_samples} samples ({self.calibration_rows} UNet rows) from "
            f"{self.scheduler}, {self.num_inference_steps} steps"
            + (f", {self.pipeline}" if self.pipeline else "")
            + (f", {self.distinct_prompts} distinct prompts" if self.distinct_prompts is not None else "")
        )
        if self.distributed is not None:
            d = self.distributed
            lines.append(
                f"  distributed: {d['world_size']} ranks; trajectories per rank "
                f"{d['trajectories_per_rank']}, samples per rank {d['samples_per_rank']}"
            )
        groups = self.samples_per_group
        shown_groups = ", ".join(map(str, groups[:16])) + (", ..." if len(groups) > 16 else "")
        lines.append(f"  rows per timestep group ({len(groups)} groups): {shown_groups}")
        if self.mixed_precision is not None:
            lines.append(mixed_precision_line(self.mixed_precision))
        if self.borrowed_groups:
            lines.append(f"  groups without samples (scales borrowed): {self.borrowed_groups}")
        if self.gptq is not None:
            kept = len(self.gptq["skipped"])
            lines.append(
                f"  weight rounding: GPTQ on {self.gptq['layers']} layers ({self.gptq['inputs']}, "
                f"damp {self.gptq['damp']}), {kept} kept nearest, {self.gptq['seconds']:.1f} s"
            )
        return "\n".join(lines)


def mixed_precision_line(summary: dict[str, Any]) -> str:
    """One report line: the budget, the promoted layers and the average weight bits before and after."""
    budget = summary["mode"] + "=" + str(summary.get(summary["mode"]))
    promoted = summary.get("promoted", [])
    names = [f"{n} ({'float' if b is None else f'W{b}'})" for n, b in promoted]
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    before, after = summary.get("average_weight_bits", [None, None])
    return (
        f"  mixed precision ({budget}, by {summary['metric']}): {len(promoted)} layer(s) promoted: "
        f"{shown or '-'}; average weight bits {before} -> {after}"
    )
