"""Signed 4-bit weight codes, two per byte, unpacked on the fly to int8 for the GEMM.

The checkpoint's convention (`serialization/packing.py`), with the grid [-8, 7]: each code is stored as the
offset `code + 8` in [0, 15], per output row, low nibble first, in a uint8 tensor of shape (N, ceil(K / 2));
an odd row is padded with a zero nibble. Unpacking subtracts the offset again; the Triton conv kernel reads
the nibbles the same way.
"""

from __future__ import annotations

import torch

from diffusers_ptq.serialization.packing import pack_codes, unpack_nibbles

NIBBLE_MIN, NIBBLE_MAX = -8, 7


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) integer codes in [-8, 7] -> (N, ceil(K / 2)) uint8."""
    if codes.ndim != 2:
        raise ValueError(f"pack_int4 expects (N, K) codes, got shape {tuple(codes.shape)}")
    return pack_codes(codes, 4, NIBBLE_MIN)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, K) int8 codes."""
    return unpack_nibbles(packed, k).to(torch.int8) + NIBBLE_MIN
