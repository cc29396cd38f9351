"""Int8Conv2d: per-sample input codes in NHWC, int8 im2col, an int8 GEMM, dequantised into NCHW.

On CPU the GEMM is oneDNN's: the conv is im2col + that GEMM rather than oneDNN's own int8 convolution
(`torch.ops.onednn.qconv_pointwise`), which was not faster in an earlier comparison (its timings had no
committed result file and are not quoted). With kernel='triton' (CUDA) a kxk conv (k > 1) runs as a Triton
implicit GEMM with the dequantisation fused (`triton_conv`); a 1x1 conv needs no im2col, so it stays on
`torch._int_mm` (cuBLASLt).
"""

from __future__ import annotations

import torch

from diffusers_ptq.integer.activation import quantize_nhwc
from diffusers_ptq.integer.base import IntegerLayer
from diffusers_ptq.integer.gemm import conv_output_size, im2col_nhwc
from diffusers_ptq.integer.triton_conv import conv2d_int8, supports_groups
from diffusers_ptq.nn.layers import QuantConv2d


class Int8Conv2d(IntegerLayer):
    """Integer execution of a calibrated `QuantConv2d`, shortcut-split included."""

    def __init__(self, layer: QuantConv2d, kernel: str = "int_mm", low_memory: bool = False) -> None:
        """Build from a calibrated QuantConv2d; raises UnsupportedLayerError saying why it cannot."""
        super().__init__()
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride = tuple(layer.kernel_size), tuple(layer.stride)
        self.padding, self.dilation = tuple(layer.padding), tuple(layer.dilation)
        self.padding_mode = layer.padding_mode
        self.implicit_gemm = kernel == "triton" and self.kernel_size != (1, 1)
        ph, pw = self.padding
        self._pad = (pw, pw, ph, ph)
        # (O, C, kh, kw) -> (O, kh * kw * C): the K order of the NHWC im2col columns.
        self._init_parts(
            layer, kernel, low_memory, lambda codes: codes.permute(0, 2, 3, 1).reshape(codes.shape[0], -1)
        )
        # Per-group weight scales the Triton kernel cannot tile (a group across taps) take the im2col path.
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.implicit_gemm = self.implicit_gemm and all(
            supports_groups(w.group_size, w.in_features // taps) for w in self.weights
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        out = None
        for i, in_slice in enumerate(self.in_slices):
            xi = x[:, in_slice]
            scale, zero_point = self.part_qparams(i, xi)
            bounds = (self.code_lo, self.code_hi, self.code_dtype)
            codes = quantize_nhwc(xi, scale, zero_point, *bounds, self._pad, self.padding_mode)
            if self.implicit_gemm:
                out = self._implicit_gemm(i, codes, scale, zero_point, out, x.dtype)
                continue
            cols, _, _ = im2col_nhwc(codes, self.kernel_size, self.stride, self.dilation)
            y = self.part_output(i, cols, scale, zero_point)
            out = y if out is None else out.add_(y)
        # Output size from the padded codes (B, H', W', C), whichever kernel ran.
        oh, ow = (
            conv_output_size(size, k, st, d)
            for size, k, st, d in zip(codes.shape[1:3], self.kernel_size, self.stride, self.dilation)
        )
        # The GEMM's rows are NHWC: returned as an NCHW tensor in channels_last memory format, no copy.
        return out.view(b, oh, ow, self.out_channels).permute(0, 3, 1, 2).to(x.dtype)

    def _implicit_gemm(self, i, codes, scale, zero_point, out, dtype) -> torch.Tensor:
        # One part writes the output dtype directly; a split conv sums its parts in fp32 first.
        out_dtype = dtype if len(self.in_slices) == 1 else torch.float32
        args = (self.kernel_size, self.stride, self.dilation, scale, zero_point)
        bias = self.bias if i == 0 else None
        rows = self.bias_rows(codes.shape[0]) if i == 0 else None
        if rows is not None:  # per-sample bias: the table's row plus the layer's bias, added in the epilogue
            bias = (rows if bias is None else rows + bias[None, :]).contiguous()
        return conv2d_int8(codes, self.weights[i], *args, bias, out=out, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        split = "" if len(self.in_slices) == 1 else f", split at {self.in_slices[0].stop}"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, W{self.weight_bits}A{self.act_bits}, kernel={self.kernel}{split}"
        )
