"""Packing of integer weight codes: int8/uint8 for 5-8 bits, two 4-bit codes per byte for <= 4 bits."""

from __future__ import annotations

import pytest
import torch

from diffusers_ptq.primitives import qrange
from diffusers_ptq.serialization.packing import pack_codes, packed_shape, storage_dtype, unpack_codes

SHAPES = [(8, 5), (6, 3, 3, 3), (4, 7, 1, 1), (3, 2)]


def _codes(shape: tuple[int, ...], bits: int, symmetric: bool, seed: int = 0) -> torch.Tensor:
    qmin, qmax = qrange(bits, symmetric)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(qmin, qmax + 1, shape, generator=gen).float()
    # Both ends of the grid must survive the round trip.
    codes.view(-1)[0], codes.view(-1)[-1] = qmin, qmax
    return codes


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_exact(bits, symmetric, shape):
    qmin, _ = qrange(bits, symmetric)
    codes = _codes(shape, bits, symmetric, seed=bits)
    packed = pack_codes(codes, bits, qmin)
    assert packed.dtype == storage_dtype(bits, qmin)
    assert tuple(packed.shape) == packed_shape(shape, bits)
    restored = unpack_codes(packed, bits, qmin, shape)
    assert restored.dtype == torch.float32
    assert torch.equal(restored, codes)


@pytest.mark.parametrize(
    ("bits", "symmetric", "dtype"),
    [(8, True, torch.int8), (8, False, torch.uint8), (5, True, torch.int8), (6, False, torch.uint8)],
)
def test_five_to_eight_bits_take_one_byte_per_code_in_the_weight_shape(bits, symmetric, dtype):
    qmin, _ = qrange(bits, symmetric)
    packed = pack_codes(_codes((16, 4, 3, 3), bits, symmetric), bits, qmin)
    assert packed.dtype == dtype and tuple(packed.shape) == (16, 4, 3, 3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_four_bits_and_fewer_pack_two_codes_per_byte(bits):
    codes = _codes((10, 4, 3, 3), bits, True)
    packed = pack_codes(codes, bits, qrange(bits, True)[0])
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (10, 18)  # 36 codes per output channel -> 18 bytes
    assert packed.numel() * 2 == codes.numel()


def test_nibble_order_is_low_first_and_odd_rows_are_padded():
    codes = torch.tensor([[-8.0, 7.0, 0.0], [1.0, -1.0, 2.0]])  # signed 4-bit: offset = code + 8
    packed = pack_codes(codes, 4, -8)
    assert packed.tolist() == [[0x00 | (15 << 4), 8], [9 | (7 << 4), 10]]
    assert torch.equal(unpack_codes(packed, 4, -8, (2, 3)), codes)


def test_codes_outside_the_grid_or_fractional_are_rejected():
    with pytest.raises(ValueError, match=r"outside the 4-bit grid \[-8, 7\]"):
        pack_codes(torch.tensor([[8.0, 0.0]]), 4, -8)
    with pytest.raises(ValueError, match="integer-valued"):
        pack_codes(torch.tensor([[0.5, 0.0]]), 8, -128)
    with pytest.raises(ValueError, match=r"bits=9 cannot be packed"):
        pack_codes(torch.zeros(2, 2), 9, 0)


def test_unpack_names_the_expected_dtype_and_shape():
    packed = pack_codes(torch.zeros(4, 6), 4, -8)
    with pytest.raises(ValueError, match=r"torch.uint8 of shape \[4, 4\], got torch.uint8 of shape \[4, 3\]"):
        unpack_codes(packed, 4, -8, (4, 8))
    with pytest.raises(ValueError, match=r"torch\.int8"):
        unpack_codes(packed.to(torch.uint8).reshape(4, 3), 8, -128, (4, 3))
