"""GPTQ's column solver: round a weight column by column, spreading each column's error over the rest.

A pure function of the weight (C_out, K), the Hessian H (K, K) of the layer's inputs and per-element
quantization parameters, so per-tensor, per-channel and per-group grids all go through the same code.
"""

from __future__ import annotations

import torch

from diffusers_ptq.primitives import fake_quantize


class RankDeficientHessian(ValueError):
    """H is not positive definite even after dampening: too few input vectors for its size."""


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (rows of it give each column's error-spreading coefficients)."""
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise RankDeficientHessian("H is not positive definite")
    inverse = torch.cholesky_inverse(lower)
    del lower  # at most three K x K matrices live here (H, H⁻¹, its factor)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0:
        raise RankDeficientHessian("H⁻¹ is not positive definite")
    return upper


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> torch.Tensor:
    """On-grid weight (C_out, K) minimising ||X W - X Ŵ||² column by column (GPTQ / OBQ).

    `scale` / `zero_point` are per element (C_out, K) (`WeightQuantizer.column_qparams`). `damp` is added
    to H's diagonal as a fraction of its mean; `act_order` quantizes columns by decreasing diag(H) (the
    result is returned in the original column order). Raises RankDeficientHessian if H is singular after
    dampening. Every returned value is `fake_quantize` of itself under (scale, zero_point).
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    scale, zero_point = scale.float(), zero_point.float()
    columns = w.shape[1]
    if h.shape != (columns, columns):
        raise ValueError(f"a Hessian of shape {tuple(h.shape)} for a weight of {columns} columns")
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0  # an input that is always zero: its column keeps nearest rounding and spreads nothing
    diag += damp * diag.mean()
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        scale, zero_point = scale[:, perm], zero_point[:, perm]
    u = _inverse_factor(h)
    del h
    out = torch.empty_like(w)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            col = start + i
            q = fake_quantize(block[:, i], scale[:, col], zero_point[:, col], qmin, qmax)
            out[:, col] = q
            err = (block[:, i] - q) / u_block[i, i]
            # Columns not quantized yet absorb the error: inside the block now, after it lazily.
            block[:, i + 1 :] -= err.unsqueeze(1) * u_block[i, i + 1 :].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]
    if perm is not None:
        out = out[:, torch.argsort(perm)]
    return out
