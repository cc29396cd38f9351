"""Signed 4-bit weight codes, two per byte, unpacked on the fly to int8 for the GEMM.

Codes in [-8, 7] are stored per output row, low nibble first (two's complement), in a uint8 tensor of
shape (N, ceil(K / 2)); an odd row is padded with a zero nibble. Unpacking sign-extends each nibble with an
arithmetic shift, so no lookup table or float conversion is needed.
"""

from __future__ import annotations

import torch

NIBBLE_MIN, NIBBLE_MAX = -8, 7


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) integer codes in [-8, 7] -> (N, ceil(K / 2)) uint8."""
    if codes.ndim != 2:
        raise ValueError(f"pack_int4 expects (N, K) codes, got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < NIBBLE_MIN or int(codes.max()) > NIBBLE_MAX):
        raise ValueError(f"4-bit codes must lie in [{NIBBLE_MIN}, {NIBBLE_MAX}]")
    nibbles = codes.to(torch.int8).to(torch.uint8) & 0x0F  # two's complement nibble
    if nibbles.shape[1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, K) int8 codes."""
    low = (packed << 4).view(torch.int8) >> 4  # shift the low nibble up, then sign-extend it down
    high = packed.view(torch.int8) >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :k]
