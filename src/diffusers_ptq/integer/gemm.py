"""Portable int8 GEMM pieces: `torch._int_mm` with its shape rules met by padding, and int8 im2col.

im2col here works on NHWC integer codes with `as_strided` (F.unfold only takes floating tensors): the
columns are (B * OH * OW, kh * kw * C) with K ordered (kh, kw, C), so the weight is reordered to match. A
1x1 stride-1 conv needs no copy at all: the NHWC codes already are the GEMM's left operand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusers_ptq.integer.features import int_mm_padding


def int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) x int8 (N, K)^T -> int32 (M, N), zero-padding to what `torch._int_mm` accepts here.

    Zero rows and columns add nothing to the dot products, and the padding is sliced off again.
    """
    m, k = a.shape
    n = w.shape[0]
    pm, pk, pn = int_mm_padding(m, k, n, a.device.type)
    if (pm, pk) != (m, k):
        a = F.pad(a, (0, pk - k, 0, pm - m))
    if (pk, pn) != (k, n):
        w = F.pad(w, (0, pk - k, 0, pn - n))
    out = torch._int_mm(a, w.t())
    return out if (pm, pn) == (m, n) else out[:m, :n]


def conv_output_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Output length of a convolution over an already padded input of length `size`."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def im2col_nhwc(
    codes: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[torch.Tensor, int, int]:
    """(B, H, W, C) codes of a padded input -> ((B * OH * OW, kh * kw * C) columns, OH, OW).

    Under `torch.compile` the gather is an opaque op: inductor would otherwise fuse the quantization that
    produces the codes into it and recompute it for every column element (kh * kw times per input value
    for a 3x3 conv), which made compiled int8 slower than eager (BENCHMARKS.md §7).
    """
    _, h, w, _ = codes.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = conv_output_size(h, kh, sh, dh), conv_output_size(w, kw, sw, dw)
    copies = (kh, kw, sh, sw) != (1, 1, 1, 1)  # a 1x1 stride-1 conv's columns are a view of the codes
    gather = im2col_op if copies and torch.compiler.is_compiling() else _im2col
    return gather(codes, list(kernel), list(stride), list(dilation)), oh, ow


def _im2col(codes: torch.Tensor, kernel: list[int], stride: list[int], dilation: list[int]) -> torch.Tensor:
    codes = codes.contiguous()
    b, h, w, c = codes.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = conv_output_size(h, kh, sh, dh), conv_output_size(w, kw, sw, dw)
    s_b, s_h, s_w, s_c = codes.stride()
    view = codes.as_strided((b, oh, ow, kh, kw, c), (s_b, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
    return view.reshape(b * oh * ow, kh * kw * c)


@torch.library.custom_op("diffusers_ptq::im2col_nhwc", mutates_args=())
def im2col_op(codes: torch.Tensor, kernel: list[int], stride: list[int], dilation: list[int]) -> torch.Tensor:
    """`_im2col` as one opaque op for `torch.compile`; only for convs whose columns are a copy (an op's
    output may not alias its input)."""
    return _im2col(codes, kernel, stride, dilation)


@im2col_op.register_fake
def _(codes: torch.Tensor, kernel: list[int], stride: list[int], dilation: list[int]) -> torch.Tensor:
    b, h, w, c = codes.shape
    oh = conv_output_size(h, kernel[0], stride[0], dilation[0])
    ow = conv_output_size(w, kernel[1], stride[1], dilation[1])
    return codes.new_empty((b * oh * ow, kernel[0] * kernel[1] * c))
