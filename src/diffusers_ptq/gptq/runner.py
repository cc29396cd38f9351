"""`gptq_quantize`: GPTQ rounding of every quantized layer of a UNet, in execution order.

Layers are visited block by block (the reconstruction units, in the order the UNet runs them). For each
block its inputs are cached from the model quantized so far (`reconstruction.build_cache`), then each of
its layers in turn: the block runs on the cached inputs while a hook accumulates the layer's H from the
input the layer multiplies by its weight (after its own input quantizer when activations are quantized:
that X is what the deployed layer sees), the weight is solved, and the layer gets a NEW weight Parameter
holding the on-grid result, so the next layer's inputs already carry this layer's rounding. Only one
layer's H exists at a time, on the UNet's device. The float layer's Parameter is never written.

Under a torch.distributed group each rank caches and runs its contiguous share of the calibration rows; the
layers' X Xᵀ sums and vector counts are summed across ranks before each solve, so every rank solves the H
one process would (up to float summation order) and gets the same weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusers_ptq import distributed
from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.gptq.hessian import HessianAccumulator
from diffusers_ptq.gptq.solver import RankDeficientHessian, gptq_round
from diffusers_ptq.initialise import QuantSwitches
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.primitives import fake_quantize
from diffusers_ptq.reconstruction.blocks import reconstruction_units
from diffusers_ptq.reconstruction.cache import build_cache
from diffusers_ptq.reconstruction.config import ReconstructionConfig
from diffusers_ptq.reconstruction.units import Unit

logger = logging.getLogger("diffusers_ptq")


@dataclass
class GPTQReport:
    """What GPTQ did: layers solved, layers left at nearest rounding (and why), settings, time."""

    layers: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    inputs: str = "float"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _parts(layer: QuantLayerMixin) -> list[slice]:
    """Input-channel slices of the layer's weight parts (the shortcut split's halves, or everything)."""
    if layer.split is None:
        return [slice(None)]
    return [slice(None, layer.split), slice(layer.split, None)]


def _layer_order(unet: nn.Module, unit: Unit, cache, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The unit's layers in the order of their first call when the unit runs on its first cached row."""
    calls: list[str] = []
    handles = []
    for name in unit.layers:

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            if name not in calls:
                calls.append(name)

        handles.append(unet.get_submodule(name).register_forward_pre_hook(hook))
    try:
        _run_unit(unet, unit, cache, device, dtype, rows=1)
    finally:
        for h in handles:
            h.remove()
    return calls


def _run_unit(unet: nn.Module, unit: Unit, cache, device, dtype, rows: int | None = None, batch: int = 16):
    context = unet.ptq_state.context
    total = len(cache) if rows is None else rows
    for start in range(0, total, batch):
        index = torch.arange(start, min(start + batch, total))
        b = cache.batch(index, device, dtype)
        with context.use(b.timesteps):
            unit.run(unet, b.args, b.kwargs)


def _hessians(
    unet: nn.Module, name: str, layer: QuantLayerMixin, unit: Unit, cache, device, dtype, batch: int
) -> list[HessianAccumulator]:
    parts = _parts(layer)
    weights = layer._weight_parts(layer.weight)
    accs = [HessianAccumulator(w[0].numel(), device) for w in weights]

    def hook(module: QuantLayerMixin, args: tuple) -> None:
        x = module.quantize_input(args[0])
        for acc, part in zip(accs, parts):
            acc.add(module, x[:, part] if isinstance(module, nn.Conv2d) else x)

    handle = layer.register_forward_pre_hook(hook)
    try:
        with distributed.hold_failure() as failed:
            _run_unit(unet, unit, cache, device, dtype, batch=batch)
    finally:
        handle.remove()
    if distributed.is_initialized():  # the sums over every rank's rows: H as one process would see it
        distributed.all_reduce_sum([acc.sum for acc in accs], f"gptq: Hessian of {name}", failed.error)
        counts = distributed.exchange(f"gptq: rows of {name}", [(acc.vectors, acc.samples) for acc in accs])
        for i, acc in enumerate(accs):
            acc.vectors = sum(c[i][0] for c in counts)
            acc.samples = sum(c[i][1] for c in counts)
    return accs


