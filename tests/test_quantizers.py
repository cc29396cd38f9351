"""Weight and timestep-aware activation quantizers, group maps, the observer and TimestepContext."""

from __future__ import annotations

import pytest
import torch

from diffusers_ptq.config import ActivationQuantConfig, WeightQuantConfig
from diffusers_ptq.primitives import qrange
from diffusers_ptq.quantizers import (
    TimestepActQuantizer,
    WeightQuantizer,
    contiguous_group_map,
    nearest_step_group_map,
)
from diffusers_ptq.timestep import TimestepContext

T = 1000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- weights

CHANNEL_MAGNITUDES = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0, 0.5])


def _conv_weight(seed: int = 0) -> torch.Tensor:
    w = torch.randn(6, 3, 3, 3, generator=_gen(seed))
    return w * CHANNEL_MAGNITUDES.reshape(-1, 1, 1, 1)


def _channel_mse(w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    return (w - w_hat).pow(2).reshape(w.shape[0], -1).mean(dim=1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("search", ["minmax", "mse", "percentile"])
def test_per_channel_conv_weight_one_scale_per_out_channel(symmetric, search):
    w = _conv_weight()
    cfg = WeightQuantConfig(bits=4, granularity="per_channel", symmetric=symmetric, scale_search=search)
    wq = WeightQuantizer(cfg, out_channels=6)
    assert wq.scale.shape == (6,) and wq.zero_point.shape == (6,)
    assert not wq.calibrated
    wq.calibrate(w)
    assert wq.calibrated
    assert wq.scale.shape == (6,)
    assert (wq.scale > 0).all()
    # Scales follow the channels' magnitudes (which span 10^4; 27 values per channel are noisy).
    ratio = wq.scale / CHANNEL_MAGNITUDES
    assert ratio.max() / ratio.min() < 5.0
    if symmetric:
        assert torch.equal(wq.zero_point, torch.zeros(6))
    else:
        assert torch.equal(wq.zero_point, wq.zero_point.round())
    out = wq(w)
    assert out.shape == w.shape and out.dtype == w.dtype
    codes = out / wq.scale.reshape(-1, 1, 1, 1) + wq.zero_point.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    qmin, qmax = qrange(4, symmetric)
    assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_beats_per_tensor_on_mixed_magnitudes(symmetric):
    w = _conv_weight(1)
    per_ch = WeightQuantizer(
        WeightQuantConfig(bits=4, granularity="per_channel", symmetric=symmetric, scale_search="minmax"), 6
    )
    per_t = WeightQuantizer(
        WeightQuantConfig(bits=4, granularity="per_tensor", symmetric=symmetric, scale_search="minmax"), 6
    )
    per_ch.calibrate(w)
    per_t.calibrate(w)
    assert per_t.scale.shape == (1,)
    err_ch = _channel_mse(w, per_ch(w))
    err_t = _channel_mse(w, per_t(w))
    small = CHANNEL_MAGNITUDES < 10
    # The per-tensor step (set by the 100x channel) wipes out the small channels.
    assert (err_ch[small] < 0.1 * err_t[small]).all()
    assert (err_ch <= err_t * 1.0001 + 1e-12).all()
    assert err_ch.sum() < err_t.sum()


def test_per_tensor_linear_weight_scale_from_global_extremes():
    w = torch.randn(5, 7, generator=_gen(2))
    wq = WeightQuantizer(WeightQuantConfig(bits=8, granularity="per_tensor", scale_search="minmax"), 5)
    wq.calibrate(w)
    torch.testing.assert_close(wq.scale, w.abs().max().reshape(1) / 127)
    assert (wq(w) - w).abs().max() <= wq.scale / 2 + 1e-6


def test_weight_quantizer_disabled_is_identity():
    w = _conv_weight(3)
    wq = WeightQuantizer(WeightQuantConfig(bits=2), 6)
    wq.calibrate(w)
    assert not torch.equal(wq(w), w)
    wq.enabled = False
    out = wq(w)
    assert torch.equal(out, w)


def test_weight_quantizer_keeps_dtype_and_buffers_in_state_dict():
    w = _conv_weight(4).to(torch.bfloat16)
    wq = WeightQuantizer(WeightQuantConfig(bits=8), 6)
    wq.calibrate(w)
    assert wq(w).dtype == torch.bfloat16
    state = wq.state_dict()
    assert set(state) == {"scale", "zero_point"}
    fresh = WeightQuantizer(WeightQuantConfig(bits=8), 6)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(w), wq(w))


# ---------------------------------------------------------------------------------------- group maps


def test_contiguous_group_map_eight_equal_groups():
    gm = contiguous_group_map(T, 8)
    assert gm.shape == (T,)
    assert torch.equal(torch.bincount(gm), torch.full((8,), 125))
    assert (gm.diff() >= 0).all()  # contiguous, increasing with t
    assert gm[0] == 0 and gm[-1] == 7
    assert gm[124] == 0 and gm[125] == 1 and gm[875] == 7


def test_contiguous_group_map_uneven_and_single():
    gm = contiguous_group_map(T, 3)
    counts = torch.bincount(gm)
    assert counts.numel() == 3 and int(counts.sum()) == T
    assert int(counts.max() - counts.min()) <= 1
    assert (gm.diff() >= 0).all()
    assert torch.equal(contiguous_group_map(10, 1), torch.zeros(10, dtype=gm.dtype))
    assert torch.equal(contiguous_group_map(4, 4), torch.arange(4))


def test_nearest_step_group_map_maps_steps_to_their_index():
    steps = torch.arange(0, T, 20).flip(0) + 1  # 981, 961, ..., 1
    gm = nearest_step_group_map(T, steps)
    assert gm.shape == (T,)
    assert torch.equal(gm[steps], torch.arange(len(steps)))
    assert int(gm.min()) == 0 and int(gm.max()) == len(steps) - 1
    assert (gm.diff() <= 0).all()  # descending schedule: larger t -> earlier step index
    # Every training timestep joins a nearest step.
    t = torch.arange(T)
    dist = (t - steps[gm]).abs()
    best = (t[:, None] - steps[None, :]).abs().min(dim=1).values
    assert torch.equal(dist, best)


def test_nearest_step_group_map_float_steps():
    steps = torch.tensor([999.0, 666.4, 333.2, 0.0])
    gm = nearest_step_group_map(T, steps)
    assert gm[999] == 0 and gm[666] == 1 and gm[333] == 2 and gm[0] == 3
    assert gm[900] == 0 and gm[500] == 1 and gm[100] == 3


# --------------------------------------------------------------------------------- activation quantizer


def _act_quantizer(
    groups: int = 2, search: str = "minmax", symmetric: bool = True, bits: int = 8, **kwargs
) -> tuple[TimestepActQuantizer, TimestepContext]:
    ctx = TimestepContext(T)
    cfg = ActivationQuantConfig(bits=bits, symmetric=symmetric, scale_search=search, observer_samples=4096)
    q = TimestepActQuantizer(cfg, ctx, contiguous_group_map(T, groups), name="down_blocks.0.conv1", **kwargs)
    return q, ctx


def _observe(q, ctx, data_by_timestep, seed: int = 0) -> list[int]:
    q.start_observing(_gen(seed))
    for t, x in data_by_timestep:
        with ctx.use(torch.full((x.shape[0],), t)):
            out = q(x)
            assert out is x  # observing passes the input through untouched
    return q.finish_observing()


@pytest.mark.parametrize(("search", "symmetric"), [("minmax", True), ("minmax", False), ("mse", True)])
def test_scales_differ_per_timestep_group(search, symmetric):
    q, ctx = _act_quantizer(groups=2, search=search, symmetric=symmetric)
    assert q.num_groups == 2
    gen = _gen(1)
    small = torch.rand(4, 8, 16, generator=gen) * 2 - 1  # range 2
    big = (torch.rand(4, 8, 16, generator=gen) * 2 - 1) * 8  # range 16
    empty = _observe(q, ctx, [(100, small), (900, big), (300, small), (700, big)])
    assert empty == []
    ratio = (q.scale[1] / q.scale[0]).item()
    assert ratio == pytest.approx(8.0, rel=0.1)
    if search == "minmax":
        if symmetric:
            expected = small.abs().max().item() / q.qmax
        else:
            expected = (small.max() - small.min()).item() / (q.qmax - q.qmin)
        assert q.scale[0].item() == pytest.approx(expected, rel=1e-5)


def test_mixed_batch_uses_each_samples_group():
    q, ctx = _act_quantizer(groups=2, search="minmax", symmetric=False, bits=4)
    gen = _gen(2)
    small = torch.rand(3, 5, 7, generator=gen) * 2 - 1
    big = (torch.rand(3, 5, 7, generator=gen) * 2 - 0.5) * 10
    _observe(q, ctx, [(50, small), (950, big)])
    assert not torch.isclose(q.scale[0], q.scale[1])
    x = torch.stack([small[0], big[0], small[1], big[1]])
    with ctx.use(torch.tensor([50, 950, 200, 600])):
        mixed = q(x)
    alone = []
    for sample, t in zip(x, [50, 950, 200, 600], strict=True):
        with ctx.use(torch.tensor([t])):
            alone.append(q(sample[None])[0])
    torch.testing.assert_close(mixed, torch.stack(alone), rtol=0, atol=0)
    # Using one group's scale for everything would give a different (worse) result.
    with ctx.use(torch.tensor([950])):
        one_scale = q(x)
    assert not torch.equal(one_scale, mixed)
    assert (mixed[0] - x[0]).abs().max() < (one_scale[0] - x[0]).abs().max()


def test_leading_dim_multiple_of_unet_batch_repeats_timesteps():
    q, ctx = _act_quantizer(groups=2, search="minmax")
    gen = _gen(3)
    small = torch.rand(2, 16, generator=gen) * 2 - 1
    big = (torch.rand(2, 16, generator=gen) * 2 - 1) * 8
    _observe(q, ctx, [(10, small), (990, big)])
    # Attention-style (batch * heads, ...) input: 2 heads per sample.
    x = torch.cat([small, big])  # rows 0,1 belong to sample 0 (t=10), rows 2,3 to sample 1 (t=990)
    with ctx.use(torch.tensor([10, 990])):
        out = q(x)
        assert torch.equal(q.groups_for(x), torch.tensor([0, 0, 1, 1]))
    with ctx.use(torch.tensor([10])):
        expected_small = q(small)
    with ctx.use(torch.tensor([990])):
        expected_big = q(big)
    torch.testing.assert_close(out, torch.cat([expected_small, expected_big]), rtol=0, atol=0)
    with ctx.use(torch.tensor([10, 990])), pytest.raises(RuntimeError, match="batch"):
        q(torch.zeros(3, 4))


def test_empty_group_borrows_nearest_observed_and_is_reported():
    q, ctx = _act_quantizer(groups=4, search="minmax")
    gen = _gen(4)
    a = torch.rand(2, 32, generator=gen) * 2 - 1
    b = (torch.rand(2, 32, generator=gen) * 2 - 1) * 5
    # Groups of 250: t=100 -> group 0, t=900 -> group 3; groups 1 and 2 see nothing.
    empty = _observe(q, ctx, [(100, a), (900, b)])
    assert empty == [1, 2]
    assert q.scale[1] == q.scale[0]  # group 1 is nearest to group 0
    assert q.scale[2] == q.scale[3]  # group 2 is nearest to group 3
    assert q.scale[0] != q.scale[3]
    assert torch.equal(q.zero_point[1], q.zero_point[0])
    assert q.observer is None


def test_empty_group_tie_goes_to_lower_group():
    q, ctx = _act_quantizer(groups=3, search="minmax")
    gen = _gen(5)
    a = torch.rand(2, 32, generator=gen)
    b = torch.rand(2, 32, generator=gen) * 7
    empty = _observe(q, ctx, [(10, a), (990, b)])
    assert empty == [1]
    assert q.scale[1] == q.scale[0]


def test_finish_without_observations_or_start_raises():
    q, _ = _act_quantizer()
    with pytest.raises(RuntimeError, match="start_observing"):
        q.finish_observing()
    q.start_observing()
    with pytest.raises(RuntimeError, match="no calibration activations"):
        q.finish_observing()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_observation_names_quantizer_and_timestep(bad):
    q, ctx = _act_quantizer(groups=2)
    q.start_observing(_gen())
    x = torch.randn(2, 4, 4, generator=_gen(6))
    x[1, 2, 3] = bad
    with ctx.use(torch.tensor([123, 877])), pytest.raises(FloatingPointError) as info:
        q(x)
    msg = str(info.value)
    assert "down_blocks.0.conv1" in msg
    assert "877" in msg
    assert "123" not in msg  # the finite sample's timestep is not blamed


def test_outside_context_raises_helpful_runtime_error():
    q, ctx = _act_quantizer()
    _observe(q, ctx, [(100, torch.randn(2, 8, generator=_gen(7)))])
    with pytest.raises(RuntimeError, match=r"outside a UNet forward") as info:
        q(torch.randn(2, 8))
    assert "context.use" in str(info.value)
    q.start_observing()
    with pytest.raises(RuntimeError, match="outside a UNet forward"):
        q(torch.randn(2, 8))
    # The context is restored after use().
    with ctx.use(torch.tensor([5])):
        pass
    assert ctx.timesteps is None


def test_disabled_activation_quantizer_is_identity():
    q, ctx = _act_quantizer(bits=2)
    x = torch.randn(2, 8, generator=_gen(8))
    _observe(q, ctx, [(100, x)])
    with ctx.use(torch.tensor([100, 100])):
        assert not torch.equal(q(x), x)
        q.enabled = False
        assert torch.equal(q(x), x)


@pytest.mark.parametrize("config_symmetric", [True, False])
@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_unsigned_quantizer_has_zero_point_zero(config_symmetric, search):
    q, ctx = _act_quantizer(groups=2, search=search, symmetric=config_symmetric, bits=8, unsigned=True)
    assert q.symmetric is False
    assert (q.qmin, q.qmax) == (0, 255)
    gen = _gen(9)
    probs = torch.softmax(torch.randn(4, 16, 16, generator=gen) * 3, dim=-1)
    empty = _observe(q, ctx, [(100, probs), (800, probs * 0.5)])
    assert empty == []
    assert torch.equal(q.zero_point, torch.zeros(2))
    if search == "minmax":
        torch.testing.assert_close(q.scale[0], probs.max() / 255)
    with ctx.use(torch.tensor([100] * 4)):
        out = q(probs)
    assert out.min() >= 0
    assert (out - probs).abs().max() <= q.scale[0] / 2 + 1e-6


@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_unsigned_range_starts_at_zero_even_with_negative_inputs(search):
    q, ctx = _act_quantizer(groups=1, search=search, symmetric=False, bits=8, unsigned=True)
    x = torch.rand(4, 64, generator=_gen(13)) - 0.2  # a few negatives
    _observe(q, ctx, [(100, x)])
    assert q.zero_point.item() == 0
    with ctx.use(torch.tensor([100] * 4)):
        out = q(x)
    assert out.min().item() == 0.0  # negatives clip to 0


def test_bits_override_and_repr():
    ctx = TimestepContext(T)
    q = TimestepActQuantizer(
        ActivationQuantConfig(bits=4), ctx, contiguous_group_map(T, 4), bits=16, unsigned=True, name="sm"
    )
    assert q.bits == 16 and q.qmax == 65535
    assert q.num_groups == 4
    text = repr(q)
    assert "bits=16" in text and "unsigned" in text and "groups=4" in text
    assert set(q.state_dict()) == {"group_map", "scale", "zero_point"}


def test_activation_quantizer_preserves_dtype():
    q, ctx = _act_quantizer(groups=1)
    x = torch.randn(2, 8, generator=_gen(10))
    _observe(q, ctx, [(500, x)])
    with ctx.use(torch.tensor([500, 500])):
        out = q(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------- timestep context

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("timestep", "batch", "expected"),
    [
        (torch.tensor(500), 4, [500, 500, 500, 500]),
        (torch.tensor([500]), 3, [500, 500, 500]),
        (torch.tensor([1, 2, 3]), 3, [1, 2, 3]),
        (7, 2, [7, 7]),
        (978.6, 2, [979, 979]),
        (torch.tensor(978.6), 1, [979]),
        (torch.tensor([978.6, 3.2]), 2, [979, 3]),
        (torch.tensor(12.4, dtype=torch.float64), 2, [12, 12]),
        (1500, 2, [999, 999]),
        (torch.tensor([2000.0, -5.0]), 2, [999, 0]),
        (-3, 1, [0]),
        (999.7, 1, [999]),
    ],
)
def test_to_training_timesteps(timestep, batch, expected):
    ctx = TimestepContext(T)
    out = ctx.to_training_timesteps(timestep, batch, CPU)
    assert out.dtype == torch.long
    assert out.shape == (batch,)
    assert out.tolist() == expected


def test_to_training_timesteps_mismatched_length_raises():
    ctx = TimestepContext(T)
    with pytest.raises(ValueError, match="3 values"):
        ctx.to_training_timesteps(torch.tensor([1, 2, 3]), 2, CPU)
    with pytest.raises(ValueError, match="batch"):
        ctx.to_training_timesteps([1, 2], 4, CPU)


def test_timestep_context_rejects_bad_num_train_timesteps():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        TimestepContext(0)


def test_context_use_sets_clamps_and_restores():
    ctx = TimestepContext(T)
    with ctx.use(torch.tensor([[5], [2000]])):
        assert ctx.timesteps.tolist() == [5, 999]
        assert ctx.per_sample(4).tolist() == [5, 5, 999, 999]
        with ctx.use(torch.tensor(7)):
            assert ctx.per_sample(3).tolist() == [7, 7, 7]
        assert ctx.timesteps.tolist() == [5, 999]
        with pytest.raises(RuntimeError, match="batch 3"):
            ctx.per_sample(3)
    assert ctx.timesteps is None
    with pytest.raises(RuntimeError, match=r"context\.use"):
        ctx.per_sample(1)
