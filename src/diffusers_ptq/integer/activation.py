"""Integer codes of a layer input, with the per-sample timestep-group (scale, zero-point).

The codes are exactly the fake quantizer's: clamp(round(x / s) + z, qmin, qmax), computed with the same
float division and round-half-to-even, then moved to the kernel's integer origin: [0, 2^b - 1] (uint8) for
oneDNN, [-2^(b-1), 2^(b-1) - 1] (int8) for `torch._int_mm`. The zero point moves with them, so the
dequantised value s * (code - z) is unchanged.

In eager mode the float steps run in chunks through a small scratch buffer: a fresh fp32 temporary of an
SD-sized activation (tens of MB) is page-faulted in on every call, which makes it slower to fill than a
reused one (no committed timing). Under `torch.compile` the one-shot form is used and inductor fuses it
into one loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusers_ptq.quantizers import TimestepActQuantizer

CHUNK = 1 << 18  # elements per chunk: a 1 MiB fp32 scratch, below malloc's mmap threshold


def code_range(bits: int, unsigned: bool) -> tuple[int, int, torch.dtype]:
    """(lo, hi, dtype) of `bits`-bit activation codes in the kernel's origin."""
    if unsigned:
        return 0, 2**bits - 1, torch.uint8
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.int8


def sample_qparams(
    quantizer: TimestepActQuantizer, x: torch.Tensor, lo: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (scale, zero_point) of `x` (leading dim = samples), the zero point in origin `lo`."""
    g = quantizer.groups_for(x)
    scale = quantizer.scale[g]
    zero_point = quantizer.zero_point[g] + float(lo - quantizer.qmin)
    return scale, zero_point


def quantize_flat(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: int, hi: int, dtype: torch.dtype
) -> torch.Tensor:
    """Codes of the (B, R) `x` with per-sample `scale`/`zero_point` of shape (B,)."""
    x = x.detach()
    b, r = x.shape
    if torch.compiler.is_compiling() or b * r <= CHUNK:
        q = torch.div(x.float(), scale[:, None])
        return q.round_().add_(zero_point[:, None]).clamp_(lo, hi).to(dtype)
    out = torch.empty((b, r), dtype=dtype, device=x.device)
    scratch = torch.empty(CHUNK, dtype=torch.float32, device=x.device)
    rows, cols = max(1, CHUNK // r), min(r, CHUNK)
    for b0 in range(0, b, rows):
        b1 = min(b, b0 + rows)
        for c0 in range(0, r, cols):
            c1 = min(r, c0 + cols)
            tmp = scratch[: (b1 - b0) * (c1 - c0)].view(b1 - b0, c1 - c0)
            torch.div(x[b0:b1, c0:c1], scale[b0:b1, None], out=tmp)
            tmp.round_().add_(zero_point[b0:b1, None]).clamp_(lo, hi)
            out[b0:b1, c0:c1].copy_(tmp)
    return out


def quantize_rows(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: int, hi: int, dtype: torch.dtype
) -> torch.Tensor:
    """Codes of `x` (B, ..., K), contiguous, with per-sample `scale`/`zero_point` of shape (B,)."""
    flat = quantize_flat(x.reshape(x.shape[0], -1), scale, zero_point, lo, hi, dtype)
    return flat.view(x.shape)


def quantize_nhwc(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    lo: int,
    hi: int,
    dtype: torch.dtype,
    pad: tuple[int, int, int, int],
    padding_mode: str,
) -> torch.Tensor:
    """Codes of the NCHW `x`, padded like the conv pads it and laid out NHWC (B, H + pads, W + pads, C).

    Zero padding is the zero point itself (the code of 0.0, which the float conv pads with after fake
    quantization). Other padding modes pad the float input (they commute with elementwise quantization).
    The input is read in its memory order: a channels_last input needs no transpose.
    """
    if any(pad) and (padding_mode != "zeros" or torch.compiler.is_compiling()):
        # Compiled, padding the float input (0.0 quantizes to the zero point) fuses into one loop with the
        # quantization; the eager form below, a zero-point canvas with the codes copied in, becomes a
        # slow scatter under inductor.
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x, pad = F.pad(x, pad, mode=mode), (0, 0, 0, 0)
    b, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    if nhwc.is_contiguous():
        codes = quantize_flat(nhwc.reshape(b, -1), scale, zero_point, lo, hi, dtype).view(b, h, w, c)
    else:
        codes = quantize_flat(x.reshape(b, -1), scale, zero_point, lo, hi, dtype).view(b, c, h, w)
        codes = codes.permute(0, 2, 3, 1)
    if not any(pad):
        return codes.contiguous()
    left, right, top, bottom = pad
    out = zero_point.to(dtype).view(b, 1, 1, 1).expand(b, h + top + bottom, w + left + right, c).clone()
    out[:, top : top + h, left : left + w].copy_(codes)
    return out
