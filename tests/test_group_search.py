"""Timestep groups: APQ-DM group search on synthetic and tiny UNets, and per-step scales ("per_step")."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from diffusers_ptq import (
    CalibrationSet,
    PTQConfig,
    TimestepActQuantizer,
    quantize_pipeline,
    quantize_unet,
    set_quant_state,
)
from diffusers_ptq.api import build_group_map
from diffusers_ptq.config import ActivationQuantConfig
from diffusers_ptq.initialise import act_quantizers
from diffusers_ptq.primitives import fake_quantize
from diffusers_ptq.quantizers import contiguous_group_map
from diffusers_ptq.search import FloatTargets, GroupSearch, SoftGroupMixer, soft_groups
from diffusers_ptq.search.group_init import cluster_widths
from diffusers_ptq.timestep import TimestepContext
from recipe_helpers import plain

T = 1000
DIM = 32
# Ten sampling steps whose activation range alternates between narrow and wide: contiguous groups (any G)
# mix both, so only a searched map can separate them.
STEPS = torch.tensor([950, 850, 750, 650, 550, 450, 350, 250, 150, 50])
WIDE = torch.tensor([t in (950, 750, 550, 350, 150) for t in STEPS.tolist()])
GAIN = 16.0


class ToyUNet(nn.Module):
    """One Linear layer; its input range is set by the data, so it jumps between timestep regions."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.proj = nn.Linear(DIM, DIM)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.proj(sample)


def toy_data(rows_per_step: int = 16, seed: int = 0, amplitude: torch.Tensor | None = None) -> CalibrationSet:
    gen = torch.Generator().manual_seed(seed)
    amp = torch.where(WIDE, GAIN, 1.0) if amplitude is None else amplitude
    step = torch.arange(len(STEPS)).repeat_interleave(rows_per_step)
    x = torch.randn(len(step), DIM, generator=gen) * amp[step, None]
    t = STEPS[step]
    return CalibrationSet(
        inputs={"sample": x},
        timesteps=t,
        train_timesteps=t,
        step_index=step,
        trajectory=torch.arange(len(step)) % rows_per_step,
        step_timesteps=STEPS,
        num_train_timesteps=T,
    )


def toy_config(groups: int | str, search: bool = False, **search_overrides) -> PTQConfig:
    return plain(
        weight_bits=8,
        act_bits=4,
        activations={"timestep_groups": groups, "scale_search": "minmax", "symmetric": False},
        layers={"special_layers": "same"},
        group_search={
            "enabled": search,
            "target": "float",
            "epochs": 10,
            "batch_size": 32,
            "lr": 0.1,
            **search_overrides,
        },
    )


def act_error(unet: nn.Module, data: CalibrationSet) -> float:
    """Noise-to-signal ratio of the output caused by activation quantization alone, averaged over steps.

    Per step, because every denoising step needs its own accuracy: one absolute MSE would be all wide steps.
    """
    kwargs = data.unet_kwargs(slice(None))
    with torch.no_grad():
        set_quant_state(unet, weights=False, acts=False)
        ref = unet(**kwargs)
        set_quant_state(unet, weights=False, acts=True)
        out = unet(**kwargs)
        set_quant_state(unet, weights=True, acts=True)
    ratios = [
        (out[rows] - ref[rows]).pow(2).sum() / ref[rows].pow(2).sum()
        for rows in (data.step_index == s for s in range(len(STEPS)))
    ]
    return float(torch.stack(ratios).mean())


def quantized_toy(config: PTQConfig, data: CalibrationSet) -> ToyUNet:
    return quantize_unet(ToyUNet(), config, data, batch_size=32, progress=False)


def step_groups(unet: nn.Module) -> torch.Tensor:
    return unet.proj.act_quantizers[0].group_map[STEPS]


# ------------------------------------------------------------------------------------------- group search


