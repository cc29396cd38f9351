"""LSQ-style learning of activation step sizes, and QDrop.

A TimestepActQuantizer's `scale` buffer is a table with one step size per timestep group, indexed per sample.
Making that buffer itself trainable (requires_grad) lets the straight-through fake quantization
(`primitives.fake_quantize`) deliver the LSQ gradient, and each group's entry receives gradient only from
the samples of its own timesteps. The zero-point stays fixed, as in BRECQ / Q-Diffusion.

QDrop (Wei et al., 2022): while a block trains, each activation element is left unquantized with probability
p, through a forward hook on the quantizers, so nothing in the quantizer itself changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from diffusers_ptq.quantizers import TimestepActQuantizer

MIN_SCALE = 1e-8


def enable_scale_learning(quantizers: list[TimestepActQuantizer]) -> list[torch.Tensor]:
    """Make each quantizer's step-size table trainable; returns the tensors to optimise."""
    params = []
    for q in quantizers:
        q.scale.requires_grad_(True)
        params.append(q.scale)
    return params


def disable_scale_learning(quantizers: list[TimestepActQuantizer]) -> None:
    for q in quantizers:
        q.scale.requires_grad_(False)
        q.scale.grad = None


@torch.no_grad()
def clamp_scales(quantizers: list[TimestepActQuantizer]) -> None:
    """Keep step sizes positive after an optimiser step (a zero or negative step is no grid)."""
    for q in quantizers:
        q.scale.clamp_(min=MIN_SCALE)


def snapshot_scales(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: m.scale.detach().clone()
        for name, m in unet.named_modules()
        if isinstance(m, TimestepActQuantizer)
    }


@torch.no_grad()
def restore_scales(unet: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for name, scale in snapshot.items():
        target = unet.get_submodule(name).scale
        target.requires_grad_(False)
        target.copy_(scale)


@contextlib.contextmanager
def qdrop(
    quantizers: list[TimestepActQuantizer], prob: float, generator: torch.Generator | None
) -> Iterator[None]:
    """Within the block, keep each activation element unquantized with probability `prob`."""
    if prob <= 0 or not quantizers:
        yield
        return

    def hook(module: TimestepActQuantizer, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not module.enabled or module.observer is not None:
            return None
        x = args[0]
        keep_float = torch.rand(output.shape, generator=generator, device=output.device) < prob
        return torch.where(keep_float, x.to(output.dtype), output)

    handles = [q.register_forward_hook(hook) for q in quantizers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
