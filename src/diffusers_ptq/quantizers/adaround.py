"""AdaRound (Nagel et al., 2020): learn whether each weight rounds up or down on its quantizer's grid.

W_q = s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z), with the rectified sigmoid
h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, and V initialised so that
h(V) is the fractional part of W / s (the soft quantizer then starts at the float weight). The grid
(scale, zero-point, bits; per channel or per group) is the wrapped WeightQuantizer's and is not changed.
When training ends the rounding is frozen to h = [V >= 0] (a bool mask; V is dropped) and finally baked
into the float weight, so the plain WeightQuantizer's round-to-nearest reproduces the learned integer codes
exactly and serialization stores plain integers.

Training runs the soft quantizer and the regulariser thousands of times per unit on weights that do not
change, so both are one autograd node each (`_SoftQuant`, `_Regulariser`): floor(W / s) is computed once
per weight and grid while the unit trains, and each backward is the closed-form gradient in V of the same
elementwise formula.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.quantizers.grid import GridMixin
from diffusers_ptq.quantizers.weight import WeightQuantizer

ZETA = 1.1
GAMMA = -0.1
MODES = ("soft", "hard", "frozen")


def _inside(x: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
    """1.0 where `x` equals its clip `clipped` (autograd's clamp passes the gradient there, the bounds
    included), else 0.0. Overwrites `x`. Arithmetic, not a bool mask: masked_fill / where over a weight-sized
    tensor measured ~10x slower on the CPU than the elementwise arithmetic around them."""
    return x.sub_(clipped).abs_().sign_().neg_().add_(1)


def _rectified(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h(V), dh/dV), fresh tensors; dh/dV is zero where the clip is active. Written in place: on a
    weight-sized V an allocation costs about as much as the arithmetic."""
    soft = torch.sigmoid(v)
    dh = torch.rsub(soft, 1).mul_(soft).mul_(ZETA - GAMMA)
    soft.mul_(ZETA - GAMMA).add_(GAMMA)
    h = soft.clamp(0.0, 1.0)
    return h, dh.mul_(_inside(soft, h))


class _SoftQuant(torch.autograd.Function):
    """s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z) with its gradient in V (W and the grid fixed);
    h = h(V) and dh = dh/dV are given (computed once per step for this and the regulariser)."""

    @staticmethod
    def forward(ctx, v, h, dh, floor, scale, zero_point, qmin: int, qmax: int):
        x = torch.add(floor, h).add_(zero_point)  # floor(W / s) + h + z, summed in the formula's order
        codes = x.clamp(qmin, qmax)
        ctx.save_for_backward(torch.mul(dh, scale).mul_(_inside(x, codes)))
        return codes.sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None, None, None, None, None


class _Regulariser(torch.autograd.Function):
    """sum(1 - |2 h(V) - 1|^beta), its gradient in V computed with the value (one power, not two)."""

    @staticmethod
    def forward(ctx, v, h, dh, beta: float):
        u = torch.mul(h, 2).sub_(1)
        a = u.abs()
        power = a.pow(beta)
        value = u.numel() - power.sum()
        # d|u|^beta/du = beta sign(u) |u|^beta / |u|; zero at u = 0, where |u|^beta is (beta > 0).
        power.div_(a.clamp_min_(torch.finfo(a.dtype).tiny))
        ctx.save_for_backward(torch.mul(dh, power).mul_(u.sign_()).mul_(-2 * beta))
        return value

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None


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
        self._floor: tuple[tuple, torch.Tensor] | None = None  # (what it was computed from, floor(W / s))
        self._rect: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (V's version, h, dh/dV)

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
        if self.v is None:
            raise RuntimeError("regulariser of a frozen AdaRound quantizer: V was released")
        h, dh = self._rectified()
        v = self.v
        if part is not None:
            v, h, dh = (t.reshape(-1)[part.start : part.stop] for t in (v, h, dh))
        return _Regulariser.apply(v, h, dh, float(beta))

    def _rectified(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(h(V), dh/dV) without autograd, kept until V changes: the soft forward and the regulariser of a
        training step share them."""
        key = (self.v.data_ptr(), self.v._version)
        if self._rect is None or self._rect[0] != key:
            with torch.no_grad():
                self._rect = (key, *_rectified(self.v))
        return self._rect[1], self._rect[2]

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

    def floor(self, weight: torch.Tensor) -> torch.Tensor:
        """floor(W / s), kept while training (soft mode) and the weight and grid are unchanged, in place or
        rebound. The weight and scale are held in the key, so a freed one's address cannot be reused by
        another under it; the copy is released at `freeze` (one unit's layers hold one at a time)."""
        scale = self.base.scale
        base = weight if weight._base is None else weight._base
        key = (base, weight.data_ptr(), weight.shape, weight._version, scale, scale._version)
        held = self._floor
        if held is None or not all(a is b if torch.is_tensor(a) else a == b for a, b in zip(held[0], key)):
            with torch.no_grad():
                held = self._floor = (key, self._scaled(weight).floor())
        return held[1]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        scale, zero_point = self.base.qparams(weight)
        if self.mode == "soft":
            h, dh = self._rectified()
            floor = self.floor(weight)
            out = _SoftQuant.apply(self.v, h, dh, floor, scale, zero_point, self.qmin, self.qmax)
            return out.to(weight.dtype)
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
        self._floor = self._rect = None  # weight-sized: a whole model's frozen quantizers would hold a copy
        self.mode = "frozen"

    @torch.no_grad()
    def baked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight on the grid whose round-to-nearest codes are this quantizer's codes."""
        scale, zero_point = self.base.qparams(weight)
        return ((self.codes(weight) - zero_point) * scale).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"
