"""The integer grid shared by every quantizer module: bit width, signedness, and its range."""

from __future__ import annotations

from diffusers_ptq.primitives import qrange


class GridMixin:
    """`qmin`/`qmax` of a quantizer with `bits` and `symmetric` attributes."""

    bits: int
    symmetric: bool

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]
