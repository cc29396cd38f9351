"""Reconstruction in quantize_pipeline / quantize_unet: config wiring and resume.

Failures restoring the UNet are tested in test_restore_on_failure.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffusers_ptq import PTQConfig, quantize_pipeline, quantize_unet
from diffusers_ptq.reconstruction import runner
from diffusers_ptq.reconstruction.inputs import weights_on_grid
from diffusers_ptq.tiny import tiny_unet2d
from recipe_helpers import plain
from reconstruction_helpers import calibration_set

FAST = {"num_samples": 12, "num_inference_steps": 6, "batch_size": 6, "progress": False}
RECON = {
    "enabled": True,
    "iterations": 6,
    "act_iterations": 4,
    "batch_size": 4,
    "cache_dtype": "float32",
    "cache_batch_size": 6,
}


def _config(**reconstruction) -> PTQConfig:
    return plain(
        weight_bits=4,
        act_bits=8,
        weights={"num_candidates": 10, "symmetric": False},
        activations={"num_candidates": 10, "timestep_groups": 2},
        reconstruction={**RECON, **reconstruction},
    )


def _output(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([700, 40])).sample


def _fresh(pipe):
    return type(pipe)(unet=copy.deepcopy(pipe.unet), scheduler=copy.deepcopy(pipe.scheduler))


def test_quantize_pipeline_reconstructs_when_enabled(ddim_pipe):
    off = quantize_pipeline(_fresh(ddim_pipe), _config(enabled=False), **FAST).unet
    assert off.ptq_state.reconstruction is None
    assert not weights_on_grid(off)  # calibration only: float weights kept

    # Without the sampling check: on this tiny model its verdict turns on float rounding (fused vs
    # per-tensor Adam flipped it); it has its own tests (test_reconstruction_sampling.py).
    pipe = quantize_pipeline(_fresh(ddim_pipe), _config(sampling_check=0), **FAST)
    report = pipe.unet.ptq_state.reconstruction
    assert report is not None and report["rows"] == 12
    phases = {u["phase"] for u in report["units"]}
    assert phases == {"weights", "acts"}  # sequential: AdaRound, then step sizes
    assert {u["status"] for u in report["units"]} <= {"trained", "reverted"}
    # AdaRound baked into integer weights; a reverted unit keeps its float weights (its starting point).
    assert weights_on_grid(pipe.unet) == all(
        u["status"] == "trained" for u in report["units"] if u["phase"] == "weights"
    )
    assert pipe.unet.ptq_state.config.reconstruction.enabled
    assert not report["model_reverted"]
    assert not torch.equal(_output(pipe.unet), _output(off))


def test_reconstructed_pipeline_saves_and_reloads_exactly(ddim_pipe, tmp_path):
    from diffusers import UNet2DModel

    pipe = quantize_pipeline(_fresh(ddim_pipe), _config(optimization="joint", qdrop_prob=0.5), **FAST)
    pipe.unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DModel.from_pretrained(tmp_path / "unet")
    assert torch.equal(_output(loaded), _output(pipe.unet))
    assert loaded.ptq_state.config.reconstruction == pipe.unet.ptq_state.config.reconstruction


@pytest.mark.slow  # ~11 s on 2 CPU cores
def test_interrupted_pipeline_run_resumes_to_the_same_result(ddim_pipe, tmp_path, monkeypatch):
    reference = quantize_pipeline(_fresh(ddim_pipe), _config(), **FAST).unet
    calls = {"n": 0}
    train = runner.train_unit

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(runner, "train_unit", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize_pipeline(_fresh(ddim_pipe), _config(), reconstruction_checkpoint=tmp_path, **FAST)
    monkeypatch.setattr(runner, "train_unit", train)
    resumed = quantize_pipeline(_fresh(ddim_pipe), _config(), reconstruction_checkpoint=tmp_path, **FAST).unet
    statuses = [u["status"] for u in resumed.ptq_state.reconstruction["units"]]
    expected = [u["status"] for u in reference.ptq_state.reconstruction["units"]]
    assert statuses[:3] == ["reverted" if s == "reverted" else "resumed" for s in expected[:3]]
    assert statuses[3:] == expected[3:]
    assert torch.equal(_output(resumed), _output(reference))


def test_checkpoint_directory_is_checked_before_calibration(ddim_pipe, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("calibration must not run")

    monkeypatch.setattr("diffusers_ptq.api.select_calibration", never)
    with pytest.raises(ValueError, match=r"reconstruction_checkpoint.*reconstruction\.enabled is False"):
        quantize_pipeline(
            _fresh(ddim_pipe), _config(enabled=False), reconstruction_checkpoint=tmp_path, **FAST
        )
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        quantize_pipeline(_fresh(ddim_pipe), _config(), reconstruction_checkpoint=a_file, **FAST)


def test_quantize_unet_reconstructs_when_enabled():
    unet = tiny_unet2d(sample_size=8)
    data = calibration_set(unet, 10)
    quantize_unet(unet, _config(temporal_block=True), data, batch_size=10, progress=False)
    kinds = [u["kind"] for u in unet.ptq_state.reconstruction["units"]]
    assert "temporal" in kinds  # TFMQ-DM: the time features as one unit
    units = unet.ptq_state.reconstruction["units"]
    assert weights_on_grid(unet) == all(u["status"] == "trained" for u in units if u["phase"] == "weights")


@pytest.mark.parametrize("preset", ["q-diffusion", "eda-dm", "tfmq-dm"])
def test_reconstruction_presets_run_end_to_end(ddim_pipe, preset):
    config = PTQConfig.preset(
        preset,
        weight_bits=4,
        weights={"num_candidates": 10},
        activations={"num_candidates": 10},
        calibration={"num_samples": 12},
        selection={"feature_samples": 4},
        reconstruction={k: v for k, v in RECON.items() if k != "enabled"},
    )
    pipe = quantize_pipeline(
        _fresh(ddim_pipe), config, **{k: v for k, v in FAST.items() if k != "num_samples"}
    )
    report = pipe.unet.ptq_state.reconstruction
    expected = {"q-diffusion": {"weights", "acts"}, "eda-dm": {"joint"}, "tfmq-dm": {"weights", "acts"}}
    assert {u["phase"] for u in report["units"]} == expected[preset]
    assert torch.isfinite(_output(pipe.unet)).all()
