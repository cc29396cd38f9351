"""reconstruct(): lower block loss, resume = uninterrupted run, budget, progress, save/load, errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel

import diffusers_ptq
from diffusers_ptq import reconstruct, set_quant_state
from diffusers_ptq.quantizers import TimestepActQuantizer
from diffusers_ptq.reconstruction import ReconstructionConfig, reconstruction_units, runner
from diffusers_ptq.reconstruction.budget import Budget
from diffusers_ptq.reconstruction.trainer import Phase, train_unit
from diffusers_ptq.tiny import tiny_unet2d
from reconstruction_helpers import fast_config, full_cache, quantized

ROWS = 6
FAST = {"iterations": 6, "act_iterations": 3, "cache_batch_size": ROWS}


def _inputs(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(3, cfg.in_channels, 8, 8, generator=gen)
    return x, torch.tensor([900, 450, 30])


def _output(unet, seed=0):
    with torch.no_grad():
        return unet(*_inputs(unet, seed)).sample


def _state(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_lowers_the_block_loss_and_settles_the_rounding():
    unet, data = quantized("unet2d", rows=ROWS)
    config = fast_config(weight_lr=3e-2)
    unit = next(u for u in reconstruction_units(unet, config, data) if u.name == "down_blocks.1.resnets.0")
    cache = full_cache(unet, unit, data, ROWS, False)
    phase = Phase("weights", True, False, False, 2.0, 0.0)
    result = train_unit(unet, cache, phase, config, 300, progress=False)
    assert result.iterations == 300
    # Hard-rounded block loss (round-to-nearest before) falls severalfold, and h(V) has settled on 0/1.
    assert result.loss_after < 0.5 * result.loss_before, (result.loss_before, result.loss_after)
    assert result.rounding_binary > 0.99


def test_sequential_reconstruction_brings_the_unet_closer_to_float():
    unet, data = quantized("unet2d", rows=ROWS)
    set_quant_state(unet, weights=False, acts=False)
    reference = _output(unet)
    set_quant_state(unet, weights=True, acts=True)
    before = (_output(unet) - reference).pow(2).mean()
    scales = {n: m.scale.clone() for n, m in unet.named_modules() if isinstance(m, TimestepActQuantizer)}
    grads = [p.requires_grad for p in unet.parameters()]
    report = reconstruct(
        unet, data, fast_config(iterations=30, act_iterations=5, cache_batch_size=ROWS), progress=False
    )
    after = (_output(unet) - reference).pow(2).mean()
    assert after < before
    weights = [u for u in report.units if u.phase == "weights"]
    assert [u.phase for u in report.units] == ["weights"] * len(weights) + ["acts"] * len(weights)
    assert sum(u.loss_after < u.loss_before for u in weights) >= 0.8 * len(weights)
    # A unit whose held-out loss did not go down is reverted (test_reconstruction_safeguard.py).
    assert all(u.iterations == 30 and u.status in ("trained", "reverted") for u in weights)
    changed = {
        n
        for n, m in unet.named_modules()
        if isinstance(m, TimestepActQuantizer) and not torch.equal(m.scale, scales[n])
    }
    owners = {u.name: u.act_quantizers for u in reconstruction_units(unet, fast_config(), data)}
    acts = [u for u in report.units if u.phase == "acts"]
    assert any(u.status == "trained" for u in acts)
    for u in acts:  # LSQ moved the step sizes of every unit that kept them, and of no reverted one
        assert all((q in changed) == (u.status == "trained") for q in owners[u.unit]), u.unit
    assert [p.requires_grad for p in unet.parameters()] == grads and not unet.training
    assert "weights" in str(report) and report.rows == ROWS


def test_joint_fine_grained_qdrop_and_temporal_block():
    unet, data = quantized("unet2d", rows=ROWS)
    config = fast_config(
        **FAST,
        optimization="joint",
        layer_loss_weight=0.8,
        qdrop_prob=0.5,
        temporal_block=True,
        weight_lr_schedule="cosine",
        round_weight=0.0,
    )
    report = reconstruct(unet, data, config, progress=False)
    kinds = [u.kind for u in report.units]
    assert {u.phase for u in report.units} == {"joint"} and kinds.count("temporal") == 1
    assert kinds.index("temporal") < kinds.index("resnet")
    assert all(u.loss_after is not None for u in report.units)


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    config = fast_config(**FAST)
    reference, data = quantized("unet2d", rows=ROWS)
    expected = reconstruct(reference, data, config, progress=False)

    unet, data = quantized("unet2d", rows=ROWS)
    original = _state(unet)
    calls = {"n": 0}
    real = runner.train_unit

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 22:  # inside the activation pass
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(unet, data, config, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert _same_state(_state(unet), original), "an interrupted run leaves the UNet exactly as it was"
    manifest = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    assert len(manifest["finished"]) == 21
    monkeypatch.setattr(runner, "train_unit", real)

    resumed = reconstruct(
        unet, data, config.replace(max_minutes=60.0), checkpoint_dir=tmp_path / "ckpt", progress=False
    )
    stored = ["reverted" if u.status == "reverted" else "resumed" for u in expected.units[:21]]
    assert [u.status for u in resumed.units] == stored + [u.status for u in expected.units[21:]]
    assert [u.loss_after for u in resumed.units] == [u.loss_after for u in expected.units]
    assert _same_state(_state(unet), _state(reference))
    assert torch.equal(_output(unet), _output(reference))


def test_checkpoint_of_another_run_is_refused(tmp_path):
    unet, data = quantized("unet2d", rows=ROWS)
    config = fast_config(**FAST, learn_act_scales=False)
    reconstruct(unet, data, config, checkpoint_dir=tmp_path, progress=False)
    other, data = quantized("unet2d", rows=ROWS)
    with pytest.raises(ValueError, match=r"belongs to another run \(config.iterations differ\)"):
        reconstruct(other, data, config.replace(iterations=7), checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "progress.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the reconstruction checkpoint"):
        reconstruct(other, data, config, checkpoint_dir=tmp_path, progress=False)


def test_budget_divides_iterations_by_configured_share(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr("diffusers_ptq.reconstruction.budget.time.monotonic", lambda: clock["t"])
    budget = Budget(max_minutes=1.0, total_weight=400, units=3)  # 60 s; weights 100, 100, 200
    assert budget.iterations(100, 100, seconds_per_step=0.01) == 100  # a 15 s share fits 1500: capped
    clock["t"] = 6.0
    budget.spend(100, overhead_seconds=2.0)  # 2 s of caching per unit: 2 s set aside for the last one
    assert budget.share(100) == pytest.approx((54.0 - 2.0) * 100 / 300)
    assert budget.iterations(10**6, 100, seconds_per_step=0.01) == 1733
    budget.spend(100, overhead_seconds=4.0)
    clock["t"] = 30.0  # the last unit gets everything left: nothing more to set aside
    assert budget.share(200) == pytest.approx(30.0)
    clock["t"] = 61.0
    assert budget.exhausted() and budget.iterations(1000, 200, seconds_per_step=0.01) == 0
    assert Budget(None, 1, 1).iterations(7, 7, 10.0) == 7


def test_max_minutes_caps_the_run():
    unet, data = quantized("unet2d", rows=ROWS)
    config = fast_config(iterations=10**6, act_iterations=10**6, cache_batch_size=ROWS, max_minutes=0.02)
    report = reconstruct(unet, data, config, progress=False)
    ran = [u for u in report.units if u.status in ("trained", "reverted")]
    assert all(u.iterations < 10**6 for u in report.units)
    assert sum(u.iterations for u in ran) > 0
    assert report.seconds < 0.02 * 60 + 20  # the budget plus caching and evaluation overheads


def test_progress_bar_names_the_block_and_shows_the_loss(capsys):
    unet, data = quantized("unet2d", rows=ROWS)
    reconstruct(
        unet, data, fast_config(iterations=3, cache_batch_size=ROWS, learn_act_scales=False), progress=True
    )
    err = capsys.readouterr().err
    assert "weights 1/" in err and "time_embedding.linear_1" in err and "loss=" in err and "cache " in err


def test_reconstructed_unet_saves_and_loads_bit_exact(tmp_path):
    unet, data = quantized("unet2d", rows=ROWS)
    keys = list(unet.state_dict())
    conv = unet.get_submodule("down_blocks.1.resnets.0.conv1")
    nearest = conv.quantized_weight().detach().clone()
    reconstruct(unet, data, fast_config(**FAST), progress=False)
    assert list(unet.state_dict()) == keys, "no AdaRound state is left in the model"
    assert not torch.equal(conv.quantized_weight(), nearest), "the learned rounding differs from nearest"
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DModel.from_pretrained(tmp_path / "unet")
    for seed in (0, 1):
        assert torch.equal(_output(loaded, seed), _output(unet, seed))
    with pytest.raises(ValueError, match="already on its integer grid"):
        reconstruct(loaded, data, fast_config(**FAST), progress=False)


def test_bad_inputs_fail_clearly():
    unet, data = quantized("unet2d", rows=ROWS)
    with pytest.raises(ValueError, match="quantized by diffusers-ptq"):
        reconstruct(tiny_unet2d(sample_size=8), data, progress=False)
    with pytest.raises(TypeError, match="config must be a ReconstructionConfig"):
        reconstruct(unet, data, {"iterations": 3}, progress=False)
    with pytest.raises(TypeError, match="calibration_set must be a CalibrationSet"):
        reconstruct(unet, data.unet_kwargs(slice(None)), progress=False)
    with pytest.raises(ValueError, match=r"reconstruction.batch_size=0 is invalid"):
        reconstruct(unet, data, ReconstructionConfig(batch_size=0), progress=False)
    assert diffusers_ptq.reconstruct is reconstruct and "ReconstructionConfig" in diffusers_ptq.__all__


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_stable_diffusion_presets_run_end_to_end(kind):
    for config in (
        fast_config(**FAST),
        fast_config(**FAST, optimization="joint", layer_loss_weight=0.8, qdrop_prob=0.5, temporal_block=True),
    ):
        unet, data = quantized(kind, rows=ROWS)
        report = reconstruct(unet, data, config, progress=False)
        # Every unit runs; one whose held-out loss did not fall reverts to its starting point.
        assert all(u.status in ("trained", "reverted") for u in report.units)
        assert any(u.status == "trained" for u in report.units)
