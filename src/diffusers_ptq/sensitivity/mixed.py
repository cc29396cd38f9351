"""Sensitivity-driven mixed precision: the most sensitive layers stay at higher bits or float, in a budget.

`check_budget` runs on the plan before any calibration; `choose_mixed_precision` ranks the planned layers with
calibrated scales on the calibration set and returns the plan with the top-ranked layers promoted. The ranking
is by each layer quantized alone on the float UNet (`selection="alone"`), or greedy on the quantized UNet
(`"greedy"`): each round picks the layer whose switch to float lowers the error most, with the earlier picks
float, so it sees how layers' errors add up. Promotion is a prefix of the ranking: the first layer that does
not fit the budget ends it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.config import PTQConfig
from diffusers_ptq.config_fields import _fail
from diffusers_ptq.config_mixed import MixedPrecisionConfig
from diffusers_ptq.prepare import LayerPlan, QuantPlan
from diffusers_ptq.sensitivity.measure import (
    StepErrors,
    calibrated_probe,
    even_rows,
    measure_units,
    warn_if_bias_is_rms,
)
from diffusers_ptq.sensitivity.units import Unit, layer_units

PATH = "layers.mixed_precision"


def _float_bits(unet: nn.Module, name: str) -> int:
    return unet.get_submodule(name).weight.element_size() * 8


def _sizes(unet: nn.Module, plan: QuantPlan) -> dict[str, int]:
    return {layer.name: unet.get_submodule(layer.name).weight.numel() for layer in plan.layers}


def average_weight_bits(
    unet: nn.Module, plan: QuantPlan, promoted: dict[str, int | None] | None = None
) -> float:
    """Parameter-weighted average weight bits over the planned layers; a promoted layer counts its new bits
    (None: float, its dtype's bits)."""
    promoted = promoted or {}
    sizes = _sizes(unet, plan)
    total = 0.0
    for layer in plan.layers:
        bits = promoted.get(layer.name, layer.weight_bits)
        bits = _float_bits(unet, layer.name) if bits is None else bits
        total += bits * sizes[layer.name]
    return total / max(1, sum(sizes.values()))


def eligible(plan: QuantPlan, mp: MixedPrecisionConfig) -> list[str]:
    """Layers that promotion would raise: below high_bits (every layer when promoted layers stay float)."""
    return [layer.name for layer in plan.layers if mp.high_bits is None or layer.weight_bits < mp.high_bits]


def check_budget(unet: nn.Module, plan: QuantPlan, config: PTQConfig) -> None:
    """Budget errors that need the model, raised before calibration (ValueError naming field and value)."""
    mp = config.layers.mixed_precision
    if not mp.enabled:
        return
    if not eligible(plan, mp):
        _fail(
            f"{PATH}.high_bits", mp.high_bits, "bits above some planned layer's weight bits (none is lower)"
        )
    if mp.mode == "avg_weight_bits":
        base = average_weight_bits(unet, plan)
        if mp.avg_weight_bits < base:
            _fail(
                f"{PATH}.avg_weight_bits",
                mp.avg_weight_bits,
                f"a number >= {base:.4f}, the average weight bits of the plan before any promotion",
            )


def fits(unet: nn.Module, plan: QuantPlan, mp: MixedPrecisionConfig, promoted: dict[str, int | None]) -> bool:
    """Whether `promoted` stays within the budget."""
    if mp.mode == "max_layers":
        return len(promoted) <= mp.max_layers
    return average_weight_bits(unet, plan, promoted) <= mp.avg_weight_bits + 1e-9


def allocate(
    ranking: list[str], unet: nn.Module, plan: QuantPlan, mp: MixedPrecisionConfig
) -> dict[str, int | None]:
    """{layer: new weight bits (None: float)} for the longest prefix of `ranking` the budget allows."""
    allowed = set(eligible(plan, mp))
    promoted: dict[str, int | None] = {}
    for name in (n for n in ranking if n in allowed):
        trial = {**promoted, name: mp.high_bits}
        if not fits(unet, plan, mp, trial):
            break
        promoted = trial
    return promoted


def greedy_selection(
    candidates: list[str],
    measure: Callable[[list[str], list[str]], dict[str, float]],
    fits_budget: Callable[[list[str]], bool],
    limit: int | None = None,
) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """(picks in order with the score each left, the last round's scores) of greedy selection.

    `measure(candidates, picked)` scores each candidate by the error of the UNet with it and `picked` float
    (lower is better). Each round picks the lowest score (ties by name); it stops when the pick would not
    fit `fits_budget(picks)`, after `limit` picks, or when no candidate is left.
    """
    picks: list[tuple[str, float]] = []
    remaining = list(candidates)
    last: dict[str, float] = {}
    while remaining and (limit is None or len(picks) < limit):
        scores = measure(remaining, [name for name, _ in picks])
        best = min(remaining, key=lambda n: (scores[n], n))
        last = scores
        if not fits_budget([*(name for name, _ in picks), best]):
            break
        picks.append((best, scores[best]))
        remaining.remove(best)
    return picks, last


def promote(plan: QuantPlan, promoted: dict[str, int | None]) -> QuantPlan:
    """A new plan with each promoted layer at its new bits (activations too, never lowered) or float."""
    layers: list[LayerPlan] = []
    kept_float = list(plan.kept_float)
    for layer in plan.layers:
        if layer.name not in promoted:
            layers.append(layer)
            continue
        bits = promoted[layer.name]
        if bits is None:
            # One reason for all of them, so the report groups them; their ranks are in its summary.
            kept_float.append((layer.name, f"among the most sensitive layers ({PATH}.high_bits=None)"))
            continue
        act = None if layer.act_bits is None else max(layer.act_bits, bits)
        layers.append(dataclasses.replace(layer, weight_bits=bits, act_bits=act))
    return QuantPlan(layers=layers, attentions=list(plan.attentions), kept_float=kept_float)


@dataclasses.dataclass
class LayerProbe:
    """The layers mixed precision may promote, on the calibrated probe: each quantized alone or in sets."""

    unet: nn.Module
    data: CalibrationSet
    units: dict[str, Unit]  # in execution order
    rows: torch.Tensor
    acts: bool
    batch_size: int
    progress: bool

    def errors(self, names: list[str], kept_float: list[str] | None = None) -> list[StepErrors]:
        """Per name, the noise-prediction error with that layer quantized (with `kept_float` float)."""
        return measure_units(
            self.unet,
            self.data,
            [self.units[n] for n in names],
            acts=self.acts,
            rows=self.rows,
            batch_size=self.batch_size,
            progress=self.progress,
            kept_float=None if kept_float is None else [self.units[n] for n in kept_float],
        )


@contextmanager
def layer_probe(
    unet: nn.Module,
    plan: QuantPlan,
    config: PTQConfig,
    group_map: torch.Tensor,
    data: CalibrationSet,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
) -> Iterator[LayerProbe]:
    """The UNet with calibrated probe quantizers on the layers `config`'s mixed precision may promote."""
    mp = config.layers.mixed_precision
    allowed = set(eligible(plan, mp))
    units = {u.name: u for u in layer_units(plan, attentions=False) if u.name in allowed}
    rows = even_rows(len(data), mp.num_samples)
    if mp.metric == "bias":  # before the calibration, which takes a while
        warn_if_bias_is_rms(data, rows, f"{PATH}.metric", f"{PATH}.num_samples")
    with calibrated_probe(unet, plan, config, group_map, data, batch_size, seed, progress):
        yield LayerProbe(unet, data, units, rows, config.activations.enabled, batch_size, progress)


def choose_mixed_precision(
    unet: nn.Module,
    plan: QuantPlan,
    config: PTQConfig,
    group_map: torch.Tensor,
    data: CalibrationSet,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
) -> tuple[QuantPlan, dict[str, Any]]:
    """(the promoted plan, a summary for the report) from each layer's sensitivity on `data`."""
    mp = config.layers.mixed_precision.resolved(config.weights.bits)
    start = time.perf_counter()
    with layer_probe(unet, plan, config, group_map, data, batch_size, seed, progress) as probe:

        def measure(names: list[str], kept_float: list[str] | None) -> dict[str, float]:
            errors = probe.errors(names, kept_float)
            return {n: (e.total_mse if mp.metric == "mse" else e.mean_bias) for n, e in zip(names, errors)}

        if mp.selection == "alone":
            scores = measure(list(probe.units), None)
            ranking = sorted(scores, key=lambda n: (-scores[n], n))
            promoted = allocate(ranking, unet, plan, mp)
            ranked = [(name, scores[name]) for name in ranking]
        else:
            picks, last = greedy_selection(
                list(probe.units),
                measure,
                lambda names: fits(unet, plan, mp, {n: mp.high_bits for n in names}),
                limit=mp.max_layers if mp.mode == "max_layers" else None,
            )
            promoted = {name: mp.high_bits for name, _ in picks}
            rest = sorted((n for n in last if n not in promoted), key=lambda n: (last[n], n))
            ranked = picks + [(name, last[name]) for name in rest]
    new_plan = promote(plan, promoted)
    summary = {
        **mp.to_dict(),
        "rows": len(probe.rows),
        # Lists, not dicts: the order (most sensitive first) survives config.json, whose keys are sorted.
        "promoted": [[name, promoted[name]] for name, _ in ranked if name in promoted],
        "average_weight_bits": [
            round(average_weight_bits(unet, plan), 4),
            round(average_weight_bits(unet, plan, promoted), 4),
        ],
        # alone: each layer's error quantized alone (most sensitive first); greedy: the picks with the
        # error each left, then the rest by the last round's error with the layer float.
        "ranking": [[name, float(f"{score:.6g}")] for name, score in ranked],
        "seconds": round(time.perf_counter() - start, 3),
    }
    return new_plan, summary