def test_searched_map_separates_regions_and_beats_fixed_groups():
    data = toy_data()
    searched = quantized_toy(toy_config(2, search=True), data)
    groups = step_groups(searched)
    # One group holds exactly the wide steps, the other exactly the narrow ones.
    assert len(set(groups[WIDE].tolist())) == 1 and len(set(groups[~WIDE].tolist())) == 1
    assert groups[WIDE][0] != groups[~WIDE][0]
    q = searched.proj.act_quantizers[0]
    assert q.group_mixer is None and "group_mixer" not in q.__dict__  # the soft assignment is gone
    assert searched.ptq_state.group_search["epoch_losses"]
    assert searched.ptq_state.group_search["seconds"] > 0  # target sampling and search, timed by the job

    err_search = act_error(searched, data)
    err_g1 = act_error(quantized_toy(toy_config(1), data), data)
    err_contiguous = act_error(quantized_toy(toy_config(2), data), data)
    assert err_search < 0.5 * err_g1
    assert err_search < 0.5 * err_contiguous  # contiguous groups mix both regions


def test_search_moves_wrongly_started_assignments():
    """The logits' gradient (not the initial clustering) has to fix a map that starts inverted."""
    data = toy_data()
    config = toy_config(2, search=True, init_logit=1.0)
    unet = quantized_toy(toy_config(2), data)
    search = GroupSearch(
        unet, config.group_search, STEPS, T, act_bits=4, batch_size=32, seed=0, progress=False
    )
    search.start(data)
    (mixer,) = search.mixers
    right = mixer.init_rows.clone()
    assert set(right[WIDE].tolist()) == {1} and set(right[~WIDE].tolist()) == {0}  # 0 = narrowest cluster
    wrong = 1 - right
    with torch.no_grad():
        mixer.logits.zero_()
        mixer.logits[torch.arange(len(wrong)), wrong] = 1.0
        mixer.init_rows.copy_(wrong)
    search.fit(data, FloatTargets(unet, 32), epochs=10)
    search.finish(data)
    assert torch.equal(step_groups(unet), right)


def test_mixer_mixes_candidates_per_sample_in_mixed_batches():
    ctx = TimestepContext(T)
    group_map = contiguous_group_map(T, 3)
    cfg = ActivationQuantConfig(bits=4, symmetric=False, scale_search="minmax")
    q = TimestepActQuantizer(cfg, ctx, group_map, name="q")
    q.scale.copy_(torch.tensor([0.05, 0.2, 1.0]))
    q.zero_point.copy_(torch.tensor([8.0, 7.0, 3.0]))
    row_of = build_group_map("per_step", T, STEPS)
    mixer = SoftGroupMixer(q, row_of, torch.zeros(len(STEPS), dtype=torch.long), init_logit=0.0)
    with torch.no_grad():
        mixer.logits.copy_(torch.randn(len(STEPS), 3, generator=torch.Generator().manual_seed(0)))
    soft_groups.attach(q, mixer)
    x = torch.randn(4, 5, 6)
    t = torch.tensor([950, 50, 450, 950])
    with ctx.use(t):
        out = q(x)
    for i in range(4):
        sigma = mixer.logits[row_of[t[i]]].softmax(-1)
        expected = sum(
            sigma[g] * fake_quantize(x[i], q.scale[g], q.zero_point[g], q.qmin, q.qmax) for g in range(3)
        )
        torch.testing.assert_close(out[i], expected)
    out.sum().backward()
    assert mixer.logits.grad[row_of[t]].abs().sum() > 0  # rows in the batch get gradient
    assert mixer.logits.grad[row_of[torch.tensor(650)]].abs().sum() == 0  # rows not in it do not
    soft_groups.detach(q)
    with ctx.use(t):
        hard = q(x)
    g = group_map[t].reshape(-1, 1, 1)
    torch.testing.assert_close(hard, fake_quantize(x, q.scale[g], q.zero_point[g], q.qmin, q.qmax))


