"""Differentiable group assignment of one activation quantizer (APQ-DM, Eq. 6).

While the search runs, the quantizer's output is the softmax-weighted mix of its G candidate quantizers,

    y = sum_g sigma_g(t) * Q_g(x),    sigma(t) = softmax(logits[row(t)]),

per sample, so a batch may mix timesteps. Logits have one row per distinct timestep of the sampling
schedule (`row_of` maps every training timestep to its nearest row); the G scales are learned in log
space around their initial values, so one learning rate moves small and large ranges alike. Zero points
stay at their initial (integer) values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffusers_ptq.quantizers import TimestepActQuantizer


class _MixedFakeQuant(torch.autograd.Function):
    """sum_g p[:, g] * Q_g(x) with straight-through rounding, its backward recomputed group by group.

    Autograd through G fake quantizers would keep several activation-sized tensors per group and layer;
    this keeps only its inputs (x is saved by the layer anyway) and recomputes each group in backward.
    Gradients match `fake_quantize`'s: STE for x, LSQ for the scales, <grad, Q_g(x)> per sample for p.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        probs: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor,
        qmin: int,
        qmax: int,
    ) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.ndim - 1)
        out = torch.zeros_like(x)
        for g in range(probs.shape[1]):
            # In place: one temporary per group; codes are kept relative to the zero point.
            code = (
                torch.div(x, scales[g]).round_().add_(zero_points[g]).clamp_(qmin, qmax).sub_(zero_points[g])
            )
            out.addcmul_(code, (probs[:, g] * scales[g]).reshape(shape))
        ctx.save_for_backward(x, probs, scales, zero_points)
        ctx.qrange = (qmin, qmax)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, probs, scales, zero_points = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        shape = (-1,) + (1,) * (x.ndim - 1)
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_p = torch.zeros_like(probs)
        grad_s = torch.zeros_like(scales)
        for g in range(probs.shape[1]):
            v = x / scales[g]
            code = torch.round(v)
            inside = ((code >= qmin - zero_points[g]) & (code <= qmax - zero_points[g])).to(x.dtype)
            code.clamp_(qmin - zero_points[g], qmax - zero_points[g])  # dequantized code, in steps
            p = probs[:, g].reshape(shape)
            weighted = grad * p
            if grad_x is not None:
                grad_x.addcmul_(weighted, inside)  # straight-through inside the grid
            grad_p[:, g] = (grad * code).flatten(1).sum(dim=1) * scales[g]
            # d/ds of s * (clamp(round(x/s) + z) - z): round(x/s) - x/s inside the grid, the code outside.
            grad_s[g] = (weighted * code.sub_(v.mul_(inside))).sum()
        return grad_x, grad_p, grad_s, None, None, None


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of a probability matrix."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)


class SoftGroupMixer(nn.Module):
    """Learnable per-timestep logits and log-scales for one TimestepActQuantizer."""

    def __init__(
        self,
        quantizer: TimestepActQuantizer,
        row_of: torch.Tensor,
        init_rows: torch.Tensor,
        init_logit: float,
    ) -> None:
        super().__init__()
        num_rows, groups = len(init_rows), quantizer.num_groups
        device = quantizer.scale.device
        logits = torch.zeros(num_rows, groups, device=device)
        logits[torch.arange(num_rows), init_rows.to(device)] = init_logit
        self.logits = nn.Parameter(logits)
        self.log_scale = nn.Parameter(torch.zeros(groups, device=device))
        self.register_buffer("base_scale", quantizer.scale.detach().float().clone())
        self.register_buffer("row_of", row_of.to(device).long())
        self.register_buffer("init_rows", init_rows.to(device).long())
        self.last_entropy: torch.Tensor | None = None

    def scales(self) -> torch.Tensor:
        return self.base_scale * self.log_scale.exp()

    def probs(self, rows: torch.Tensor) -> torch.Tensor:
        return self.logits[rows].softmax(dim=-1)

    def row_entropy(self) -> torch.Tensor:
        """H(sigma) of every row, without gradient."""
        with torch.no_grad():
            return entropy(self.logits.softmax(dim=-1))

    def forward(self, quantizer: TimestepActQuantizer, x: torch.Tensor) -> torch.Tensor:
        rows = self.row_of[quantizer.context.per_sample(x.shape[0])]
        probs = self.probs(rows)  # (B, G)
        self.last_entropy = entropy(probs).mean()
        zero_points = quantizer.zero_point.float()
        out = _MixedFakeQuant.apply(
            x.float(), probs, self.scales(), zero_points, quantizer.qmin, quantizer.qmax
        )
        return out.to(x.dtype)

    @torch.no_grad()
    def harden(self, quantizer: TimestepActQuantizer, seen_rows: torch.Tensor) -> None:
        """Write g(t) = argmax sigma(t) and the learned scales into `quantizer`.

        Rows the search never saw data for had no gradient: they keep their starting group.
        """
        rows = self.logits.argmax(dim=-1)
        rows = torch.where(seen_rows.to(rows.device), rows, self.init_rows)
        quantizer.group_map.copy_(rows[self.row_of])
        quantizer.scale.copy_(self.scales().clamp_min(1e-8).to(quantizer.scale.dtype))


def attach(quantizer: TimestepActQuantizer, mixer: SoftGroupMixer) -> None:
    # object.__setattr__: an nn.Module attribute would become a submodule and land in the state dict.
    object.__setattr__(quantizer, "group_mixer", mixer)


def detach(quantizer: TimestepActQuantizer) -> None:
    quantizer.__dict__.pop("group_mixer", None)
