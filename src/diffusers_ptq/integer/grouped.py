"""Per-group weight scales on the im2col / Linear path: the group scales applied inside the reduction.

With weight codes w, scales s[n, g] and zero points z_w[n, g] per group g of `group_size` consecutive
columns of K (`quantizers.groups`), the layer's dot product over K is

    sum_k a_k s[n, g(k)] (w_nk - z_w[n, g(k)]) = a . W_n,   W = the group-dequantised weight,

so one fp32 GEMM of the integer activation codes with W applies every group's scale inside the sum (equal
to exact per-group integer sums, each scaled, up to float rounding). W is rebuilt from the stored codes on
each call, so only the packed codes stay resident. On CPU that makes a per-group layer about as fast as
its fake-quant forward, several times slower than the per-channel int8 GEMM (W4A8 320 -> 320 3x3 conv,
one thread: benchmarks/results/group_conv_speed.json): group scales buy accuracy and a small checkpoint
there, not speed. (One exact int32 GEMM per group, scaled afterwards, was tried first and was about 5x
slower than fake quant; it is not kept.) The Triton conv sums each group exactly in its K loop
(`triton_conv.py`).
"""

from __future__ import annotations

import torch


def dequantize_groups(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """fp32 (N, K) weight s[n, g] (w - z_w[n, g]) of (N, K) integer codes and (N, G) scales/zero points."""
    n, k = codes.shape
    groups = scale.shape[1]
    if groups * group_size != k:
        raise ValueError(f"{groups} groups of {group_size} do not cover K = {k}")
    w = codes.float().view(n, groups, group_size)
    if zero_point is not None:
        w = w - zero_point.unsqueeze(-1)
    return (w * scale.unsqueeze(-1)).view(n, k)


def grouped_matmul(
    a: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """fp32 (M, N) sum_g s[n, g] (a_g . w_g - z_w[n, g] sum_(k in g) a_k) of (M, K) activation codes."""
    return a.float() @ dequantize_groups(codes, scale, zero_point, group_size).t()
