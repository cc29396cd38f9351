"""AdaRound (Nagel et al., 2020): learn whether each weight rounds up or down on its quantizer's grid.

W_q = s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z), with the rectified sigmoid
h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, and V initialised so that
h(V) is the fractional part of W / s (the soft quantizer then starts at the float weight). The grid
(scale, zero-point, bits; per channel or per group) is the wrapped WeightQuantizer's and is not changed.
When training ends the rounding is frozen to h = [V >= 0] (a bool mask; V is dropped) and finally baked
into the float weight, so the plain WeightQuantizer's round-to-nearest reproduces the learned integer codes
exactly and serialization stores plain integers.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.quantizers.grid import GridMixin
from diffusers_ptq.quantizers.weight import WeightQuantizer

ZETA = 1.1
GAMMA = -0.1
MODES = ("soft", "hard", "frozen")


class AdaRoundQuantizer(GridMixin, nn.Module):
    """Drop-in replacement of a WeightQuantizer (same grid) with learnable rounding.

    Modes: 'soft' (h(V) in [0, 1], differentiable in V), 'hard' (h = [V >= 0]), 'frozen' (the hard
    rounding stored as a bool mask and V released).
    """

    def __init__(self, base: WeightQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.bits = base.bits
        self.symmetric = base.symmetric
        self.enabled = base.enabled
        self.mode = "soft"
        rest = self._scaled(weight.detach())
        rest = rest - rest.floor()
        # h(V) = rest  <=>  sigmoid(V) = (rest - gamma) / (zeta - gamma); rest in [0, 1) keeps V finite.
        self.v: nn.Parameter | None = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.round_up: torch.Tensor | None = None

    def _scaled(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() / self.base.qparams(weight)[0]

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"AdaRound mode {mode!r} is invalid; expected one of {MODES}")
        if self.mode == "frozen" and mode != "frozen":
            raise RuntimeError("a frozen AdaRound quantizer has released V and cannot train again")
        self.mode = mode

    def h(self, part: range | None = None) -> torch.Tensor:
        """The rectified sigmoid h(V) in [0, 1] (of the flat elements `part` of V only, if given)."""
        if self.v is None:
            raise RuntimeError("h(V) of a frozen AdaRound quantizer: V was released")
        v = self.v if part is None else self.v.reshape(-1)[part.start : part.stop]
        return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def offsets(self) -> torch.Tensor:
        """What is added to floor(W / s): h(V) when soft, the 0/1 rounding otherwise."""
        if self.mode == "soft":
            return self.h()
        if self.mode == "hard":
            return (self.v >= 0).float()
        return self.round_up.float()

    def regulariser(self, beta: float, part: range | None = None) -> torch.Tensor:
        """sum(1 - |2 h(V) - 1|^beta): zero only when every h(V) is exactly 0 or 1. With `part`, the sum over
        those flat elements of V only (data-parallel ranks each add their part's gradient)."""
        return (1 - (2 * self.h(part) - 1).abs().pow(beta)).sum()

    def binary_fraction(self, tol: float = 1e-3) -> float:
        """Share of h(V) within `tol` of 0 or 1 (how far the rounding has converged)."""
        if self.v is None:
            return 1.0
        h = self.h().detach()
        return float(((h <= tol) | (h >= 1 - tol)).float().mean())

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats) of `weight` under the current rounding."""
        zero_point = self.base.qparams(weight)[1]
        x = self._scaled(weight).floor() + self.offsets()
        return torch.clamp(x + zero_point, self.qmin, self.qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        scale, zero_point = self.base.qparams(weight)
        return ((self.codes(weight) - zero_point) * scale).to(weight.dtype)

    @torch.no_grad()
    def freeze(self, round_up: torch.Tensor | None = None) -> None:
        """Fix the rounding to [V >= 0] (or to the given mask) and release V."""
        if round_up is None:
            if self.v is None:
                return
            round_up = self.v >= 0
        elif self.v is not None and round_up.shape != self.v.shape:
            raise ValueError(
                f"rounding mask of shape {tuple(round_up.shape)} for a weight of {tuple(self.v.shape)}"
            )
        self.round_up = round_up.to(device=self.base.scale.device, dtype=torch.bool)
        self.v = None
        self.mode = "frozen"

    @torch.no_grad()
    def baked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight on the grid whose round-to-nearest codes are this quantizer's codes."""
        scale, zero_point = self.base.qparams(weight)
        return ((self.codes(weight) - zero_point) * scale).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"
