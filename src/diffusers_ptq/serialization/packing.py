"""Pure packing of integer weight codes for checkpoints.

Codes of 5-8 bits are stored one per byte: `int8` for a signed (symmetric) grid, `uint8` for an unsigned
(affine) grid, in the weight's own shape. Codes of 2-4 bits are stored two per byte: each code is shifted to
an unsigned offset `code - qmin` in [0, 15] and the row (one output channel) is packed low nibble first,
giving a `uint8` tensor of shape (C_out, ceil(K / 2)) with K the values per output channel. A row of odd
length is padded with one zero nibble; the original shape is needed to unpack.

This is the library's only 4-bit convention: the int4 GEMM weights of `integer/` (`integer/packing.py` and
the Triton kernel) store their codes the same way, with qmin = -8.
"""

from __future__ import annotations

import math

import torch

PACKED_NIBBLE_MAX_BITS = 4
MAX_BITS = 8
MIN_BITS = 2


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; expected an integer in [{MIN_BITS}, {MAX_BITS}]")


def storage_dtype(bits: int, qmin: int) -> torch.dtype:
    """dtype of the packed tensor for `bits`-bit codes whose grid starts at `qmin`."""
    _check_bits(bits)
    if bits <= PACKED_NIBBLE_MAX_BITS or qmin >= 0:
        return torch.uint8
    return torch.int8


def packed_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """Shape of the packed tensor for a weight of `shape` (dim 0 = output channels)."""
    _check_bits(bits)
    if bits > PACKED_NIBBLE_MAX_BITS:
        return tuple(shape)
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return (rows, (per_row + 1) // 2)


def pack_nibbles(offsets: torch.Tensor) -> torch.Tensor:
    """(rows, K) unsigned offsets in [0, 15] -> (rows, ceil(K / 2)) uint8, low nibble first."""
    offsets = offsets.to(torch.uint8)
    if offsets.shape[1] % 2:
        offsets = torch.nn.functional.pad(offsets, (0, 1))
    return offsets[:, 0::2] | (offsets[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, per_row: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (rows, per_row) uint8 offsets in [0, 15]."""
    offsets = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return offsets[:, :per_row]


def pack_codes(codes: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Pack integer-valued `codes` (any dtype) of a `bits`-bit grid starting at `qmin`.

    Raises ValueError if a code lies outside [qmin, qmin + 2**bits - 1] or is not an integer.
    """
    _check_bits(bits)
    qmax = qmin + 2**bits - 1
    if codes.numel():
        lo, hi = float(codes.min()), float(codes.max())
        if lo < qmin or hi > qmax:
            raise ValueError(f"codes span [{lo:g}, {hi:g}], outside the {bits}-bit grid [{qmin}, {qmax}]")
        if codes.is_floating_point() and not torch.equal(codes, codes.round()):
            raise ValueError("codes must be integer-valued")
    if bits > PACKED_NIBBLE_MAX_BITS:
        # Via int16: a float -> uint8 conversion of values above 127 is exact, but going through a
        # wider integer keeps the conversion well-defined for every input dtype.
        return codes.to(torch.int16).to(storage_dtype(bits, qmin))
    rows = codes.shape[0] if codes.ndim else 1
    return pack_nibbles((codes.to(torch.int16) - qmin).to(torch.uint8).reshape(rows, -1))


def unpack_codes(packed: torch.Tensor, bits: int, qmin: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_codes`: float32 codes of `shape`.

    Raises ValueError if `packed` does not have the dtype and shape that `bits` and `shape` imply.
    """
    _check_bits(bits)
    shape = tuple(int(s) for s in shape)
    expected_dtype, expected_shape = storage_dtype(bits, qmin), packed_shape(shape, bits)
    if packed.dtype != expected_dtype or tuple(packed.shape) != expected_shape:
        raise ValueError(
            f"packed {bits}-bit codes must be {expected_dtype} of shape {list(expected_shape)}, "
            f"got {packed.dtype} of shape {list(packed.shape)}"
        )
    if bits > PACKED_NIBBLE_MAX_BITS:
        return packed.to(torch.float32)
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return (unpack_nibbles(packed, per_row).to(torch.float32) + qmin).reshape(shape)
