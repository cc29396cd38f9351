"""`layer` bias correction: each quantized layer's mean output error per timestep group, added back.

For each quantized layer, in the order the UNet runs them, the calibration rows are run through the UNet
quantized so far (earlier layers already corrected) up to that layer, whose output is compared with the
same layer's output in the float UNet: the mean of y_float - y_quant over samples and positions, per output
channel and timestep group, goes into the layer's `TimestepBiasTable`. The float means need one full pass;
each layer then needs one pass that stops right after it (`StopForward`), about L/2 UNet forwards over the
calibration set for L layers. With a process group each rank runs its contiguous share of the rows and the
float64 sums are added across ranks after every pass, so every rank fills the same tables. With
weight-only quantization only the weights are quantized in both, so the table corrects the weight error
alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusers_ptq import distributed
from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.correction.stats import GroupChannelSums, all_reduce, channel_rows
from diffusers_ptq.initialise import quant_layers, set_quant_state
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.reconstruction.units import StopForward


def channel_dim(layer: nn.Module) -> int:
    """Where a quantized layer's output channels are: 1 for a conv (NCHW), -1 for a linear."""
    return 1 if isinstance(layer, nn.Conv2d) else -1


def _tabled_layers(unet: nn.Module) -> dict[str, QuantLayerMixin]:
    layers = {name: m for name, m in quant_layers(unet) if m.bias_table is not None}
    if not layers:
        raise ValueError(
            "bias_correction='layer' found no quantized layer with a bias table; the UNet was quantized "
            "with another bias_correction setting"
        )
    return layers


def _sweep(unet: nn.Module, data: CalibrationSet, batch_size: int, stop: bool) -> None:
    """Run this rank's rows of `data` (all of them in one process) through `unet`; with `stop` a hook ends
    each forward early."""
    param = next(unet.parameters())
    rows = distributed.own_share(len(data), "calibration rows")
    for kwargs in data.batches(batch_size, param.device, param.dtype, rows):
        try:
            unet(**kwargs)
        except StopForward:
            continue
        if stop:
            raise RuntimeError("the UNet forward finished without calling the layer being corrected")


def _recorder(
    layer: QuantLayerMixin, stats: GroupChannelSums, name: str, stop: bool
) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        rows, per_row = channel_rows(output, channel_dim(layer))
        groups = layer.bias_table.groups_for(rows.shape[0])
        stats.add(name, rows, groups)
        if name == "float":
            stats.count(groups, per_row)
        if stop:
            raise StopForward

    return hook


@torch.no_grad()
def float_layer_means(
    unet: nn.Module, data: CalibrationSet, batch_size: int, layers: dict[str, QuantLayerMixin]
) -> tuple[dict[str, GroupChannelSums], list[str]]:
    """Per-group float output sums of every layer in `layers`, and the order in which the UNet calls them."""
    order: list[str] = []
    stats: dict[str, GroupChannelSums] = {}
    calls: dict[str, int] = {}  # per UNet forward: a layer's pass stops at its first call, so one call only
    handles = [unet.register_forward_pre_hook(lambda module, args: calls.clear())]
    for name, layer in layers.items():
        table = layer.bias_table
        stats[name] = GroupChannelSums(table.num_groups, table.table.shape[1], table.table.device)
        record = _recorder(layer, stats[name], "float", stop=False)

        def hook(module, args, output, name=name, record=record) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                raise ValueError(
                    f"bias_correction='layer': {name} runs more than once per UNet forward (a module shared "
                    "by two places?); its table cannot hold one correction per call. Exclude it "
                    "(layers.exclude) or use bias_correction='output'"
                )
            if name not in order:
                order.append(name)
            record(module, args, output)

        handles.append(layer.register_forward_hook(hook))
    set_quant_state(unet, weights=False, acts=False)
    try:
        with distributed.hold_failure() as failed:
            _sweep(unet, data, batch_size, stop=False)
    finally:
        for handle in handles:
            handle.remove()
    all_reduce(list(stats.values()), ("float",), "bias correction: float outputs", failed.error)
    distributed.check_same("the order of the quantized layers in a UNet forward", order)
    missing = sorted(set(layers) - set(order))
    if missing:
        raise RuntimeError(f"the calibration forwards never called {missing[:5]}; cannot correct their bias")
    return stats, order


@torch.no_grad()
def correct_layers(
    unet: nn.Module, data: CalibrationSet, batch_size: int, acts: bool, progress: bool = True
) -> dict:
    """Fill every layer's bias table with its mean output error per timestep group (see the module doc).

    Leaves the UNet with weights (and activations when `acts`) quantized. Returns a summary for reports.
    """
    layers = _tabled_layers(unet)
    stats, order = float_layer_means(unet, data, batch_size, layers)
    set_quant_state(unet, weights=True, acts=acts)
    largest = 0.0
    for name in tqdm(order, desc="bias correction: layers", unit="layer", disable=not progress):
        layer, layer_stats = layers[name], stats[name]
        handle = layer.register_forward_hook(_recorder(layer, layer_stats, "quant", stop=True))
        try:
            with distributed.hold_failure() as failed:
                _sweep(unet, data, batch_size, stop=True)
        finally:
            handle.remove()
        all_reduce([layer_stats], ("quant",), f"bias correction: {name}", failed.error, counts=False)
        # The measured output already includes the table's current rows (zero after calibration), so the
        # error adds to them: re-running the correction keeps what the first run found.
        error = layer_stats.mean("float") - layer_stats.mean("quant")
        table = layer.bias_table.table
        table.copy_((table.double() + error).to(table.dtype))
        largest = max(largest, float(error.abs().max()))
    empty = stats[order[0]].empty_groups()
    return {
        "mode": "layer",
        "layers": len(order),
        "empty_groups": empty,
        "max_abs_correction": largest,
    }
