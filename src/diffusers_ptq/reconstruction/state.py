"""What a reconstruction run changes, and how it is put back.

`SavedState` snapshots, before anything trains, the quantizer switches, requires_grad and training flags,
activation step sizes and weight Parameters, so a failed or undone run leaves the UNet exactly as it was.
`learned_tensors` / `restore_learned` are one unit's learned state (packed AdaRound bits, step sizes) as
the resume checkpoint stores it, and its restoration on a later call.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.initialise import QuantSwitches
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.reconstruction.checkpoint import ResumeCheckpoint, pack_bits, unpack_bits
from diffusers_ptq.reconstruction.lsq import restore_scales, snapshot_scales
from diffusers_ptq.reconstruction.rounding import restore_rounding, unwrap_layer, wrapped_layers
from diffusers_ptq.reconstruction.trainer import Phase
from diffusers_ptq.reconstruction.units import Unit


class SavedState:
    """What reconstruction changes, saved at the start for restoring: quantizer switches, requires_grad
    flags, every module's training flag, step sizes and each quantized layer's weight Parameter (baking
    rebinds it)."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.switches = QuantSwitches(unet)
        self.grads = [(p, p.requires_grad) for p in unet.parameters()]
        self.scales = snapshot_scales(unet)
        self.training = [(m, m.training) for m in unet.modules()]
        self.weights = [(m, m.weight) for m in unet.modules() if isinstance(m, QuantLayerMixin)]

    def restore_switches(self) -> None:
        self.switches.restore()
        for p, requires_grad in self.grads:
            p.requires_grad_(requires_grad)
        for layer, weight in self.weights:  # a baked weight takes the flag of the one it replaced
            layer.weight.requires_grad_(weight.requires_grad)
        for m, training in self.training:
            m.training = training  # per module: a mixed train/eval model keeps its mix

    def undo(self) -> None:
        for _, layer in wrapped_layers(self.unet):
            unwrap_layer(layer)
        for layer, weight in self.weights:
            if layer.weight is not weight:
                layer.weight = weight
        restore_scales(self.unet, self.scales)


def learned_tensors(
    unet: nn.Module, unit: Unit, phase: Phase
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    tensors, shapes = {}, {}
    if phase.learn_rounding:
        for name in unit.layers:
            for i, q in enumerate(unet.get_submodule(name).weight_quantizers):
                key = f"{name}.weight_quantizers.{i}.round_up"
                tensors[key] = pack_bits(q.round_up)
                shapes[key] = list(q.round_up.shape)
    if phase.learn_scales:
        for name in unit.act_quantizers:
            tensors[f"{name}.scale"] = unet.get_submodule(name).scale.detach().float()
    return tensors, shapes


@torch.no_grad()
def restore_learned(
    unet: nn.Module, unit: Unit, phase: Phase, checkpoint: ResumeCheckpoint, entry: dict
) -> None:
    tensors, shapes = checkpoint.load(entry)

    def get(key: str) -> torch.Tensor:
        if key not in tensors:
            raise ValueError(f"{entry['file']} of the reconstruction checkpoint has no {key!r}")
        return tensors[key]

    if phase.learn_rounding:
        for name in unit.layers:
            layer = unet.get_submodule(name)
            parts = layer._weight_parts(layer.weight)
            masks = []
            for i, part in enumerate(parts):
                key = f"{name}.weight_quantizers.{i}.round_up"
                if shapes.get(key) != list(part.shape):
                    raise ValueError(
                        f"{entry['file']}: {key} has shape {shapes.get(key)}, expected {list(part.shape)}"
                    )
                masks.append(unpack_bits(get(key), shapes[key]))
            restore_rounding(layer, masks)
    if phase.learn_scales:
        for name in unit.act_quantizers:
            scale = unet.get_submodule(name).scale
            stored = get(f"{name}.scale")
            if stored.shape != scale.shape:
                raise ValueError(
                    f"{entry['file']}: {name}.scale has shape {tuple(stored.shape)}, "
                    f"expected {tuple(scale.shape)}"
                )
            scale.copy_(stored.to(scale.device, scale.dtype))
