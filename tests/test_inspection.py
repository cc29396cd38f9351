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


def test_inspect_reports_noise_sqnr_and_bias_of_a_quantized_unet(tmp_path: Path, capsys) -> None:
    from diffusers_ptq import PTQConfig, quantize_pipeline
    from diffusers_ptq.inspection import noise_error_by_step
    from diffusers_ptq.tiny import tiny_ddim_pipeline

    pipe = tiny_ddim_pipeline()  # the same weights as --model tiny:ddim
    config = PTQConfig(weight_bits=4, act_bits=8, weights={"num_candidates": 10}, bias_correction="output")
    quantize_pipeline(pipe, config, num_samples=6, num_inference_steps=3, batch_size=6, progress=False)
    pipe.unet.save_pretrained(tmp_path / "unet")
    out = tmp_path / "inspect"
    argv = ["inspect", "--model", "tiny:ddim", "--num-images", "2", "--num-inference-steps", "3"]
    assert cli.main([*argv, "--quantized", str(tmp_path / "unet"), "--output", str(out)]) == 0
    assert {"noise_error.json", "noise_error_per_step.png"} <= {p.name for p in out.iterdir()}
    data = json.loads((out / "noise_error.json").read_text())
    expected = noise_error_by_step(tiny_ddim_pipeline(), pipe.unet, num_images=2, num_inference_steps=3)
    assert data == expected  # the checkpoint reloads bit-exactly, so the numbers are identical
    assert len(data["bias"]) == 3 and all(b > 0 for b in data["bias"])
    assert "largest bias" in capsys.readouterr().out


def test_ranges_of_an_img2img_pipeline_follow_its_truncated_schedule(prompts) -> None:
    from diffusers_ptq.tiny_variants import tiny_image, tiny_sd_img2img_pipeline

    pipe = tiny_sd_img2img_pipeline()
    kwargs = {"image": tiny_image(seed=1), "strength": 0.5}
    ranges = record_activation_ranges(
        pipe, prompts=prompts[:2], num_inference_steps=4, pipeline_kwargs=kwargs
    )
    pipe.scheduler.set_timesteps(4)
    # strength 0.5: only the last 2 of the 4 steps run
    assert ranges.timesteps == [int(t) for t in pipe.scheduler.timesteps[2:]]
    with pytest.raises(TypeError, match="takes no argument 'mask_image'"):
        record_activation_ranges(pipe, prompts=prompts, pipeline_kwargs={**kwargs, "mask_image": None})
    with pytest.raises(TypeError, match="must be a dict"):
        record_activation_ranges(pipe, prompts=prompts, pipeline_kwargs=[kwargs])
