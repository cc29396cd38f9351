"""Integer GEMM with per-group weight scales applied inside the reduction (the im2col / Linear path).

With weight scales s[n, g] and zero points z_w[n, g] per group g of `group_size` consecutive columns of K
(`quantizers.groups`), the dot product over K splits into exact integer products per group, each scaled by
its own group's scale:

    sum_g s[n, g] (a_g . w_g - z_w[n, g] sum_{k in g} a_k)

The per-group products are exact: on CUDA `torch._int_mm` per group; on CPU fp32 batched matmuls, exact
because every partial sum of at most 512 products of an 8-bit activation code (|a| <= 255) and an 8-bit
weight code (|w| <= 128) stays below 2^24. Only the scaled sum over groups rounds.
"""

from __future__ import annotations

import torch

from diffusers_ptq.integer.gemm import int_mm

MAX_EXACT_GROUP = 512  # 512 * 255 * 128 < 2^24
_CHUNK_ELEMENTS = 1 << 24  # bound on the (groups, M, N) temporary of one batched matmul


def grouped_products(
    a: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """fp32 (M, N) sum over groups of s[n, g] (a_g . w_g - z_w[n, g] sum_{k in g} a_k).

    `a`: (M, K) activation codes (int8 or uint8); `w`: (N, K) int8 weight codes; `scale`, `zero_point`:
    (N, G) with G = K / group_size (`zero_point` None for a symmetric grid).
    """
    m, k = a.shape
    n = w.shape[0]
    groups = scale.shape[1]
    if groups * group_size != k or w.shape[1] != k:
        raise ValueError(f"{groups} groups of {group_size} do not cover K = {k} (weight K = {w.shape[1]})")
    if group_size > MAX_EXACT_GROUP:
        raise ValueError(f"group size {group_size} exceeds {MAX_EXACT_GROUP}, the largest exact in fp32")
    out = torch.zeros((m, n), dtype=torch.float32, device=a.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, m * n))
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        cols = slice(g0 * group_size, g1 * group_size)
        products = _exact_products(a[:, cols], w[:, cols], g1 - g0, group_size)  # (c, M, N)
        out += (products * scale[:, g0:g1].t().unsqueeze(1)).sum(dim=0)
    if zero_point is not None:
        sums = a.float().view(m, groups, group_size).sum(dim=2)  # exact: integers below 2^24
        out -= sums @ (scale * zero_point).t()
    return out


def _exact_products(a: torch.Tensor, w: torch.Tensor, groups: int, group_size: int) -> torch.Tensor:
    """(groups, M, N) fp32 integer products of each group's columns."""
    m, n = a.shape[0], w.shape[0]
    if a.device.type == "cuda":  # fp32 matmuls may run as TF32 there; int_mm is exact
        spans = [slice(g * group_size, (g + 1) * group_size) for g in range(groups)]
        return torch.stack([int_mm(a[:, c].contiguous(), w[:, c].contiguous()).float() for c in spans])
    a3 = a.float().reshape(m, groups, group_size).transpose(0, 1)  # (c, M, gs)
    w3 = w.float().reshape(n, groups, group_size).permute(1, 2, 0)  # (c, gs, N)
    return torch.bmm(a3, w3)
