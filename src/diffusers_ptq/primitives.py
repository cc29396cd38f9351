"""Pure tensor functions for uniform affine quantization: ranges, qparams, fake quantization, range search.

No modules and no state here: quantizer modules and the int8 export both build on these, so the fake-quant
path and the integer path share one definition of the grid.
"""

from __future__ import annotations

import torch


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a `bits`-bit grid: signed for symmetric, unsigned for affine."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient, so scales and inputs stay trainable."""
    return (x.round() - x).detach() + x


def compute_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) that map the range [lo, hi] (widened to contain 0) onto the integer grid."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        # The positive end sets the step so +amax is representable; the grid has one extra negative level.
        scale = torch.maximum(hi, -lo) / qmax
        return scale.clamp_min(eps), torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    zero_point = (qmin - lo / scale).round().clamp(qmin, qmax)
    return scale, zero_point


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes (as floats) of `x`; `scale`/`zero_point` broadcast against `x`."""
    return torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize then dequantize; gradients flow straight through the rounding (LSQ-style for the scale)."""
    return (quantize(x, scale, zero_point, qmin, qmax) - zero_point) * scale


def lp_error(x: torch.Tensor, x_hat: torch.Tensor, p: float, dim: int | None = None) -> torch.Tensor:
    """Mean |x - x_hat|^p, over everything or along `dim`."""
    err = (x - x_hat).abs().pow(p)
    return err.mean() if dim is None else err.mean(dim=dim)


def search_range(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    method: str,
    *,
    lp_norm: float = 2.4,
    num_candidates: int = 100,
    percentile: float = 99.99,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range (lo, hi) per row of the 2-D `x` (rows = channels; one row = per-tensor).

    `method`: 'minmax' (the observed extremes), 'percentile' (the given percentile at each end), or
    'mse' (the extremes shrunk by (1 - 0.01 i), i < num_candidates, keeping the candidate with the lowest
    mean |x - Q(x)|^p per row). `lo`/`hi` give exact extremes when `x` is only a subsample.
    """
    if x.ndim != 2:
        raise ValueError(f"search_range expects a 2-D tensor (rows, values), got shape {tuple(x.shape)}")
    x = x.float()
    lo = x.amin(dim=1) if lo is None else lo.float().reshape(-1)
    hi = x.amax(dim=1) if hi is None else hi.float().reshape(-1)
    if method == "minmax":
        return lo, hi
    if method == "percentile":
        n = x.shape[1]
        k_hi = max(1, min(n, round(n * percentile / 100.0)))
        k_lo = max(1, min(n, n + 1 - k_hi))
        return x.kthvalue(k_lo, dim=1).values, x.kthvalue(k_hi, dim=1).values
    if method != "mse":
        raise ValueError(f"unknown scale search {method!r}; valid: 'minmax', 'mse', 'percentile'")
    qmin, qmax = qrange(bits, symmetric)
    shrink = 1.0 - 0.01 * torch.arange(num_candidates, dtype=torch.float32, device=x.device)
    shrink = shrink[shrink > 0]
    # Candidates are evaluated in chunks, bounding the (candidates, rows, values) temporary.
    chunk = max(1, _SEARCH_CHUNK_ELEMENTS // max(1, x.numel()))
    errors = []
    for start in range(0, len(shrink), chunk):
        f = shrink[start : start + chunk, None]  # (c, 1)
        scale, zp = compute_qparams(lo[None] * f, hi[None] * f, bits, symmetric)  # (c, rows)
        x_hat = fake_quantize(x[None], scale[..., None], zp[..., None], qmin, qmax)
        errors.append(lp_error(x[None], x_hat, lp_norm, dim=2))
    best = torch.cat(errors).argmin(dim=0)  # first (widest) candidate wins ties
    return lo * shrink[best], hi * shrink[best]


_SEARCH_CHUNK_ELEMENTS = 1 << 24


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `approx` against `reference`, in dB."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))


def mean_error_rms(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """The systematic part of `approx`'s error: RMS over the per-element (C, H, W) mean over samples.

    sqrt(mean_{c,h,w} (mean_n (approx - reference)[n, c, h, w])^2) for (N, C, H, W) tensors (any trailing
    shape): the norm of E_samples[approx - reference] per element, which random, zero-mean errors average
    out of and a bias does not. In the units of the tensors (not dB).
    """
    if reference.shape != approx.shape or reference.ndim < 2:
        raise ValueError(
            f"mean_error_rms needs two batched tensors of one shape, got {tuple(reference.shape)} and "
            f"{tuple(approx.shape)}"
        )
    mean = (approx.double() - reference.double()).mean(dim=0)
    return float(mean.pow(2).mean().sqrt())
