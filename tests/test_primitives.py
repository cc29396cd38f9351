"""Pure quantization primitives: integer ranges, qparams, fake quantization, range search, SQNR."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_ptq.primitives import (
    compute_qparams,
    fake_quantize,
    lp_error,
    qrange,
    quantize,
    round_ste,
    search_range,
    sqnr_db,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- qrange


@pytest.mark.parametrize(
    ("bits", "symmetric", "expected"),
    [
        (8, True, (-128, 127)),
        (8, False, (0, 255)),
        (4, True, (-8, 7)),
        (4, False, (0, 15)),
        (2, True, (-2, 1)),
        (2, False, (0, 3)),
        (16, False, (0, 65535)),
        (16, True, (-32768, 32767)),
    ],
)
def test_qrange(bits, symmetric, expected):
    assert qrange(bits, symmetric) == expected
    lo, hi = qrange(bits, symmetric)
    assert hi - lo + 1 == 2**bits


# --------------------------------------------------------------------------------------- compute_qparams


def test_symmetric_qparams_zero_point_zero_and_amax_representable():
    lo = torch.tensor([-3.0, -1.0, -0.5, 0.0])
    hi = torch.tensor([1.0, 2.54, 0.5, 4.0])
    scale, zp = compute_qparams(lo, hi, 8, True)
    assert torch.equal(zp, torch.zeros(4))
    expected = torch.maximum(hi, -lo) / 127
    torch.testing.assert_close(scale, expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_affine_qparams_zero_point_integral_in_range_and_span(bits):
    gen = _gen(1)
    lo = -torch.rand(50, generator=gen) * 5
    hi = torch.rand(50, generator=gen) * 5
    scale, zp = compute_qparams(lo, hi, bits, False)
    qmin, qmax = qrange(bits, False)
    assert torch.equal(zp, zp.round())
    assert (zp >= qmin).all() and (zp <= qmax).all()
    torch.testing.assert_close(scale, (hi - lo) / (qmax - qmin))
    # Zero is exactly representable and the grid ends are within half a step of lo and hi.
    grid_lo = (qmin - zp) * scale
    grid_hi = (qmax - zp) * scale
    assert (grid_lo - lo).abs().max() <= (scale / 2 + 1e-6).max()
    assert (grid_hi - hi).abs().max() <= (scale / 2 + 1e-6).max()


def test_qparams_range_widened_to_include_zero():
    # All positive: lo is widened to 0.
    scale, zp = compute_qparams(torch.tensor([2.0]), torch.tensor([5.1]), 8, False)
    torch.testing.assert_close(scale, torch.tensor([5.1 / 255]))
    assert zp.item() == 0
    # All negative: hi is widened to 0, zero sits at qmax.
    scale, zp = compute_qparams(torch.tensor([-5.1]), torch.tensor([-2.0]), 8, False)
    torch.testing.assert_close(scale, torch.tensor([5.1 / 255]))
    assert zp.item() == 255
    # Symmetric: a positive-only range still uses its maximum.
    scale, zp = compute_qparams(torch.tensor([3.0]), torch.tensor([6.35]), 8, True)
    torch.testing.assert_close(scale, torch.tensor([6.35 / 127]))
    scale, _ = compute_qparams(torch.tensor([-6.35]), torch.tensor([-3.0]), 8, True)
    torch.testing.assert_close(scale, torch.tensor([6.35 / 127]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_eps_floor_for_zero_range(symmetric):
    zero = torch.zeros(3)
    scale, zp = compute_qparams(zero, zero, 8, symmetric)
    assert torch.equal(scale, torch.full((3,), 1e-8))
    assert torch.isfinite(zp).all()
    assert torch.equal(zp, torch.zeros(3))
    scale, _ = compute_qparams(zero, zero, 8, symmetric, eps=1e-3)
    assert torch.equal(scale, torch.full((3,), 1e-3))
    # Quantizing zeros with the floored scale gives zeros, not NaN.
    out = fake_quantize(torch.zeros(3, 4), scale[:, None], zp[:, None], *qrange(8, symmetric))
    assert torch.equal(out, torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------- fake_quantize


@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (8, False), (4, True), (4, False), (3, False)])
def test_fake_quantize_on_grid_error_bound_and_clipping(bits, symmetric):
    gen = _gen(2)
    lo, hi = torch.tensor(-1.3), torch.tensor(2.1)
    scale, zp = compute_qparams(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    x = torch.rand(20000, generator=gen) * 6 - 3  # covers inside and outside [lo, hi]
    out = fake_quantize(x, scale, zp, qmin, qmax)

    codes = out / scale + zp
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3

    grid_lo, grid_hi = (qmin - zp) * scale, (qmax - zp) * scale
    inside = (x >= grid_lo) & (x <= grid_hi)
    assert inside.sum() > 1000
    assert (out[inside] - x[inside]).abs().max() <= scale / 2 * (1 + 1e-4)
    # Values inside the requested range [lo, hi] are also within half a step.
    in_req = (x >= lo) & (x <= hi)
    assert (out[in_req] - x[in_req]).abs().max() <= scale / 2 * (1 + 1e-4) + 1e-6
    # Outside the grid, values are clipped to its ends.
    above, below = x > grid_hi, x < grid_lo
    assert above.any() and below.any()
    torch.testing.assert_close(out[above], grid_hi.expand(int(above.sum())))
    torch.testing.assert_close(out[below], grid_lo.expand(int(below.sum())))
    # Codes are integers too (quantize, the integer half).
    q = quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(q, q.round())
    assert q.min() == qmin and q.max() == qmax


def test_fake_quantize_known_values():
    scale, zp = torch.tensor(0.5), torch.tensor(0.0)
    x = torch.tensor([0.0, 0.2, 0.3, -0.74, 0.76, 10.0, -10.0])
    out = fake_quantize(x, scale, zp, -4, 3)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.5, -0.5, 1.0, 1.5, -2.0]))
    # Affine: zero-point shifts the grid.
    out = fake_quantize(torch.tensor([-1.0, 0.0, 0.26, 5.0]), torch.tensor(0.25), torch.tensor(2.0), 0, 7)
    torch.testing.assert_close(out, torch.tensor([-0.5, 0.0, 0.25, 1.25]))


def test_fake_quantize_broadcasts_per_channel():
    x = torch.tensor([[0.3, 0.9], [3.0, 9.0]])
    scale = torch.tensor([[0.1], [1.0]])
    out = fake_quantize(x, scale, torch.zeros(2, 1), -128, 127)
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.9], [3.0, 9.0]]))


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([0.2, 0.7, -1.6, 2.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), x.detach().round())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


@pytest.mark.parametrize("symmetric", [True, False])
def test_straight_through_gradient_wrt_input(symmetric):
    scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), 4, symmetric)
    qmin, qmax = qrange(4, symmetric)
    s = float(scale)
    grid_lo, grid_hi = float((qmin - zp) * scale), float((qmax - zp) * scale)
    # Rounding happens before clipping, so the edge codes cover half a step beyond the grid ends;
    # "outside" here means more than half a step beyond them. Exact boundaries are avoided.
    x = torch.tensor(
        [
            grid_lo - 20 * s,
            grid_lo - 0.7 * s,
            grid_lo + 0.2 * s,
            -0.31,
            0.0,
            0.44,
            grid_hi - 0.2 * s,
            grid_hi + 0.7 * s,
            grid_hi + 20 * s,
        ],
        requires_grad=True,
    )
    fake_quantize(x, scale, zp, qmin, qmax).sum().backward()
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(x.grad, expected)


def test_gradient_reaches_scale():
    x = torch.linspace(-3, 3, 101)
    scale = torch.tensor(0.1, requires_grad=True)
    out = fake_quantize(x, scale, torch.tensor(0.0), -8, 7)
    ((out - x) ** 2).sum().backward()
    assert scale.grad is not None
    assert torch.isfinite(scale.grad)
    assert scale.grad.abs() > 0
    # Range [-0.8, 0.7] clips most of x: enlarging the scale must reduce the error.
    assert scale.grad < 0


# ------------------------------------------------------------------------------------------ search_range


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("rows", [1, 5])
def test_search_range_shapes(method, rows):
    x = torch.randn(rows, 300, generator=_gen(3))
    lo, hi = search_range(x, 4, False, method)
    assert lo.shape == (rows,) and hi.shape == (rows,)
    assert (lo <= hi).all()
    assert (lo >= x.amin(1) - 1e-6).all() and (hi <= x.amax(1) + 1e-6).all()


def test_minmax_is_row_extremes_and_accepts_given_extremes():
    x = torch.randn(4, 100, generator=_gen(4)) * torch.tensor([[1.0], [10.0], [0.1], [3.0]])
    lo, hi = search_range(x, 8, True, "minmax")
    assert torch.equal(lo, x.amin(1))
    assert torch.equal(hi, x.amax(1))
    given_lo, given_hi = torch.full((4,), -50.0), torch.full((4,), 60.0)
    lo, hi = search_range(x, 8, True, "minmax", lo=given_lo, hi=given_hi)
    assert torch.equal(lo, given_lo) and torch.equal(hi, given_hi)


def test_mse_range_is_per_row():
    gen = _gen(5)
    x = torch.cat(
        [torch.rand(1, 5000, generator=gen) * 2 - 1, (torch.rand(1, 5000, generator=gen) * 2 - 1) * 100]
    )
    lo, hi = search_range(x, 8, False, "mse")
    assert hi[1] / hi[0] > 50  # each row keeps its own scale
    assert lo[1] / lo[0] > 50


def _lp(x, lo, hi, bits, symmetric, p=2.4):
    scale, zp = compute_qparams(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    return lp_error(x, fake_quantize(x, scale[:, None], zp[:, None], qmin, qmax), p, dim=1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_never_worse_than_minmax_with_outliers(symmetric, bits):
    gen = _gen(6)
    x = torch.randn(6, 4000, generator=gen)
    x[:, :5] *= 40  # a few outliers per row
    lo_m, hi_m = search_range(x, bits, symmetric, "minmax")
    lo, hi = search_range(x, bits, symmetric, "mse")
    err_mse = _lp(x, lo, hi, bits, symmetric)
    err_minmax = _lp(x, lo_m, hi_m, bits, symmetric)
    assert (err_mse <= err_minmax * (1 + 1e-6)).all()
    # Shrinking only: the search never widens the range.
    assert (hi <= hi_m + 1e-6).all() and (lo >= lo_m - 1e-6).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_strictly_better_on_heavy_tails_at_4_bits(symmetric):
    gen = _gen(7)
    # A log-normal scale mixture of normals: heavy tails, a few huge values per row.
    x = torch.randn(4, 20000, generator=gen) * torch.exp(1.5 * torch.randn(4, 20000, generator=gen))
    lo_m, hi_m = search_range(x, 4, symmetric, "minmax")
    lo, hi = search_range(x, 4, symmetric, "mse")
    err_mse = _lp(x, lo, hi, 4, symmetric)
    err_minmax = _lp(x, lo_m, hi_m, 4, symmetric)
    assert (err_mse < 0.95 * err_minmax).all()
    assert (hi < hi_m).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_keeps_minmax_range_for_uniform_data_at_8_bits(seed):
    x = torch.rand(4, 10000, generator=_gen(seed)) * 3 - 1
    lo, hi = search_range(x, 8, False, "mse")
    assert torch.equal(lo, x.amin(1))
    assert torch.equal(hi, x.amax(1))


def test_mse_keeps_minmax_range_for_uniform_data_at_8_bits_symmetric():
    # Symmetric grids gain less from the full range, so this needs more values for a clear margin.
    x = torch.rand(8, 20000, generator=_gen(0)) * 3 - 1
    lo, hi = search_range(x, 8, True, "mse")
    assert torch.equal(lo, x.amin(1))
    assert torch.equal(hi, x.amax(1))


def test_mse_uses_given_extremes_as_starting_range():
    x = torch.rand(1, 2000, generator=_gen(8)) * 2 - 1
    lo, hi = search_range(x, 8, False, "mse", lo=torch.tensor([-1.0]), hi=torch.tensor([1.0]))
    # Uniform data whose true extremes are the given ones: the widest candidate is kept.
    torch.testing.assert_close(lo, torch.tensor([-1.0]))
    torch.testing.assert_close(hi, torch.tensor([1.0]))
    lo, hi = search_range(x, 8, False, "mse", lo=torch.tensor([-100.0]), hi=torch.tensor([100.0]))
    assert hi.item() < 100.0  # a far too wide starting range is shrunk


def test_mse_candidates_limit_the_shrink():
    gen = _gen(9)
    x = torch.randn(1, 5000, generator=gen) * torch.exp(1.5 * torch.randn(1, 5000, generator=gen))
    lo_m, hi_m = x.amin(1), x.amax(1)
    lo1, hi1 = search_range(x, 4, True, "mse", num_candidates=1)
    assert torch.equal(lo1, lo_m) and torch.equal(hi1, hi_m)
    # The optimum lies below 0.91, so with 10 candidates the smallest one (1 - 0.09) wins.
    lo10, hi10 = search_range(x, 4, True, "mse", num_candidates=10)
    torch.testing.assert_close(lo10, lo_m * 0.91)
    torch.testing.assert_close(hi10, hi_m * 0.91)
    lo100, hi100 = search_range(x, 4, True, "mse", num_candidates=100)
    factor = (lo100 / lo_m).item()
    assert 0.01 <= factor < 0.91
    assert factor * 100 == pytest.approx(round(factor * 100), abs=1e-3)  # one of the 1 - 0.01 i grid
    torch.testing.assert_close(hi100, hi_m * factor)


def test_mse_lp_norm_controls_clipping():
    gen = _gen(9)
    x = torch.randn(1, 5000, generator=gen) * torch.exp(1.5 * torch.randn(1, 5000, generator=gen))
    factors = {}
    for p in (1.0, 2.4):
        lo, hi = search_range(x, 2, True, "mse", lp_norm=p)
        factors[p] = (lo / x.amin(1)).item()
        assert (hi / x.amax(1)).item() == pytest.approx(factors[p], rel=1e-5)
    # A smaller p penalises clipping the tail less, so it clips much harder (down to the last candidates).
    assert factors[1.0] < 0.1
    assert factors[1.0] < factors[2.4] < 1.0


@pytest.mark.parametrize("percentile", [90.0, 99.0, 99.9])
def test_percentile_matches_torch_quantile_exact_positions(percentile):
    # n - 1 = 10000 makes the quantile position integral, so no interpolation is involved.
    x = torch.randn(3, 10001, generator=_gen(10)) * torch.tensor([[1.0], [5.0], [0.2]])
    lo, hi = search_range(x, 8, False, "percentile", percentile=percentile)
    q = percentile / 100.0
    torch.testing.assert_close(hi, torch.quantile(x, q, dim=1))
    torch.testing.assert_close(lo, torch.quantile(x, 1.0 - q, dim=1))


def test_percentile_close_to_torch_quantile_any_size():
    x = torch.randn(2, 5000, generator=_gen(11))
    lo, hi = search_range(x, 8, False, "percentile", percentile=99.0)
    torch.testing.assert_close(hi, torch.quantile(x, 0.99, dim=1), atol=0.02, rtol=0)
    torch.testing.assert_close(lo, torch.quantile(x, 0.01, dim=1), atol=0.02, rtol=0)
    lo, hi = search_range(x, 8, False, "percentile", percentile=100.0)
    assert torch.equal(lo, x.amin(1)) and torch.equal(hi, x.amax(1))


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4), ()])
def test_search_range_rejects_non_2d(shape):
    with pytest.raises(ValueError, match="2-D"):
        search_range(torch.zeros(shape), 8, True, "minmax")


def test_search_range_rejects_unknown_method():
    with pytest.raises(ValueError, match="kl"):
        search_range(torch.zeros(1, 4), 8, True, "kl")


# ----------------------------------------------------------------------------------------------- sqnr_db


def test_sqnr_known_values():
    x = torch.randn(10000, generator=_gen(12))
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0, abs=1e-4)
    assert sqnr_db(x, x * 0.99) == pytest.approx(40.0, abs=1e-3)
    noise = torch.randn(10000, generator=_gen(13)) * 0.1
    assert sqnr_db(x, x + noise) == pytest.approx(20.0, abs=0.5)
    assert sqnr_db(x, torch.zeros_like(x)) == pytest.approx(0.0, abs=1e-9)
    assert isinstance(sqnr_db(x, x * 1.1), float)
