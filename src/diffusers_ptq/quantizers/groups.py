"""Group-wise weight scales: one column layout shared by fake quant, the integer kernels and checkpoints.

A weight is viewed as (C_out, K). For a convolution, K runs over (kh, kw, C_in), channels fastest: the column
order of the integer kernels (the NHWC im2col of `integer/gemm.py` and the Triton implicit GEMM), so a group
is a contiguous run of the GEMM's reduction and its scale can be applied inside it. Group g holds columns
[g * group_size, (g + 1) * group_size) of that order; with group_size dividing C_in (every power-of-two group
size that divides K of a 3x3 conv does) a group is `group_size` consecutive input channels at one kernel tap.
A Linear's K is its input features.

Qparams come in three shapes, told apart by their dimensions: (1,) per tensor, (C_out,) per output channel,
(C_out, G) per group with G = K / group_size. `expand_qparam` broadcasts any of them against the weight.
A layer's group size is `layer_group_size` of the configured one; checkpoints record it per quantizer.
"""

from __future__ import annotations

import math

import torch


def kernel_columns(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, K) view of `weight` with K in the integer kernels' order: (kh, kw, C_in) for a conv."""
    if weight.ndim <= 2:
        return weight.reshape(weight.shape[0], -1)
    return weight.movedim(1, -1).reshape(weight.shape[0], -1)


def from_kernel_columns(columns: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `kernel_columns`: the (C_out, K) kernel-order matrix back in a weight of `shape`."""
    shape = tuple(shape)
    if len(shape) <= 2:
        return columns.reshape(shape)
    return columns.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def layer_group_size(k: int, group_size: int, nearest: bool) -> int | None:
    """The group size a layer with `k` inputs per output channel gets when `group_size` is asked for.

    `group_size` where it divides K. Otherwise, with `nearest` ('auto' scales), the largest divisor of K
    between half of `group_size` and `group_size` (K = 144, a 3x3 conv over 16 channels, gets groups of 48
    for 64), so a model whose channel counts are not powers of two still gets groups of about the asked
    size, at most twice the scales; None (per-channel scales) where there is no such divisor, or without
    `nearest` (an explicit 'per_group', which reports such layers instead).
    """
    if k % group_size == 0:
        return group_size
    if nearest:
        for size in range(min(group_size, k) - 1, (group_size + 1) // 2 - 1, -1):
            if k % size == 0:
                return size
    return None


def num_groups(shape: tuple[int, ...] | torch.Size, group_size: int) -> int:
    """Groups per output channel of a weight of `shape`; raises if `group_size` does not divide K."""
    k = math.prod(tuple(shape)[1:])
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the {k} inputs per output channel")
    return k // group_size


def group_rows(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(C_out * G, group_size): one row per (output channel, group), for per-row range searches."""
    num_groups(weight.shape, group_size)
    return kernel_columns(weight).reshape(-1, group_size)


def expand_qparam(t: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A per-tensor, per-channel or (C_out, G) per-group scale or zero point, broadcastable to `shape`.

    Per-group values are repeated over their group's columns (a full-size tensor); the others are views.
    """
    shape = tuple(shape)
    if t.ndim != 2:
        return t.reshape(-1, *([1] * (len(shape) - 1)))
    k = math.prod(shape[1:])
    groups = t.shape[1]
    if t.shape[0] != shape[0] or k % groups:
        raise ValueError(f"per-group qparams of shape {tuple(t.shape)} do not fit a weight of shape {shape}")
    columns = t.repeat_interleave(k // groups, dim=1)
    return from_kernel_columns(columns, shape)
