"""The block map: which modules of a quantized diffusers UNet form a reconstruction unit, in execution order.

Units (BRECQ / Q-Diffusion): every ResnetBlock2D, BasicTransformerBlock (or the whole Transformer2DModel),
attention block of UNet2DModel (`Attention` outside a transformer block), Downsample2D and Upsample2D;
every quantized layer outside those (conv_in, conv_out, the time / class / added embeddings, a
transformer's proj_in / proj_out) is a unit on its own. With TFMQ-DM's temporal block, the time embedding
and every ResNet block's time projection form one unit that is reconstructed before the first ResNet block.
The order is the order of the units' first calls in one real UNet forward, so skip connections and the
mid block sit where the UNet runs them (module registration order puts `up_blocks` before `mid_block`).
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.quantizers import TimestepActQuantizer
from diffusers_ptq.reconstruction.config import ReconstructionConfig
from diffusers_ptq.reconstruction.temporal import TemporalUnit
from diffusers_ptq.reconstruction.units import ModuleUnit, Unit

logger = logging.getLogger("diffusers_ptq")
ACT_LIST = "act_quantizers"  # QuantLayerMixin's ModuleList of input quantizers

try:  # newer diffusers split the conditional-norm ResNet out of ResnetBlock2D
    from diffusers.models.resnet import ResnetBlockCondNorm2D

    RESNET_TYPES: tuple[type, ...] = (ResnetBlock2D, ResnetBlockCondNorm2D)
except ImportError:  # pragma: no cover - depends on the diffusers version
    RESNET_TYPES = (ResnetBlock2D,)


def _block_kind(module: nn.Module, config: ReconstructionConfig) -> str | None:
    if isinstance(module, RESNET_TYPES):
        return "resnet"
    if isinstance(module, Transformer2DModel) and config.transformer_unit == "model":
        return "transformer_model"
    if isinstance(module, BasicTransformerBlock):
        return "transformer"
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, Downsample2D | Upsample2D):
        return "sample"
    return None


def _under(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


def _layer_of(act_quantizer: str) -> str | None:
    """The layer whose input quantizer `act_quantizer` is (None for attention-matmul quantizers)."""
    layer, sep, _ = act_quantizer.rpartition(f".{ACT_LIST}.")
    return layer if sep else None


def block_map(unet: nn.Module, config: ReconstructionConfig) -> list[Unit]:
    """Reconstruction units of a quantized `unet` in module order (see `order_units` for run order).

    Every quantized layer belongs to exactly one unit; units that own nothing quantized are left out.
    """
    quant_layers = {n: m for n, m in unet.named_modules() if isinstance(m, QuantLayerMixin)}
    act_names = [n for n, m in unet.named_modules() if isinstance(m, TimestepActQuantizer)]
    units: list[Unit] = []
    claimed: set[str] = set()
    if config.temporal_block:
        temporal = TemporalUnit.build(unet, quant_layers)
        if temporal is not None:
            units.append(temporal)
            claimed.update(temporal.layers)

    roots: list[tuple[str, str]] = []
    for name, module in unet.named_modules():
        if not name or any(_under(name, root) for root, _ in roots):
            continue  # named_modules is pre-order: a unit's descendants follow it
        kind = _block_kind(module, config)
        if kind is not None:
            roots.append((name, kind))

    def owned_acts(prefix: str, layers: list[str]) -> list[str]:
        inside = [a for a in act_names if _under(a, prefix)]
        owned = set(layers)
        # Input quantizers of layers another unit owns (the temporal block's time projections) stay with
        # it; attention-matmul quantizers belong to no layer.
        return [a for a in inside if _layer_of(a) is None or _layer_of(a) in owned]

    for root, kind in roots:
        layers = [n for n in quant_layers if _under(n, root) and n not in claimed]
        acts = owned_acts(root, layers)
        if not layers and not acts:
            continue
        claimed.update(layers)
        # FBR's inner-layer terms; a block of one layer (an up/down-sampler) has none beyond its output.
        inner = layers if len(layers) > 1 else []
        units.append(ModuleUnit(name=root, kind=kind, layers=layers, act_quantizers=acts, inner_layers=inner))
    for name, layer in quant_layers.items():
        if name in claimed:
            continue
        acts = [f"{name}.act_quantizers.{i}" for i in range(len(layer.act_quantizers))]
        units.append(ModuleUnit(name=name, kind="layer", layers=[name], act_quantizers=acts))
        claimed.add(name)
    return units


@torch.no_grad()
def order_units(unet: nn.Module, units: list[Unit], data: CalibrationSet) -> list[Unit]:
    """Sort `units` by their first call in one UNet forward on the first calibration row.

    Units that never run are dropped (with a log line); a module unit called twice per forward is an
    error, because its inputs could not be cached one row per calibration sample.
    """
    calls: dict[int, int] = {}
    counts: dict[int, int] = {}
    handles = []
    modules = {id(m): m for unit in units for m in unit.anchors(unet)}
    for key, module in modules.items():

        def hook(mod: nn.Module, args: tuple, key: int = key) -> None:
            calls.setdefault(key, len(calls))
            counts[key] = counts.get(key, 0) + 1

        handles.append(module.register_forward_pre_hook(hook))
    param = next(unet.parameters())
    try:
        unet(**data.unet_kwargs(slice(0, 1), param.device, param.dtype))
    finally:
        for h in handles:
            h.remove()
    ordered = []
    for unit in units:
        keys = [id(m) for m in unit.anchors(unet)]
        seen = [calls[k] for k in keys if k in calls]
        if not seen:
            logger.info("reconstruction: %s never runs in a UNet forward; left as it is", unit.name)
            continue
        if isinstance(unit, ModuleUnit) and counts[keys[0]] > 1:
            raise ValueError(
                f"{unit.name} runs {counts[keys[0]]} times in one UNet forward; block reconstruction caches "
                "one input per call and supports units that run once"
            )
        unit.order = min(seen) + unit.order_offset
        ordered.append(unit)
    return sorted(ordered, key=lambda u: u.order)


def reconstruction_units(unet: nn.Module, config: ReconstructionConfig, data: CalibrationSet) -> list[Unit]:
    """`block_map` in execution order."""
    return order_units(unet, block_map(unet, config), data)
