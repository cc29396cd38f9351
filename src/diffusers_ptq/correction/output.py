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

from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.correction.stats import GroupChannelSums, channel_rows
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


@torch.no_grad()
def correct_output(
    unet: nn.Module, data: CalibrationSet, batch_size: int, acts: bool, progress: bool = True
) -> dict:
    """Fit the UNet's `OutputCorrection` on `data` (see the module doc); leaves quantization on."""
    correction = output_correction(unet)
    channels = correction.b.shape[1]
    stats = GroupChannelSums(correction.num_groups, channels, correction.k.device)
    param = next(unet.parameters())
    n_batches = (len(data) + batch_size - 1) // batch_size
    batches = data.batches(batch_size, param.device, param.dtype)
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
        for name, value in (("eps", e), ("d", d), ("eps2", e * e), ("eps_d", e * d), ("d2", d * d)):
            stats.add(name, value, groups)
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
