"""Activation ranges across timesteps (diffusers_ptq.inspection) and `diffusers-ptq inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusers_ptq import cli
from diffusers_ptq.inspection import plot_activation_ranges, record_activation_ranges


def test_ranges_follow_the_pipeline_schedule(ddim_pipe) -> None:
    ranges = record_activation_ranges(ddim_pipe, num_images=2, num_inference_steps=5)
    ddim_pipe.scheduler.set_timesteps(5)
    assert ranges.timesteps == ddim_pipe.scheduler.timesteps.tolist()
    conv_linear = [
        n for n, m in ddim_pipe.unet.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    assert ranges.layers == conv_linear
    assert ranges.low.shape == (len(conv_linear), 5)
    assert (ranges.low <= ranges.q_low).all() and (ranges.q_low <= ranges.q_high).all()
    assert (ranges.q_high <= ranges.high).all()
    assert (ranges.variation() >= 1).all()
    # No hook is left behind on the UNet or its layers.
    assert all(not m._forward_pre_hooks for m in ddim_pipe.unet.modules())


def test_conv_in_range_matches_the_sampled_noise(ddim_pipe) -> None:
    ranges = record_activation_ranges(
        ddim_pipe, num_images=2, num_inference_steps=3, layers="^conv_in$", seed=3
    )
    assert ranges.layers == ["conv_in"]
    unet = ddim_pipe.unet
    shape = (2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    first = torch.randn(shape, generator=torch.Generator().manual_seed(3))  # DDIM's first UNet input
    assert ranges.low[0, 0] == pytest.approx(float(first.min()))
    assert ranges.high[0, 0] == pytest.approx(float(first.max()))


def test_bad_inspection_input(ddim_pipe, sd_pipe) -> None:
    with pytest.raises(ValueError, match="no Conv2d/Linear"):
        record_activation_ranges(ddim_pipe, layers="nothing-matches")
    with pytest.raises(ValueError, match="text-conditioned"):
        record_activation_ranges(sd_pipe)


def test_plot_shows_the_most_varying_layers(ddim_pipe, tmp_path: Path) -> None:
    ranges = record_activation_ranges(ddim_pipe, num_images=1, num_inference_steps=4)
    shown = plot_activation_ranges(ranges, tmp_path / "r.png", max_layers=3)
    variation = ranges.variation()
    assert [float(variation[ranges.layers.index(n)]) for n in shown] == sorted(
        variation.tolist(), reverse=True
    )[:3]
    with Image.open(tmp_path / "r.png") as image:
        assert image.width > 300


def test_inspect_command_on_a_text_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ranges"
    argv = ["inspect", "--model", "tiny:sd", "--prompt", "a cat", "--num-inference-steps", "3"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["activation_ranges.json", "activation_ranges.png"]
    data = json.loads((out / "activation_ranges.json").read_text())
    assert len(data["timesteps"]) == 3  # one UNet call per step (guidance halves share a batch)
    assert "wrote" in capsys.readouterr().out
    assert (
        cli.main(["inspect", "--model", "tiny:ddim", "--num-images", "0", "--output", str(tmp_path / "x")])
        == 2
    )
    assert not (tmp_path / "x").exists()