@pytest.mark.parametrize(("qmin", "qmax"), [(0, 15), (-8, 7)])
def test_mixer_gradients_match_autograd_through_fake_quantize(qmin, qmax):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 5, generator=gen) * 3).requires_grad_()  # wide enough to clip in some groups
    logits = torch.randn(3, 4, generator=gen, dtype=torch.float32).requires_grad_()
    log_scale = torch.zeros(4, requires_grad=True)
    base = torch.tensor([0.1, 0.3, 0.6, 1.2])
    zp = torch.tensor([8.0, 7.0, 3.0, 0.0]) if qmin == 0 else torch.zeros(4)
    upstream = torch.randn(3, 4, 5, generator=gen)

    def run(fused: bool):
        probs, scales = logits.softmax(-1), base * log_scale.exp()
        if fused:
            out = soft_groups._MixedFakeQuant.apply(x, probs, scales, zp, qmin, qmax)
        else:
            out = sum(
                probs[:, g].reshape(-1, 1, 1) * fake_quantize(x, scales[g], zp[g], qmin, qmax)
                for g in range(4)
            )
        grads = torch.autograd.grad((out * upstream).sum(), (x, logits, log_scale))
        return out.detach(), grads

    out_fused, grads_fused = run(True)
    out_ref, grads_ref = run(False)
    torch.testing.assert_close(out_fused, out_ref)
    for got, want in zip(grads_fused, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cluster_widths_orders_clusters_and_handles_few_values():
    widths = torch.tensor([1.0, 30.0, 1.1, 32.0, 0.9, 300.0])
    labels = cluster_widths(widths, 3)
    assert labels.tolist() == [0, 1, 0, 1, 0, 2]
    assert cluster_widths(torch.tensor([2.0, 2.0]), 4).tolist() == [0, 0]


def test_group_search_on_tiny_pipeline_saves_and_loads(ddim_pipe, tmp_path):
    config = PTQConfig(
        weights={"num_candidates": 20},
        activations={"timestep_groups": 4, "num_candidates": 20},
        group_search={"enabled": True, "target": "noise", "num_images": 8, "epochs": 2, "batch_size": 8},
    )
    quantize_pipeline(ddim_pipe, config, num_samples=16, num_inference_steps=8, batch_size=8, progress=False)
    unet = ddim_pipe.unet
    maps = {tuple(q.group_map.tolist()) for q in act_quantizers(unet)}
    assert len(maps) > 1  # each quantizer has its own searched map
    assert all(q.group_mixer is None for q in act_quantizers(unet))
    assert all(not p.requires_grad or p.grad is None for p in unet.parameters())
    summary = unet.ptq_state.group_search
    assert len(summary["epoch_losses"]) == 2 and len(summary["final_step_entropy"]) == 8

    from diffusers import UNet2DModel

    x, t = torch.randn(2, 3, 16, 16), torch.tensor([900, 30])
    with torch.no_grad():
        before = unet(x, t).sample
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DModel.from_pretrained(tmp_path / "unet")
    for a, b in zip(act_quantizers(unet), act_quantizers(loaded)):
        assert torch.equal(a.group_map, b.group_map)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, before, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"activations": {"timestep_groups": "per_step"}}, "group_search.enabled"),
        ({"act_bits": None}, "group_search.enabled"),
        ({"calibration": {"selector": "active"}, "group_search": {"enabled": False}}, "calibration.selector"),
    ],
)
def test_search_config_combinations_are_rejected(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        PTQConfig(group_search={"enabled": True}, activations={"timestep_groups": 4}).replace(**overrides)


def test_noise_target_needs_an_unconditional_pipeline(sd_pipe, prompts):
    config = PTQConfig(activations={"timestep_groups": 2}, group_search={"enabled": True, "target": "noise"})
    calls = []
    sd_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"group_search\.target='noise'.*'float'"):
        quantize_pipeline(
            sd_pipe, config, prompts=prompts, num_samples=4, num_inference_steps=4, progress=False
        )
    assert not calls  # rejected before any model ran
    with pytest.raises(ValueError, match=r"group_search\.target='noise'"):
        quantize_unet(ToyUNet(), toy_config(2, search=True, target="noise"), toy_data(), progress=False)


# ------------------------------------------------------------------------------------------ per-step scales


