"""Scale initialisation: weights by their configured search, activations per timestep group."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusers_ptq import distributed
from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.nn import QuantAttnProcessor, QuantLayerMixin
from diffusers_ptq.quantizers import (
    GroupObserver,
    OutputCorrection,
    TimestepActQuantizer,
    TimestepBiasTable,
    WeightQuantizer,
)
from diffusers_ptq.quantizers.observer import merge_observers


def quant_layers(unet: nn.Module) -> list[tuple[str, QuantLayerMixin]]:
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, QuantLayerMixin)]


def act_quantizers(unet: nn.Module) -> list[TimestepActQuantizer]:
    return [m for m in unet.modules() if isinstance(m, TimestepActQuantizer)]


def set_quant_state(unet: nn.Module, weights: bool = True, acts: bool = True) -> None:
    """Switch weight and activation fake quantization of every quantized module of `unet`."""
    for m in unet.modules():
        if isinstance(m, QuantLayerMixin | QuantAttnProcessor):
            m.set_quant_state(weights, acts)
        elif isinstance(m, OutputCorrection):  # corrects the quantized UNet: off when it runs float
            m.enabled = weights or acts


# Everything `set_quant_state` switches: quantizers, per-layer bias tables, the output correction.
_SWITCHED = (TimestepActQuantizer, WeightQuantizer, TimestepBiasTable, OutputCorrection)


class QuantSwitches:
    """The on/off switch of everything `set_quant_state` sets in `unet`, as it is now; `restore()` puts
    each one back."""

    def __init__(self, unet: nn.Module) -> None:
        self.saved = [(m, m.enabled) for m in unet.modules() if isinstance(m, _SWITCHED)]

    def restore(self) -> None:
        for m, enabled in self.saved:
            m.enabled = enabled


@contextlib.contextmanager
def switches_kept(unet: nn.Module) -> Iterator[None]:
    """Run the body; every switch of `unet` is as it was afterwards (also on failure)."""
    saved = QuantSwitches(unet)
    try:
        yield
    finally:
        saved.restore()


@contextlib.contextmanager
def float_mode(unet: nn.Module) -> Iterator[None]:
    """`unet` runs float inside the block (every switch off); each switch as it was afterwards."""
    with switches_kept(unet):
        set_quant_state(unet, weights=False, acts=False)
        yield


@torch.no_grad()
def initialise_weights(unet: nn.Module, progress: bool = True) -> None:
    """Run every weight quantizer's range search on its layer's weight."""
    layers = quant_layers(unet)
    for _, layer in tqdm(layers, desc="calibration: weight scales", unit="layer", disable=not progress):
        layer.calibrate_weights()


@torch.no_grad()
def run_float(
    unet: nn.Module,
    data: CalibrationSet,
    batch_size: int,
    progress: bool = True,
    desc: str = "activations",
    rows: range | None = None,
) -> None:
    """Run the `rows` of `data` (default: all) through `unet` with fake quantization off (observers see
    float inputs)."""
    param = next(unet.parameters())
    set_quant_state(unet, weights=False, acts=False)
    rows = range(len(data)) if rows is None else rows
    contexts = {id(q.context): q.context for q in act_quantizers(unet)}.values()
    starts = range(rows.start, rows.stop, batch_size)
    for start in tqdm(starts, desc=f"calibration: {desc}", disable=not progress):
        stop = min(start + batch_size, rows.stop)
        with contextlib.ExitStack() as stack:
            for context in contexts:  # observers key their subsample by calibration row
                stack.enter_context(context.observing_rows(torch.arange(start, stop)))
            unet(**data.unet_kwargs(slice(start, stop), param.device, param.dtype))


def observed_rows(data: CalibrationSet) -> range:
    """This rank's contiguous share of the calibration rows (all of them in one process)."""
    return distributed.own_share(len(data), "calibration rows")


@torch.no_grad()
def observe_activations(
    unet: nn.Module,
    data: CalibrationSet,
    batch_size: int,
    slots: torch.Tensor,
    seed: int = 0,
    progress: bool = True,
) -> dict[TimestepActQuantizer, GroupObserver]:
    """Float activation statistics of every activation quantizer, per slot of `slots` (timestep -> slot).

    Nothing is set: the group search reads these per-step statistics to choose its starting groups.
    """
    quantizers = act_quantizers(unet)
    generator = torch.Generator().manual_seed(seed)
    num_slots = int(slots.max()) + 1
    for q in quantizers:
        q.start_observing(generator, slots=slots, num_slots=num_slots)
    try:
        run_float(unet, data, batch_size, progress, desc="activations per step", rows=observed_rows(data))
        merge_observers([q.observer for q in quantizers])
        return {q: q.stop_observing() for q in quantizers}
    finally:
        for q in quantizers:
            q.observer, q._slots = None, None


@torch.no_grad()
def initialise_activations(
    unet: nn.Module, data: CalibrationSet, batch_size: int, seed: int = 0, progress: bool = True
) -> dict[int, int]:
    """Observe float activations over `data` and set every activation quantizer's group scales.

    Each group's scale comes from that group's own samples; with `timestep_groups="per_step"` every
    sampling step is a group, so each step gets the scale of its own data (TFMQ-DM's per-step scales).
    Returns {group: number of quantizers that had to borrow that group's scale from a neighbour}.
    """
    quantizers = act_quantizers(unet)
    if not quantizers:
        return {}
    generator = torch.Generator().manual_seed(seed)
    for q in quantizers:
        q.start_observing(generator)
    try:
        run_float(unet, data, batch_size, progress, rows=observed_rows(data))
        merge_observers([q.observer for q in quantizers])
        borrowed: dict[int, int] = {}
        for q in tqdm(
            quantizers, desc="calibration: activation scales", unit="quantizer", disable=not progress
        ):
            for g in q.finish_observing():
                borrowed[g] = borrowed.get(g, 0) + 1
    finally:
        for q in quantizers:
            q.observer = None
    if borrowed:
        warnings.warn(
            f"timestep group(s) {sorted(borrowed)} had no calibration samples; their activation scales "
            "were borrowed from the nearest observed group. Record more sampling steps "
            "(calibration.step_interval, calibration.sampler) or use fewer timestep groups.",
            stacklevel=3,
        )
    return borrowed
