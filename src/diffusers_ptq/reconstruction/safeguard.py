"""Reconstruction never leaves a unit worse than it started.

Each unit's cached rows are split once (seeded by the unit's name) into training rows and a held-out slice
the optimiser never sees. The unit's block loss on the held-out rows is measured before training (its
starting point: the quantizers as they were, round-to-nearest or the rounding a resumed run restored) and
after (hard rounding, no QDrop: the unit as it will be deployed), on the same cached inputs, which come
from the model quantized so far exactly as in training. The unit keeps what it learned only if that loss
went down; otherwise `StartingPoint.restore` puts back its weight quantizers and step sizes exactly.

`reconstruct` holds out the same calibration rows from every unit, so they are unseen by the whole run, and
checks the model as a whole on them too: units that each improved can still add up to a worse UNet (they
were judged one at a time, the weight pass with activations float). If the reconstructed UNet's noise
prediction is further from the float UNet's on those rows than the calibrated UNet's was, in mean squared
error or in the mean of its error over the rows (its systematic part), the whole run is undone.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq import distributed
from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.initialise import float_mode
from diffusers_ptq.quantizers import TimestepActQuantizer
from diffusers_ptq.reconstruction.config import ReconstructionConfig
from diffusers_ptq.reconstruction.units import main_output

HOLDOUT_MAX_ROWS = 64


def split_rows(n: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows) of a cache of `n` rows: `fraction` of them held out (at least one, at
    most HOLDOUT_MAX_ROWS, always leaving one to train on). With a single row it serves both."""
    if n < 2:
        rows = torch.arange(n)
        return rows, rows
    k = min(HOLDOUT_MAX_ROWS, n - 1, max(1, round(fraction * n)))
    perm = torch.randperm(n, generator=generator)
    return perm[k:].sort().values, perm[:k].sort().values


class StartingPoint:
    """A unit's weight quantizers (the objects themselves, per layer) and step sizes before it trains."""

    def __init__(self, layers: list[nn.Module], act_quantizers: list[TimestepActQuantizer]) -> None:
        self.layers = [(layer, list(layer.weight_quantizers)) for layer in layers]
        self.scales = [(q, q.scale.detach().clone()) for q in act_quantizers]

    @torch.no_grad()
    def restore(self) -> None:
        """Put the unit back exactly as it was: its own quantizers (AdaRound wrappers dropped), its scales."""
        for layer, quantizers in self.layers:
            for i, q in enumerate(quantizers):
                layer.weight_quantizers[i] = q
        for q, scale in self.scales:
            q.scale.requires_grad_(False)
            q.scale.grad = None
            q.scale.copy_(scale)


@torch.no_grad()
def model_outputs(unet: nn.Module, data: CalibrationSet, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The UNet's outputs (float32, CPU) on the calibration `rows`, in its current quantization state.

    Under torch.distributed, `rows` are this rank's and the result is every rank's, in rank order.
    """
    param = next(unet.parameters())
    outputs = []
    with distributed.hold_failure() as failed:
        for start in range(0, len(rows), batch_size):
            kwargs = data.unet_kwargs(rows[start : start + batch_size], param.device, param.dtype)
            outputs.append(main_output(unet(**kwargs)).float().cpu())
    local = torch.cat(outputs) if outputs else None
    return distributed.gather_rows(local, "reconstruction: held-out outputs", failed.error)


def output_errors(outputs: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(mean squared error, mean square of the error's mean over the rows): the second is the systematic
    part the sampler adds up over its steps, which the first barely sees."""
    error = outputs - reference
    return float(error.pow(2).mean()), float(error.mean(dim=0).pow(2).mean())


@torch.no_grad()
def holdout_error(
    unet: nn.Module,
    data: CalibrationSet,
    rows: torch.Tensor,
    config: ReconstructionConfig,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[float, float]]:
    """(float outputs on `rows`, `output_errors` of the UNet's outputs, as it is switched, from them)."""
    if reference is None:
        with float_mode(unet):
            reference = model_outputs(unet, data, rows, config.cache_batch_size)
    return reference, output_errors(model_outputs(unet, data, rows, config.cache_batch_size), reference)