def test_per_step_gives_each_step_the_scale_of_its_own_data():
    amplitude = torch.linspace(0.5, 12.0, len(STEPS))  # a different range at every step
    data = toy_data(amplitude=amplitude)
    unet = quantized_toy(toy_config("per_step"), data)
    q = unet.proj.act_quantizers[0]
    assert q.num_groups == len(STEPS)
    groups = q.group_map[STEPS]
    assert groups.tolist() == list(range(len(STEPS)))
    x = data.inputs["sample"]
    for s in range(len(STEPS)):
        rows = x[data.step_index == s]
        lo, hi = min(float(rows.min()), 0.0), max(float(rows.max()), 0.0)
        assert float(q.scale[groups[s]]) == pytest.approx((hi - lo) / (q.qmax - q.qmin), rel=1e-5)
    err_per_step = act_error(unet, data)
    err_g1 = act_error(quantized_toy(toy_config(1), data), data)
    assert err_per_step < 0.5 * err_g1


def test_per_step_merges_steps_sharing_a_timestep():
    # PNDM repeats a timestep; Karras sigmas can collide once rounded to training timesteps.
    steps = torch.tensor([981.0, 961.0, 961.0, 941.0, 20.2, 19.8])
    group_map = build_group_map("per_step", T, steps)
    assert int(group_map.max()) + 1 == 4
    assert group_map[torch.tensor([981, 961, 941, 20])].tolist() == [0, 1, 2, 3]
    step = torch.arange(len(steps))
    t = steps.round().long()
    data = CalibrationSet(
        inputs={"sample": torch.randn(len(steps), DIM)},
        timesteps=t,
        train_timesteps=t,
        step_index=step,
        trajectory=torch.zeros(len(steps), dtype=torch.long),
        step_timesteps=steps,
        num_train_timesteps=T,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group is left without samples, so nothing is borrowed
        unet = quantize_unet(ToyUNet(), toy_config("per_step"), data, progress=False)
    assert unet.ptq_state.borrowed_groups == []


@pytest.mark.parametrize("target", ["noise", "float"])
def test_a_batch_split_in_parts_weighted_by_share_gives_the_whole_batch_gradient(
    ddim_pipe, monkeypatch, target
):
    """What each rank of a process group computes (its contiguous part of the global batch, the loss weighted
    by the part's share, the noise target's draws made for the whole batch): the parts' gradients and
    (MSE, entropy) add up to the whole batch's, to float summation order. In float64: in float32 a
    convolution's result can depend on the batch size in its last bit (kernel choice, CPU-dependent), enough
    to move an activation across a rounding boundary of its fake quantizer, a change of one quantization
    step that is not summation order."""
    checked = []
    original = GroupSearch._step

    def step(search: GroupSearch, data, targets, index, lr):
        if not checked:
            params = [p for m in search.mixers for p in m.parameters()]
            state = search.generator.get_state()
            kwargs, target_ = targets.batch(data, index, search.generator)
            search.optimizer.zero_grad(set_to_none=True)
            whole = search._loss(kwargs, target_, 1.0)
            grads = [p.grad.clone() for p in params]
            search.optimizer.zero_grad(set_to_none=True)
            parts = torch.zeros(2)
            for keep in (torch.arange(0, 3), torch.arange(3, len(index))):
                search.generator.set_state(state)
                kwargs, target_ = targets.batch(data, index, search.generator, keep)
                parts += search._loss(kwargs, target_, len(keep) / len(index))
            torch.testing.assert_close(parts, whole, rtol=1e-5, atol=0)
            for p, g in zip(params, grads):
                torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
            search.optimizer.zero_grad(set_to_none=True)
            search.generator.set_state(state)
            checked.append(len(index))
        return original(search, data, targets, index, lr)

    monkeypatch.setattr(GroupSearch, "_step", step)
    config = plain(
        activations={"timestep_groups": 2},
        group_search={"enabled": True, "target": target, "num_images": 4, "epochs": 1, "batch_size": 7},
    )
    ddim_pipe.unet.to(torch.float64)
    quantize_pipeline(ddim_pipe, config, num_samples=16, num_inference_steps=8, batch_size=8, progress=False)
    assert checked == [7]
