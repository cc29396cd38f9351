"""Shared part of the integer Linear and Conv2d: operands built from a fake-quant layer, and the GEMM.

A layer has one part, or two for a shortcut-split conv (each input-channel half with its own activation
quantizer and its own per-channel or per-group weight grid). Each part's integer GEMM is dequantised on its
own and the parts are added, like the fake-quant conv adds the two halves' products in one float sum. The
activation quantizers are the fake-quant layer's own modules (the same scale tables and timestep -> group
map), so the two paths share every quantization parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.integer import onednn
from diffusers_ptq.integer.activation import code_range, sample_qparams
from diffusers_ptq.integer.codes import unsupported_reason, weight_codes, weight_parts
from diffusers_ptq.integer.weight import IntegerWeight
from diffusers_ptq.nn.layers import QuantLayerMixin


class UnsupportedLayerError(ValueError):
    """Raised when an integer module is built from a layer that cannot run on int8; says why."""


class IntegerLayer(nn.Module):
    """Parts (activation quantizer, IntegerWeight, input-channel slice) and their dequantised GEMMs."""

    weights: nn.ModuleList
    act_quantizers: nn.ModuleList
    bias: torch.Tensor | None

    def _init_parts(self, layer: QuantLayerMixin, kernel: str, low_memory: bool, reorder) -> None:
        """Build the parts of `layer`; `reorder` maps a weight slice to its (N, K) GEMM layout."""
        reason = unsupported_reason(layer)
        if reason is not None:
            raise UnsupportedLayerError(reason)
        acts = list(layer.act_quantizers)
        self.kernel = kernel
        self.act_bits = acts[0].bits
        self.weight_bits = layer.weight_bits
        self.code_lo, self.code_hi, self.code_dtype = code_range(self.act_bits, unsigned=kernel == "onednn")
        weights, self.in_slices = [], []
        for quantizer, w, in_slice in weight_parts(layer):
            codes, scale, zero_point = weight_codes(quantizer, w)
            weights.append(
                IntegerWeight(
                    reorder(codes),
                    scale,
                    zero_point,
                    quantizer.bits,
                    kernel,
                    act_max_code=self.code_hi - self.code_lo,
                    low_memory=low_memory,
                )
            )
            self.in_slices.append(in_slice)
        self.weights = nn.ModuleList(weights)
        self.act_quantizers = nn.ModuleList(acts)
        # A buffer: the integer path is inference-only, and out= kernels refuse tensors that need grad.
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        # The fake-quant layer's own per-timestep-group bias table (bias_correction='layer'), or None.
        self.bias_table = layer.bias_table

    def bias_rows(self, batch: int) -> torch.Tensor | None:
        """(batch, N) fp32 bias-table rows of each sample, or None without an active table."""
        table = self.bias_table
        return None if table is None or not table.enabled else table.rows(batch)

    def part_qparams(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (scale, zero point in the kernel's code origin) of part `i`'s input `x`."""
        return sample_qparams(self.act_quantizers[i], x, self.code_lo)

    def part_output(
        self, i: int, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        """Dequantised fp32 (M, N) output of part `i` for (M, K) codes, M = B x rows; bias in part 0.

        s_a s_w (a.w - z c) [+ bias] [+ table[g(sample)]] [- s_a s_w z_w sum_k a_k]   (see IntegerWeight
        for c); the bias table's row is each sample's, by its timestep group.

        oneDNN computes s_a s_w (a - z).w + bias itself; an affine weight grid then still needs
        - s_a s_w z_w sum_k (a_k - z).
        """
        w: IntegerWeight = self.weights[i]
        b, n = scale.shape[0], w.out_features
        bias = self.bias if i == 0 else None
        rows = self.bias_rows(b) if i == 0 else None
        if w.group_size is not None:
            # s_a (sum_g s_wg (a_g.w_g - z_wg sum a_g) - z c), c = sum_g s_wg c_g: any kernel's code origin.
            acc = w.group_matmul(codes).view(b, -1, n)
            y = (acc - zero_point[:, None, None] * w.correction) * scale[:, None, None]
            if bias is not None:
                y = y + bias
            if rows is not None:
                y = y + rows[:, None, :]
            return y.view(-1, n)
        if w.kernel == "onednn":
            y = onednn.int8_linear(codes, scale, zero_point, bias, w.handle, n)
            if rows is not None:
                y.view(b, -1, n).add_(rows[:, None, :])
        else:
            mult = scale[:, None] * w.scale[None, :]
            const = -(mult * zero_point[:, None]) * w.correction[None, :]
            if bias is not None:
                const = const + bias[None, :]
            if rows is not None:
                const = const + rows
            acc = w.int_matmul(codes).view(b, -1, n)
            y = torch.addcmul(const[:, None, :], acc, mult[:, None, :]).view(-1, n)
        if w.asymmetric:
            rows = (scale[:, None] * w.scale[None, :]) * w.zero_point[None, :]
            sums = codes.sum(dim=1, dtype=torch.float32).view(b, -1, 1)
            if w.kernel == "onednn":
                sums = sums - w.in_features * zero_point[:, None, None]
            y.view(b, -1, n).addcmul_(rows[:, None, :], sums, value=-1)
        return y

    def weight_nbytes(self) -> tuple[int, int]:
        """(bytes of the stored weight codes, bytes of the per-channel scale/zero-point/correction)."""
        codes = constants = 0
        for w in self.weights:
            c, k = w.nbytes()
            codes, constants = codes + c, constants + k
        return codes, constants

    def cache_nbytes(self) -> int:
        """Bytes of the oneDNN prepacked weights kept between calls (see IntegerWeight.cache_nbytes)."""
        return sum(w.cache_nbytes() for w in self.weights)

    @property
    def split_for_saturation(self) -> bool:
        return any(w.split for w in self.weights)