@torch.no_grad()
def solve_layer(
    name: str, layer: QuantLayerMixin, accs: list[HessianAccumulator], config: WeightQuantConfig
) -> torch.Tensor:
    """The layer's new on-grid weight (same shape and dtype), every part solved on its own H."""
    new_parts = []
    for i, (q, part, acc) in enumerate(
        zip(layer.weight_quantizers, layer._weight_parts(layer.weight), accs, strict=True)
    ):
        what = name if len(accs) == 1 else f"{name} (input part {i})"
        if config.gptq_damp == 0 and acc.vectors < acc.columns:
            raise _rank_error(what, acc, config)
        w2d = part.detach().reshape(part.shape[0], -1).float()
        scale, zero = q.column_qparams(part)
        scale, zero = scale.to(w2d.device).float(), zero.to(w2d.device).float()
        try:
            out = gptq_round(
                w2d,
                acc.hessian(),
                scale,
                zero,
                q.qmin,
                q.qmax,
                damp=config.gptq_damp,
                block_size=config.gptq_block_size,
                act_order=config.gptq_act_order,
            )
        except RankDeficientHessian:
            raise _rank_error(what, acc, config) from None
        out = out.to(part.dtype)
        # The fake-quant forward and the saved integer codes must reproduce this weight exactly.
        if not torch.equal(fake_quantize(out.float(), scale, zero, q.qmin, q.qmax).to(part.dtype), out):
            raise RuntimeError(f"{what}: the GPTQ weight in {part.dtype} is not a point of its grid")
        new_parts.append(out.reshape(part.shape))
    return new_parts[0] if len(new_parts) == 1 else torch.cat(new_parts, dim=1)


def _rank_error(what: str, acc: HessianAccumulator, config: WeightQuantConfig) -> ValueError:
    return ValueError(
        f"weights.rounding='gptq': the Hessian of {what} ({acc.columns} x {acc.columns}) is singular after "
        f"dampening (weights.gptq_damp={config.gptq_damp}): its {acc.samples} calibration rows gave "
        f"{acc.vectors} input vectors, and it needs at least {acc.columns}, i.e. about "
        f"{acc.samples_needed()} calibration rows; record more calibration samples or raise "
        "weights.gptq_damp"
    )


class _Saved:
    """Quantizer switches and every quantized layer's weight Parameter, to put back after (or on failure)."""

    def __init__(self, unet: nn.Module) -> None:
        self.switches = QuantSwitches(unet)
        self.weights = [(m, m.weight) for m in unet.modules() if isinstance(m, QuantLayerMixin)]

    def restore_switches(self) -> None:
        self.switches.restore()

    def undo(self) -> None:
        for layer, weight in self.weights:
            layer.weight = weight
            layer.__dict__.pop("float_weight", None)


def release_float_weights(unet: nn.Module) -> None:
    """Drop the float weights GPTQ kept on its layers (done when the quantization job ends)."""
    for m in unet.modules():
        if isinstance(m, QuantLayerMixin):
            m.__dict__.pop("float_weight", None)


def gptq_quantize(
    unet: nn.Module,
    data: CalibrationSet,
    config: WeightQuantConfig,
    *,
    acts: bool,
    batch_size: int = 16,
    progress: bool = True,
) -> GPTQReport:
    """Give every quantized layer of `unet` GPTQ-rounded on-grid weights (in place; undone on failure).

    Inputs come from the model quantized so far, with activation fake quantization on when `acts`.
    Scales must already be initialised: GPTQ keeps every weight quantizer's scale and zero point.
    """
    started = time.perf_counter()
    report = GPTQReport(
        damp=config.gptq_damp,
        act_order=config.gptq_act_order,
        block_size=config.gptq_block_size,
        inputs="quantized activations" if acts else "float activations",
    )
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    units = reconstruction_units(unet, ReconstructionConfig(temporal_block=False), data)
    reached = {name for unit in units for name in unit.layers}
    for name, m in unet.named_modules():
        if isinstance(m, QuantLayerMixin) and name not in reached:
            report.skipped[name] = "never runs in a UNet forward"
    share = distributed.own_share(len(data), "calibration rows")
    rows = torch.arange(share.start, share.stop)  # this rank's (all of them in one process)
    saved = _Saved(unet)
    done = False
    bar = tqdm(total=len(reached), desc="gptq", unit="layer", disable=not progress)
    try:
        for unit in units:
            if not unit.layers:
                continue
            with distributed.guard(f"gptq: caching {unit.name}"):
                cache = build_cache(
                    unet,
                    unit,
                    data,
                    rows,
                    batch_size=batch_size,
                    cache_dtype="float32",
                    quant_state=(True, acts),
                )
            order = _layer_order(unet, unit, cache, device, dtype)
            for name in unit.layers:
                if name not in order:
                    report.skipped[name] = "never runs in its block"
                    bar.update()
            for name in order:
                layer = unet.get_submodule(name)
                if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                    report.skipped[name] = "grouped convolution (nearest rounding)"
                    bar.update()
                    continue
                accs = _hessians(unet, name, layer, unit, cache, device, dtype, batch_size)
                new = solve_layer(name, layer, accs, config)
                del accs
                old = layer.weight
                layer.weight = nn.Parameter(new.to(old.device, old.dtype), requires_grad=old.requires_grad)
                layer.__dict__.setdefault("float_weight", old)  # never registered, never saved
                report.layers += 1
                bar.update()
            del cache
        done = True
    finally:
        bar.close()
        if not done:
            saved.undo()
        saved.restore_switches()
    if report.skipped:
        logger.info("gptq: %d layers kept nearest rounding: %s", len(report.skipped), report.skipped)
    report.seconds = time.perf_counter() - started
    return report
