"""Reconstruction units: a block (or a single layer) of the UNet that is optimised on its own.

A unit knows three things: how to catch its inputs during a UNet forward (then stop the forward), how to
catch its float outputs (and, for fine-grained block reconstruction, its inner layers' outputs), and how
to run itself on cached inputs. `ModuleUnit` covers every unit that is one module call (ResNet block,
transformer block, attention, up/down-sampler, single layer); the TFMQ-DM temporal block is in
`temporal.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from diffusers_ptq.quantizers import TimestepActQuantizer

InputSink = Callable[[tuple, dict], None]
OutputSink = Callable[[list[torch.Tensor], dict[str, torch.Tensor]], None]


class StopForward(Exception):
    """Raised by a capture hook once the unit's data is recorded: the rest of the UNet is skipped."""


def main_output(output: Any) -> torch.Tensor:
    """The feature tensor of a module's output (a tensor, a tuple or a diffusers ModelOutput)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, tuple | list) and output and torch.is_tensor(output[0]):
        return output[0]
    if hasattr(output, "to_tuple"):
        return main_output(output.to_tuple())
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


@dataclass(eq=False)
class Unit:
    """What a unit owns: quantized layers (AdaRound) and activation quantizers (LSQ), by qualified name."""

    name: str
    kind: str
    layers: list[str] = field(default_factory=list)
    act_quantizers: list[str] = field(default_factory=list)
    inner_layers: list[str] = field(default_factory=list)
    order: float = 0.0
    # Added to the anchors' first call index: the temporal block runs just before the first ResNet block.
    order_offset: float = 0.0

    def anchors(self, unet: nn.Module) -> list[nn.Module]:
        """Modules whose first call places this unit in the UNet's execution order."""
        raise NotImplementedError

    def modules(self, unet: nn.Module) -> list[nn.Module]:
        """Every module `run` calls: what CPU offload moves to the device for training."""
        raise NotImplementedError

    def capture_inputs(self, unet: nn.Module, sink: InputSink) -> list[RemovableHandle]:
        raise NotImplementedError

    def capture_outputs(self, unet: nn.Module, sink: OutputSink, inner: bool) -> list[RemovableHandle]:
        raise NotImplementedError

    def run(
        self, unet: nn.Module, args: tuple, kwargs: dict, inner: bool = False
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Outputs of the unit on cached inputs, plus its inner layers' outputs when `inner`."""
        raise NotImplementedError

    def executed_act_quantizers(self, unet: nn.Module) -> list[TimestepActQuantizer]:
        """Activation quantizers that run inside `run` (QDrop applies to all of them)."""
        return [unet.get_submodule(n) for n in self.act_quantizers]


def _inner_hooks(
    unet: nn.Module, names: list[str], store: dict[str, torch.Tensor], owner: str
) -> list[RemovableHandle]:
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple, output: Any, name: str = name) -> None:
            if name in store:
                raise RuntimeError(
                    f"layer {name} ran twice in one call of unit {owner}; fine-grained reconstruction needs "
                    "each inner layer to run once (set layer_loss_weight=0)"
                )
            store[name] = main_output(output)

        handles.append(unet.get_submodule(name).register_forward_hook(hook))
    return handles


@dataclass(eq=False)
class ModuleUnit(Unit):
    """A unit that is one call of one module (`name` is its qualified name in the UNet)."""

    def module(self, unet: nn.Module) -> nn.Module:
        return unet.get_submodule(self.name)

    def anchors(self, unet: nn.Module) -> list[nn.Module]:
        return [self.module(unet)]

    def modules(self, unet: nn.Module) -> list[nn.Module]:
        return [self.module(unet)]

    def capture_inputs(self, unet: nn.Module, sink: InputSink) -> list[RemovableHandle]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            sink(args, kwargs)
            raise StopForward

        return [self.module(unet).register_forward_pre_hook(hook, with_kwargs=True)]

    def capture_outputs(self, unet: nn.Module, sink: OutputSink, inner: bool) -> list[RemovableHandle]:
        store: dict[str, torch.Tensor] = {}
        handles = _inner_hooks(unet, self.inner_layers, store, self.name) if inner else []

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            sink([main_output(output)], dict(store))
            store.clear()  # the next batch's inner outputs
            raise StopForward

        handles.append(self.module(unet).register_forward_hook(hook))
        return handles

    def run(
        self, unet: nn.Module, args: tuple, kwargs: dict, inner: bool = False
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        store: dict[str, torch.Tensor] = {}
        handles = _inner_hooks(unet, self.inner_layers, store, self.name) if inner else []
        try:
            out = main_output(self.module(unet)(*args, **kwargs))
        finally:
            for h in handles:
                h.remove()
        return [out], store

    def executed_act_quantizers(self, unet: nn.Module) -> list[TimestepActQuantizer]:
        # Quantizers owned by an earlier unit (the temporal block's) still run, and QDrop covers them too.
        return [m for m in self.module(unet).modules() if isinstance(m, TimestepActQuantizer)]
