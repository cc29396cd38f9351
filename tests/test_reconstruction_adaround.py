"""AdaRound rounding, baking into integer weights, LSQ step sizes per timestep group, QDrop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_ptq.config import ActivationQuantConfig, WeightQuantConfig
from diffusers_ptq.distributed import split_evenly
from diffusers_ptq.nn import QuantConv2d, QuantLinear
from diffusers_ptq.primitives import quantize
from diffusers_ptq.quantizers import TimestepActQuantizer, contiguous_group_map
from diffusers_ptq.quantizers.adaround import AdaRoundQuantizer
from diffusers_ptq.reconstruction.checkpoint import pack_bits, unpack_bits
from diffusers_ptq.reconstruction.losses import BetaSchedule
from diffusers_ptq.reconstruction.lsq import disable_scale_learning, enable_scale_learning, qdrop
from diffusers_ptq.reconstruction.rounding import (
    adaround_quantizers,
    bake_layers,
    restore_rounding,
    wrap_layer,
)
from diffusers_ptq.timestep import TimestepContext


def _conv(bits=4, symmetric=False, split=None, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = QuantConv2d.from_float(
        conv, WeightQuantConfig(bits=bits, symmetric=symmetric, scale_search="minmax"), None, split
    )
    layer.calibrate_weights()
    return layer


def _codes(layer):
    out = []
    for q, part in zip(layer.weight_quantizers, layer._weight_parts(layer.weight)):
        scale, zp = q._broadcast(q.scale, part.ndim), q._broadcast(q.zero_point, part.ndim)
        out.append(quantize(part.float(), scale, zp, q.qmin, q.qmax))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(("symmetric", "split"), [(False, None), (True, 2)])
def test_soft_start_is_the_float_weight_and_hard_start_is_nearest(symmetric, split):
    layer = _conv(symmetric=symmetric, split=split)
    nearest = layer.quantized_weight().detach().clone()
    codes = _codes(layer)
    wrappers = wrap_layer(layer)
    assert len(wrappers) == (1 if split is None else 2)
    # h(V) = frac(W / s) reproduces W itself wherever the grid does not clip it (a rounded zero-point can
    # clip the extremes by less than a step).
    inside = (codes > wrappers[0].qmin) & (codes < wrappers[0].qmax)
    assert inside.float().mean() > 0.9
    assert torch.allclose(layer.quantized_weight()[inside], layer.weight[inside], atol=1e-6)
    for q in wrappers:
        q.set_mode("hard")
    assert torch.equal(layer.quantized_weight(), nearest)


def test_regulariser_parts_add_up_to_the_whole_and_so_do_their_gradients():
    """Data-parallel ranks each add the regulariser of their contiguous part of V (split_evenly, an empty
    part included): the parts' values and gradients sum to the whole's."""
    (q,) = wrap_layer(_conv(bits=4))
    whole = q.regulariser(3.0)
    (grad,) = torch.autograd.grad(whole, q.v)
    count = q.v.numel()
    for ranks in (2, 3, count + 1):
        parts = split_evenly(count, ranks, allow_empty=True)
        values = [q.regulariser(3.0, part) for part in parts]
        grads = [torch.autograd.grad(v, q.v, allow_unused=True)[0] for v in values]
        assert float(sum(v.detach() for v in values)) == pytest.approx(float(whole.detach()), rel=1e-6)
        summed = sum(g if g is not None else torch.zeros_like(q.v) for g in grads)
        # Disjoint parts: each element's gradient once (to the last bits: vectorised and scalar tails of the
        # elementwise kernels round differently).
        assert torch.allclose(summed, grad, rtol=1e-6, atol=1e-9)
    assert float(q.regulariser(3.0, range(0, 0)).detach()) == 0.0


def test_h_converges_to_zero_or_one_under_the_annealed_regulariser():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(16, 8), WeightQuantConfig(bits=3, scale_search="mse"), None)
    layer.calibrate_weights()
    (q,) = wrap_layer(layer)
    x = torch.randn(256, 16)
    target = x @ layer.weight.detach().T
    optimizer = torch.optim.Adam([q.v], lr=3e-2)
    iterations = 600
    beta = BetaSchedule(iterations, warmup=0.2, start=20.0, end=2.0)
    start = q.binary_fraction()
    for step in range(1, iterations + 1):
        loss = ((x @ layer.quantized_weight().T - target) ** 2).sum(1).mean()
        if beta.active(step):
            loss = loss + 0.01 * q.regulariser(beta.beta(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert start < 0.05 and q.binary_fraction() > 0.99
    # Where h is binary the soft forward is the hard one (the rounding the deployed model uses).
    binary = (q.h() == 0) | (q.h() == 1)
    soft = layer.quantized_weight().detach()
    q.set_mode("hard")
    assert torch.equal(soft[binary], layer.quantized_weight()[binary])


@pytest.mark.parametrize(("bits", "symmetric", "split"), [(4, False, None), (3, True, 2), (8, False, 4)])
def test_baking_reproduces_the_soft_rounded_output_when_h_is_binary(bits, symmetric, split):
    layer = _conv(bits=bits, symmetric=symmetric, split=split)
    nearest = _codes(layer)
    wrappers = wrap_layer(layer)
    gen = torch.Generator().manual_seed(1)
    for q in wrappers:
        q.v.data = torch.where(torch.rand(q.v.shape, generator=gen) < 0.5, -8.0, 8.0)  # h(V) in {0, 1}
        assert q.binary_fraction(tol=0.0) == 1.0
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        soft = layer(x)
        learned = torch.cat([q.codes(p) for q, p in zip(wrappers, layer._weight_parts(layer.weight))], 1)
    bake_layers([("conv", layer)])
    assert not adaround_quantizers(layer), "the plain quantizers are back"
    assert [type(q).__name__ for q in layer.weight_quantizers] == ["WeightQuantizer"] * len(wrappers)
    with torch.no_grad():
        assert torch.equal(layer(x), soft)
    # The plain quantizer's round-to-nearest now yields the learned integer codes (what serialization stores).
    assert torch.equal(_codes(layer), learned) and not torch.equal(learned, nearest)
    assert torch.equal(learned, learned.round())


def test_frozen_rounding_round_trips_through_packed_bits():
    layer = _conv()
    (q,) = wrap_layer(layer)
    q.v.data = torch.randn(q.v.shape)
    q.set_mode("hard")
    expected = layer.quantized_weight().detach().clone()
    q.freeze()
    mask = q.round_up
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    fresh = _conv()
    restore_rounding(fresh, [unpack_bits(packed, list(mask.shape))])
    assert torch.equal(fresh.quantized_weight(), expected)
    with pytest.raises(ValueError, match="2 rounding masks for a layer with 1"):
        restore_rounding(_conv(), [mask, mask])


def _act_quantizer(context, groups=2):
    config = ActivationQuantConfig(bits=4, num_candidates=10)
    q = TimestepActQuantizer(config, context, contiguous_group_map(1000, groups))
    q.scale.copy_(torch.tensor([0.1, 0.2]))
    return q


def test_each_group_step_size_learns_from_its_own_samples():
    context = TimestepContext(1000)
    q = _act_quantizer(context)
    (scale,) = enable_scale_learning([q])
    x = torch.randn(4, 32)
    with context.use(torch.tensor([100, 200, 300, 400])):  # all in group 0
        q(x).pow(2).sum().backward()
    assert scale.grad[0] != 0 and scale.grad[1] == 0
    scale.grad = None
    with context.use(torch.tensor([100, 900, 100, 900])):
        q(x).sum().backward()
    assert (scale.grad != 0).all()
    disable_scale_learning([q])
    assert not q.scale.requires_grad and q.scale.grad is None


def test_qdrop_keeps_elements_float_with_the_given_probability():
    context = TimestepContext(1000)
    q = _act_quantizer(context)
    x = torch.randn(8, 1000)
    gen = torch.Generator().manual_seed(0)
    with context.use(torch.full((8,), 10)):
        quantized = q(x)
        with qdrop([q], 1.0, gen):
            assert torch.equal(q(x), x)
        with qdrop([q], 0.5, gen):
            mixed = q(x)
        assert torch.equal(q(x), quantized), "the hook is removed afterwards"
    kept = (mixed == x) & (quantized != x)
    share = kept.sum() / (quantized != x).sum()
    assert 0.45 < float(share) < 0.55
    assert torch.equal(torch.where(mixed == x, quantized, mixed), quantized)


def test_adaround_modes_and_errors():
    layer = _conv()
    (q,) = wrap_layer(layer)
    assert isinstance(q, AdaRoundQuantizer) and q.mode == "soft"
    with pytest.raises(ValueError, match="one of"):
        q.set_mode("round")
    q.freeze()
    assert q.v is None and q.round_up.dtype == torch.bool and q.binary_fraction() == 1.0
    with pytest.raises(RuntimeError, match="frozen"):
        q.set_mode("soft")
    layer.set_quant_state(weights=False, acts=False)
    assert layer.quantized_weight() is layer.weight
