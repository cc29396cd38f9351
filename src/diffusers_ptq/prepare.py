"""Plan which UNet modules get quantized (pure), then install the quantized modules (reversibly).

`plan_quantization` reads the UNet and the config and changes nothing, so bad configs fail before any
work. `install` swaps modules and attention processors in and returns a `Patch` whose `restore()` puts
every original back, so a failure half-way leaves the pipeline as it was.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from diffusers_ptq.config import PTQConfig
from diffusers_ptq.nn import (
    SOFTMAX_FLOAT_BITS,
    SUPPORTED_PROCESSORS,
    QuantAttnProcessor,
    QuantConv2d,
    QuantLinear,
)
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.quantizers import OutputCorrection, TimestepActQuantizer, TimestepBiasTable
from diffusers_ptq.quantizers.bias import OUTPUT_CORRECTION_ATTR, apply_output_correction
from diffusers_ptq.quantizers.groups import layer_group_size
from diffusers_ptq.timestep import TimestepContext

SPECIAL_PREFIXES = ("time_embedding.", "class_embedding.", "add_embedding.")
SPECIAL_NAMES = ("conv_in", "conv_out")


@dataclass
class LayerPlan:
    name: str
    kind: str  # "conv" | "linear"
    weight_bits: int
    act_bits: int | None
    split: int | None = None
    special: bool = False


@dataclass
class AttentionPlan:
    name: str
    act_bits: int
    softmax_bits: int | None  # None: softmax left float


@dataclass
class QuantPlan:
    layers: list[LayerPlan] = field(default_factory=list)
    attentions: list[AttentionPlan] = field(default_factory=list)
    kept_float: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def is_special_layer(name: str) -> bool:
    return name in SPECIAL_NAMES or name.startswith(SPECIAL_PREFIXES)


def is_quantized(unet: nn.Module) -> bool:
    return any(isinstance(m, QuantLayerMixin | QuantAttnProcessor) for m in unet.modules())


def shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """Input-channel split of each up-block `conv_shortcut` that sees cat([upsampled, skip])."""
    splits: dict[str, int] = {}
    up_blocks = getattr(unet, "up_blocks", None)
    if up_blocks is None:
        return splits
    prev_out = unet.config.block_out_channels[-1]  # the mid block keeps the deepest width
    for j, block in enumerate(up_blocks):
        resnets = getattr(block, "resnets", None) or []
        for i, resnet in enumerate(resnets):
            shortcut = getattr(resnet, "conv_shortcut", None)
            upsampled = prev_out if i == 0 else resnets[i - 1].out_channels
            if isinstance(shortcut, nn.Conv2d) and 0 < upsampled < shortcut.in_channels:
                splits[f"up_blocks.{j}.resnets.{i}.conv_shortcut"] = upsampled
        if resnets:
            prev_out = resnets[-1].out_channels
    return splits


def _matches(name: str, patterns: list[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def _selection_reason(name: str, config: PTQConfig) -> str | None:
    """Why `name` stays float, or None if it is quantized."""
    if _matches(name, config.layers.include) is None:
        return "not matched by layers.include"
    pattern = _matches(name, config.layers.exclude)
    if pattern is not None:
        return f"excluded by pattern {pattern!r}"
    if is_special_layer(name) and config.layers.special_layers == "float":
        return "special layer kept float (layers.special_layers='float')"
    return None


def plan_quantization(unet: nn.Module, config: PTQConfig) -> QuantPlan:
    """Decide, without changing anything, which modules are quantized at which bits."""
    plan = QuantPlan()
    splits = shortcut_splits(unet) if config.layers.shortcut_split else {}
    acts = config.activations
    for name, module in unet.named_modules():
        if type(module) not in (nn.Conv2d, nn.Linear):
            if isinstance(module, Attention):
                _plan_attention(plan, name, module, config)
            continue
        reason = _selection_reason(name, config)
        if reason is not None:
            plan.kept_float.append((name, reason))
            continue
        special = is_special_layer(name)
        w_bits, a_bits = config.weights.bits, acts.bits
        if special and config.layers.special_layers == "8bit":
            w_bits, a_bits = 8, (None if a_bits is None else 8)
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        plan.layers.append(LayerPlan(name, kind, w_bits, a_bits, splits.get(name), special))
    _check_group_sizes(unet, plan, config)
    return plan


def group_fallbacks(unet: nn.Module, plan: QuantPlan, config: PTQConfig) -> list[str]:
    """Planned layers (and split halves) meant for per-group scales that get per-channel scales instead:
    weights.group_size does not divide their input size K (nor, under 'auto', does any size near it:
    `quantizers.groups.layer_group_size`). Empty unless the granularity ('per_group', or 'auto' at the
    layer's bit width) is per group.
    """
    weights = config.weights
    found = []
    for layer in plan.layers:
        if weights.granularity_in_effect(layer.weight_bits) != "per_group":
            continue
        weight = unet.get_submodule(layer.name).weight
        per_input = weight[0, 0].numel()  # kh * kw for a conv, 1 for a Linear
        channels = weight.shape[1]
        halves = [channels] if layer.split is None else [layer.split, channels - layer.split]
        for i, c in enumerate(halves):
            k = c * per_input
            if layer_group_size(k, weights.group_size, weights.granularity == "auto") is None:
                part = "" if len(halves) == 1 else f" (split part {i})"
                found.append(f"{layer.name}{part}: K={k}")
    return found


def _check_group_sizes(unet: nn.Module, plan: QuantPlan, config: PTQConfig) -> None:
    # 'auto' falls back quietly: the user asked for the best default, not for groups everywhere.
    if config.weights.granularity != "per_group":
        return
    found = group_fallbacks(unet, plan, config)
    if not found:
        return
    size = config.weights.group_size
    listed = "; ".join(found)
    if config.weights.strict_groups:
        raise ValueError(
            f"weights.group_size={size} does not divide the input size K of {len(found)} layer(s): {listed}. "
            "Choose a group size that divides them, exclude the layers, or set weights.strict_groups=False "
            "to fall back to per-channel scales there"
        )
    warnings.warn(
        f"weights.group_size={size} does not divide the input size K of {len(found)} layer(s); they use "
        f"per-channel weight scales instead: {listed}",
        stacklevel=3,
    )


def _plan_attention(plan: QuantPlan, name: str, module: Attention, config: PTQConfig) -> None:
    acts = config.activations
    if acts.bits is None or not acts.quantize_attention:
        return
    reason = _selection_reason(name, config)
    if reason is None and type(module.processor) not in SUPPORTED_PROCESSORS:
        reason = f"attention processor {type(module.processor).__name__} is not supported; matmuls left float"
    if reason is not None:
        plan.kept_float.append((f"{name} (matmuls)", reason))
        return
    softmax = None if acts.softmax_bits >= SOFTMAX_FLOAT_BITS else acts.softmax_bits
    plan.attentions.append(AttentionPlan(name, acts.bits, softmax))


class Patch:
    """Record of what `install` replaced; `restore()` undoes it exactly."""

    def __init__(self, unet: nn.Module, context: TimestepContext) -> None:
        self.unet = unet
        self.context = context
        self.modules: list[tuple[nn.Module, str, nn.Module]] = []
        self.processors: list[tuple[Attention, object]] = []
        self.output_hook: torch.utils.hooks.RemovableHandle | None = None
        self.output_module = False  # whether install added the UNet's OutputCorrection

    def restore(self) -> None:
        if self.output_hook is not None:
            self.output_hook.remove()
            self.output_hook = None
        if self.output_module:
            del self.unet._modules[OUTPUT_CORRECTION_ATTR]
            self.output_module = False
        for parent, attr, original in reversed(self.modules):
            setattr(parent, attr, original)
        for attn, original in reversed(self.processors):
            attn.set_processor(original)
        self.context.detach(self.unet)
        self.modules.clear()
        self.processors.clear()


def install(
    unet: nn.Module, plan: QuantPlan, config: PTQConfig, context: TimestepContext, group_map: torch.Tensor
) -> Patch:
    """Swap in the planned quantized modules; on any error, undo what was done and re-raise."""
    patch = Patch(unet, context)
    try:
        context.attach(unet)
        for layer in plan.layers:
            parent_name, _, attr = layer.name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            original = getattr(parent, attr)
            weight_config = copy.copy(config.weights)
            weight_config.bits = layer.weight_bits
            factory = _act_factory(config, context, group_map, layer.name, layer.act_bits)
            if layer.kind == "conv":
                new = QuantConv2d.from_float(original, weight_config, factory, layer.split)
            else:
                new = QuantLinear.from_float(original, weight_config, factory)
            setattr(parent, attr, new)
            patch.modules.append((parent, attr, original))
            if config.bias_correction == "layer":
                table = TimestepBiasTable(context, group_map, new.weight.shape[0])
                new.bias_table = table.to(group_map.device)
        for attn_plan in plan.attentions:
            attn = unet.get_submodule(attn_plan.name)
            original = attn.processor
            make = _act_factory(config, context, group_map, attn_plan.name, attn_plan.act_bits)
            softmax = None
            if attn_plan.softmax_bits is not None:
                softmax = TimestepActQuantizer(
                    config.activations,
                    context,
                    group_map,
                    bits=attn_plan.softmax_bits,
                    unsigned=True,
                    name=f"{attn_plan.name}.softmax",
                )
            processor = QuantAttnProcessor(make("q"), make("k"), make("v"), softmax, original=original)
            attn.set_processor(processor.to(group_map.device))
            patch.processors.append((attn, original))
        if config.bias_correction == "output":
            _install_output_correction(unet, patch, context, group_map)
    except BaseException:
        patch.restore()
        raise
    return patch


def _install_output_correction(
    unet: nn.Module, patch: Patch, context: TimestepContext, group_map: torch.Tensor
) -> None:
    channels = getattr(unet.config, "out_channels", None)
    if not isinstance(channels, int):
        raise ValueError(
            f"bias_correction='output' needs the UNet's config.out_channels; {type(unet).__name__} has none"
        )
    if OUTPUT_CORRECTION_ATTR in unet._modules:
        raise ValueError(f"the UNet already has a submodule named {OUTPUT_CORRECTION_ATTR!r}")
    module = OutputCorrection(context, group_map, channels).to(group_map.device)
    unet.add_module(OUTPUT_CORRECTION_ATTR, module)
    patch.output_module = True
    patch.output_hook = unet.register_forward_hook(apply_output_correction)


def _act_factory(
    config: PTQConfig, context: TimestepContext, group_map: torch.Tensor, name: str, bits: int | None
):
    if bits is None:
        return None

    def make(suffix: str) -> TimestepActQuantizer:
        return TimestepActQuantizer(
            config.activations, context, group_map, bits=bits, name=f"{name}.{suffix}"
        )

    return make
