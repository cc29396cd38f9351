"""One integer weight operand: int8 (or packed int4) codes, per-channel or per-group scales, and its GEMM.

Codes are stored centred, w = q - shift in [-2^(b-1), 2^(b-1) - 1] (shift = 0 for a symmetric grid,
2^(b-1) for an affine one), with the zero point moved by the same shift. With activation codes a and
zero point z (per sample), the layer's dot product is

    sum_k s_a (a_k - z) s_w (w_k - z_w) = s_a s_w (a.w - z c - z_w sum_k a_k),   c = sum_k w_k - K z_w,

so the GEMM runs on the raw codes and the zero points cost one per-channel constant `c` and, only for an
affine weight grid, the row sums of the activation codes. (oneDNN applies z itself, so `c` is only kept
for `torch._int_mm`.) Per-group weight scales (one per `group_size` columns of K) are applied inside the
reduction (`grouped.py`: an fp32 GEMM with the group-dequantised weight, whatever the kernel; oneDNN's
int8 GEMM and `torch._int_mm` take per-channel scales only); the Triton conv sums each group exactly.

Storage: 5-8 bits one int8 per weight, <= 4 bits two per byte (`nbytes`). oneDNN needs its own prepacked
int8 layout, built for the GEMM's row count: by default it is kept (`cache_nbytes`: resident on top of the
codes) and rebuilt only when the row count changes; with `low_memory` it is rebuilt on every call from the
stored codes (a reorder of the weight: small against a large GEMM, as costly as the GEMM itself for a tiny
one). A weight whose products could saturate oneDNN's int16 pair sums (8-bit codes x 8-bit activations on a
CPU without VNNI) is prepacked as two halves with |w| <= 64, w_lo and w - w_lo: two exact GEMMs on the same
activation codes, added (1.6x faster than one GEMM of twice the depth on [a | a] x [w_lo | w_hi], whose
concatenated input copy cost more than a GEMM: benchmarks/results/gemm_split.json), still int8 storage.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.integer import onednn
from diffusers_ptq.integer.features import onednn_exact
from diffusers_ptq.integer.gemm import int_mm
from diffusers_ptq.integer.grouped import grouped_matmul
from diffusers_ptq.integer.packing import pack_int4, unpack_int4

PACKED_MAX_BITS = 4
SAFE_HALF = 64  # |w| <= 64 keeps 2 * 255 * |w| within int16


class IntegerWeight(nn.Module):
    """Weight codes of one GEMM (N outputs x K inputs) and their dequantisation constants."""

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        kernel: str,
        act_max_code: int,
        low_memory: bool = False,
    ) -> None:
        super().__init__()
        if codes.ndim != 2:
            raise ValueError(f"weight codes must be (N, K), got shape {tuple(codes.shape)}")
        n, k = codes.shape
        codes = codes.to(torch.int32)
        self.bits, self.kernel, self.in_features, self.out_features = bits, kernel, k, n
        self.low_memory = low_memory
        self.asymmetric = bool(zero_point.ne(0).any())
        groups = scale.shape[1] if scale.ndim == 2 else 1
        # Per-group scales (N, G), G > 1: `grouped.py`'s GEMM (or the Triton conv's group sums) instead of
        # the int8 GEMM; `correction` then already carries the scales, sum_g s[n, g] c[n, g].
        self.group_size = k // groups if groups > 1 else None
        shape = (n, groups) if self.group_size else (n,)
        self.register_buffer("scale", scale.float().reshape(shape).clone())
        self.register_buffer("zero_point", zero_point.float().reshape(shape).clone())
        if self.group_size:
            sums = codes.view(n, groups, self.group_size).sum(dim=2).float()
            correction = (self.scale * (sums - self.group_size * self.zero_point)).sum(dim=1)
        else:
            correction = codes.sum(dim=1).float() - k * self.zero_point
        uses_onednn = kernel == "onednn" and self.group_size is None
        self.register_buffer("correction", None if uses_onednn else correction)
        max_abs = int(codes.abs().max()) if codes.numel() else 0
        self.split = uses_onednn and not onednn_exact(act_max_code, max_abs)
        int8_codes = codes.to(torch.int8)
        packed = bits <= PACKED_MAX_BITS
        self.register_buffer("packed", pack_int4(int8_codes) if packed else None)
        self.register_buffer("codes", None if packed else int8_codes)
        self._cache: tuple[int, tuple[torch.Tensor, ...]] | None = (
            None  # (rows, prepacked) of the last oneDNN call
        )
        self._zero_long = torch.zeros(n, dtype=torch.long)  # oneDNN's weight zero points (always 0 here)
        self.handle = onednn.register(self) if uses_onednn else 0

    def __getstate__(self) -> dict:
        # oneDNN's opaque prepacked tensor is a cache: a copy (deepcopy, pickle) rebuilds its own.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_cache": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.handle:
            self.handle = onednn.register(self)  # the copy's own handle: it must not reach the original

    def int8_codes(self) -> torch.Tensor:
        """The (N, K) int8 codes (unpacked if stored as nibbles)."""
        return unpack_int4(self.packed, self.in_features) if self.packed is not None else self.codes

    def onednn_weight(self, rows: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """(prepacked weights for `rows` GEMM rows: one, or two halves to add; weight scales, zero points)."""
        if self._cache is not None and self._cache[0] == rows:
            return self._cache[1], self.scale, self._zero_long
        codes = self.int8_codes()
        if self.split:
            low = codes.clamp(-SAFE_HALF, SAFE_HALF)
            packed = (onednn.prepack(low, rows), onednn.prepack(codes - low, rows))
        else:
            packed = (onednn.prepack(codes, rows),)
        self._cache = None if self.low_memory else (rows, packed)
        return packed, self.scale, self._zero_long

    def int_matmul(self, a: torch.Tensor) -> torch.Tensor:
        """Exact integer products a.w of the (M, K) int8 activation codes, as fp32 (M, N) (`int_mm`)."""
        return int_mm(a, self.int8_codes()).float()

    def group_matmul(self, a: torch.Tensor) -> torch.Tensor:
        """Per-group weights: sum_g s[n, g] (a_g.w_g - z_w[n, g] sum_(k in g) a_k), fp32 (M, N)."""
        zero_point = self.zero_point if self.asymmetric else None
        return grouped_matmul(a, self.int8_codes(), self.scale, zero_point, self.group_size)

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the stored codes, bytes of the per-channel scale/correction/zero point)."""
        stored = self.packed if self.packed is not None else self.codes
        constants = self.scale.numel() * 4
        if self.correction is not None:
            constants += self.correction.numel() * 4
        if self.asymmetric:
            constants += self.zero_point.numel() * 4
        return stored.numel() * stored.element_size(), constants

    def cache_nbytes(self) -> int:
        """Bytes of the oneDNN prepacked weight kept between calls once it runs (0 with `low_memory`)."""
        if self.handle == 0 or self.low_memory:
            return 0
        return (2 if self.split else 1) * self.out_features * self.in_features

    def extra_repr(self) -> str:
        storage = "packed int4" if self.packed is not None else "int8"
        split = ", split in two exact halves" if self.split else ""
        if self.group_size:
            split += f", group_size={self.group_size}"
        return (
            f"out={self.out_features}, in={self.in_features}, bits={self.bits}, {storage}, "
            f"kernel={self.kernel}{split}"
        )
