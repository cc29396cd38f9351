"""`output` bias correction: PTQD's correction of the noise prediction, per timestep group.

On the calibration rows the quantized UNet's error d = eps_q - eps is regressed on the float prediction,
d ~ k_g eps + b_g[c] (least squares: one slope per timestep group, one intercept per group and channel),
and the UNet's `OutputCorrection` then returns (eps_q - b_g) / (1 + k_g). The intercept makes the corrected
error's mean over each group's samples and positions zero in every channel. The variance the fit leaves
(`residual_var`) is stored but not removed: PTQD lowers the sampler's added noise by it for eta > 0, which
needs the scheduler, and the pipeline stays stock.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusers_ptq import distributed
from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.correction.stats import GroupChannelSums, all_reduce, channel_rows
from diffusers_ptq.initialise import set_quant_state
from diffusers_ptq.quantizers import OutputCorrection
from diffusers_ptq.quantizers.bias import OUTPUT_CORRECTION_ATTR
from diffusers_ptq.reconstruction.units import main_output


def output_correction(unet: nn.Module) -> OutputCorrection:
    module = getattr(unet, OUTPUT_CORRECTION_ATTR, None)
    if not isinstance(module, OutputCorrection):
        raise ValueError(
            "bias_correction='output' found no OutputCorrection on the UNet; it was quantized with another "
            "bias_correction setting"
        )
    return module


def fit_output_correction(stats: GroupChannelSums) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k (G,), b (G, C), residual variance (G,)) from sums of eps, d, eps^2, eps d and d^2 (float64)."""
    n = stats.counts[:, None]
    safe = n.clamp_min(1.0)
    se, sd = stats.sums["eps"], stats.sums["d"]
    see, sed, sdd = stats.sums["eps2"], stats.sums["eps_d"], stats.sums["d2"]
    cov = (sed - se * sd / safe).sum(dim=1)
    var = (see - se * se / safe).sum(dim=1)
    k = torch.where(var > 0, cov / var.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(var))
    k = torch.where(stats.counts > 0, k, torch.zeros_like(k))
    kk = k[:, None]
    b = (sd - kk * se) / safe
    residual = sdd - 2 * kk * sed - 2 * b * sd + kk * kk * see + 2 * kk * b * se + n * b * b
    residual_var = residual.sum(dim=1).clamp_min(0.0) / (safe[:, 0] * stats.channels)
    bad = [g for g in range(k.shape[0]) if float(k[g]) <= -1.0]
    if bad:
        raise ValueError(
            f"bias_correction='output': timestep group(s) {bad} have a correlated error slope k <= -1 "
            f"(k = {[round(float(k[g]), 4) for g in bad]}); the quantized UNet's prediction does not follow "
            "the float one there. Use bias_correction='layer' or more bits"
        )
    return k, b, residual_var


SUMS = ("eps", "d", "eps2", "eps_d", "d2")


def _accumulate(
    unet: nn.Module,
    correction: OutputCorrection,
    stats: GroupChannelSums,
    data: CalibrationSet,
    batch_size: int,
    acts: bool,
    progress: bool,
) -> None:
    """Add this rank's calibration rows (all of them in one process) into `stats`."""
    param = next(unet.parameters())
    rows = distributed.own_share(len(data), "calibration rows")
    n_batches = (len(rows) + batch_size - 1) // batch_size
    batches = data.batches(batch_size, param.device, param.dtype, rows)
    for kwargs in tqdm(batches, total=n_batches, desc="bias correction: output", disable=not progress):
        set_quant_state(unet, weights=False, acts=False)
        eps = main_output(unet(**kwargs))
        set_quant_state(unet, weights=True, acts=acts)
        correction.enabled = False  # fit the raw quantized prediction
        eps_q = main_output(unet(**kwargs))
        groups = correction.group_map[correction.context.per_sample(eps.shape[0])]
        e, per_row = channel_rows(eps, 1)
        q, _ = channel_rows(eps_q, 1)
        d = q - e
        stats.count(groups, per_row)
        for name, value in zip(SUMS, (e, d, e * e, e * d, d * d)):
            stats.add(name, value, groups)


@torch.no_grad()
def correct_output(
    unet: nn.Module, data: CalibrationSet, batch_size: int, acts: bool, progress: bool = True
) -> dict:
    """Fit the UNet's `OutputCorrection` on `data` (see the module doc); leaves quantization on.

    With a process group each rank predicts its contiguous share of the rows and the float64 sums are added
    across ranks, so every rank fits the same correction (one process's to float64 summation order).
    """
    correction = output_correction(unet)
    stats = GroupChannelSums(correction.num_groups, correction.b.shape[1], correction.k.device)
    with distributed.hold_failure() as failed:
        _accumulate(unet, correction, stats, data, batch_size, acts, progress)
    all_reduce([stats], SUMS, "bias correction: output", failed.error)
    k, b, residual_var = fit_output_correction(stats)
    correction.k.copy_(k.to(correction.k.dtype))
    correction.b.copy_(b.to(correction.b.dtype))
    correction.residual_var.copy_(residual_var.to(correction.residual_var.dtype))
    set_quant_state(unet, weights=True, acts=acts)
    return {
        "mode": "output",
        "k": [round(float(v), 6) for v in k],
        "max_abs_b": float(b.abs().max()),
        "residual_var": [float(v) for v in residual_var],
        "empty_groups": stats.empty_groups(),
    }
