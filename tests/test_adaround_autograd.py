"""AdaRound's one-node soft quantizer and regulariser against autograd on the textbook formulas, their
per-step caches, and the fused Adam that steps them."""

from __future__ import annotations

import pytest
import torch

from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.optim import adam
from diffusers_ptq.quantizers.adaround import GAMMA, ZETA, AdaRoundQuantizer
from diffusers_ptq.quantizers.weight import WeightQuantizer


def _quantizer(bits: int, symmetric: bool, granularity: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(8, 24, 3, 3, generator=gen)
    config = WeightQuantConfig(
        bits=bits, symmetric=symmetric, scale_search="minmax", granularity=granularity, group_size=72
    )
    base = WeightQuantizer(config, 8, 24 * 9)
    base.calibrate(weight)
    q = AdaRoundQuantizer(base, weight)
    with torch.no_grad():  # spread V over the clipped and the open parts of h(V)
        q.v.add_(3 * torch.randn(q.v.shape, generator=gen))
    return q, weight


def _h(v):
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
@pytest.mark.parametrize(("bits", "symmetric"), [(2, True), (4, False), (8, True)])
def test_soft_quantizer_equals_the_formula_and_its_autograd_gradient(bits, symmetric, granularity):
    q, weight = _quantizer(bits, symmetric, granularity)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((q(weight) * upstream).sum(), q.v)
    scale, zero = q.base.qparams(weight)
    codes = torch.clamp((weight / scale).floor() + _h(q.v) + zero, q.qmin, q.qmax)
    reference = (codes - zero) * scale
    (expected,) = torch.autograd.grad((reference * upstream).sum(), q.v)
    assert torch.equal(q(weight), reference.detach())
    assert grad.abs().max() > 0 and (grad == 0).any()  # both sides of the clips are exercised
    assert torch.allclose(grad, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("beta", [20.0, 2.0, 1.0, 0.5])
def test_regulariser_equals_the_formula_and_its_autograd_gradient(beta):
    q, _ = _quantizer(4, False, "per_channel")
    (grad,) = torch.autograd.grad(q.regulariser(beta), q.v)
    reference = (1 - (2 * _h(q.v) - 1).abs().pow(beta)).sum()
    (expected,) = torch.autograd.grad(reference, q.v)
    assert float(q.regulariser(beta).detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_h_at_one_half_has_zero_regulariser_gradient_for_every_beta():
    q, _ = _quantizer(4, True, "per_channel")
    with torch.no_grad():  # h(V) = 1/2 exactly: |2h - 1| = 0, where d|u|^beta/du is 0 (or a NaN for autograd)
        q.v.zero_()
    for beta in (0.5, 1.0, 2.0):
        (grad,) = torch.autograd.grad(q.regulariser(beta), q.v)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_cached_floor_follows_changes_of_the_weight_and_the_grid():
    q, weight = _quantizer(4, True, "per_channel")
    first = q(weight).detach().clone()
    assert torch.equal(q(weight), first)  # cached: same result
    with torch.no_grad():
        weight.mul_(1.5)  # in place: a new version of the same tensor
    scale, zero = q.base.qparams(weight)
    expected = (torch.clamp((weight / scale).floor() + _h(q.v) + zero, q.qmin, q.qmax) - zero) * scale
    assert torch.equal(q(weight), expected.detach())
    with torch.no_grad():
        q.base.scale.mul_(2.0)
    scale, zero = q.base.qparams(weight)
    expected = (torch.clamp((weight / scale).floor() + _h(q.v) + zero, q.qmin, q.qmax) - zero) * scale
    assert torch.equal(q(weight), expected.detach())
    other = weight.clone()  # another tensor with the same values
    assert torch.equal(q(other), q(weight))


def test_frozen_rounding_equals_the_hard_one_and_holds_no_weight_sized_copy():
    q, weight = _quantizer(4, False, "per_group")
    q(weight)  # soft: floor(W / s) and h(V) kept for the training steps
    assert q._floor is not None and q._rect is not None
    q.set_mode("hard")
    hard = q(weight)
    q.freeze()
    assert torch.equal(q(weight), hard)
    assert q._floor is None and q._rect is None  # every frozen quantizer of a model would hold them
    with torch.no_grad():
        weight.add_(0.3)
    assert not torch.equal(q(weight), hard)


def test_fused_adam_bumps_versions_so_the_per_step_cache_sees_each_step():
    q, weight = _quantizer(4, True, "per_channel")
    optimizer = adam([{"params": [q.v], "lr": 0.5}])
    assert optimizer.defaults["fused"]
    before = q(weight).detach().clone()
    q(weight).sum().backward()
    version = q.v._version
    optimizer.step()
    assert q.v._version > version
    assert not torch.equal(q(weight), before)
    scale, zero = q.base.qparams(weight)
    expected = (torch.clamp((weight / scale).floor() + _h(q.v) + zero, q.qmin, q.qmax) - zero) * scale
    assert torch.equal(q(weight), expected.detach())


def test_adam_falls_back_to_the_per_tensor_loop_where_fused_cannot_run():
    assert not adam([{"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]}]).defaults["fused"]
    assert not adam([{"params": []}, {"params": []}]).defaults.get("fused")
