"""Extra UNet inputs (ControlNet / T2I-Adapter residuals, cross_attention_kwargs, timestep_cond) are recorded
per row and replayed wherever the UNet is re-run; a ControlNet pipeline's quantized UNet saves and reloads
bit-exact with stock `from_pretrained`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline

from diffusers_ptq.calibration import concat_calibration_sets
from diffusers_ptq.tiny import tiny_sd_pipeline
from diffusers_ptq.tiny_variants import tiny_controlnet_pipeline, tiny_image
from pipeline_helpers import PROMPTS, images, quantize_recording, w8a8

TIMESTEPS = (901, 601, 301, 1)


def _adapter_run(pipe):
    """Calls the UNet itself, as a T2I-Adapter pipeline does: intrablock residuals and a LoRA-style scale."""
    gen = torch.Generator().manual_seed(7)
    text = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, False)[0]
    for t in TIMESTEPS:
        sample = torch.randn(2, 4, 16, 16, generator=gen)
        residuals = [torch.randn(2, 32, 16, 16, generator=gen), torch.randn(2, 64, 8, 8, generator=gen)]
        pipe.unet(
            sample,
            t,
            encoder_hidden_states=text,
            down_intrablock_additional_residuals=residuals,
            cross_attention_kwargs={"scale": 1.0},
        )


def test_adapter_residuals_and_static_kwargs_are_recorded_and_replayed(monkeypatch):
    pipe = tiny_sd_pipeline()
    data = quantize_recording(
        pipe, monkeypatch, w8a8(sampler="all"), calibration_fn=_adapter_run, num_samples=8
    )
    residuals = data.extra_inputs["down_intrablock_additional_residuals"]
    assert isinstance(residuals, list) and [tuple(r.shape) for r in residuals] == [
        (8, 32, 16, 16),
        (8, 64, 8, 8),
    ]
    assert data.static_inputs == {"cross_attention_kwargs": {"scale": 1.0}}
    assert data.step_timesteps.tolist() == list(TIMESTEPS)
    # Replaying row 5 rebuilds exactly the call that produced it (a fresh list: the UNet pops from it).
    kwargs = data.unet_kwargs(slice(5, 6))
    assert isinstance(kwargs["down_intrablock_additional_residuals"], list)
    with torch.no_grad():
        replayed = pipe.unet(**kwargs).sample
        without = pipe.unet(**{**data.unet_kwargs(slice(5, 6)), "down_intrablock_additional_residuals": None})
        direct = pipe.unet(
            data.inputs["sample"][5:6],
            data.timesteps[5:6],
            encoder_hidden_states=data.inputs["encoder_hidden_states"][5:6],
            down_intrablock_additional_residuals=[r[5:6] for r in residuals],
            cross_attention_kwargs={"scale": 1.0},
        ).sample
    assert torch.equal(replayed, direct) and not torch.allclose(without.sample, direct)
    joined = concat_calibration_sets([data, data])
    assert [tuple(r.shape) for r in joined.extra_inputs["down_intrablock_additional_residuals"]] == [
        (16, 32, 16, 16),
        (16, 64, 8, 8),
    ]


def test_controlnet_residuals_are_stored_per_row_on_the_cpu(monkeypatch):
    pipe = tiny_controlnet_pipeline()
    pipe.set_progress_bar_config(disable=True)
    data = quantize_recording(pipe, monkeypatch, prompts=PROMPTS, pipeline_kwargs={"image": tiny_image(0)})
    down = data.extra_inputs["down_block_additional_residuals"]
    mid = data.inputs["mid_block_additional_residual"]
    assert all(r.shape[0] == len(data) and r.device.type == "cpu" for r in (*down, mid))
    assert len(data) == 2 * 8  # only the selected rows (both guidance halves), not every UNet call


def test_controlnet_pipeline_saves_and_reloads_bit_exact(monkeypatch, tmp_path):
    pipe = tiny_controlnet_pipeline()
    pipe.set_progress_bar_config(disable=True)
    quantize_recording(pipe, monkeypatch, prompts=PROMPTS, pipeline_kwargs={"image": tiny_image(0)})
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    call = {"prompt": PROMPTS[:2], "image": tiny_image(3), "num_inference_steps": 3}
    assert loaded.unet.is_quantized
    assert np.array_equal(images(loaded, **call), images(pipe, **call))


def test_class_labels_are_recorded_and_replayed(monkeypatch):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=10,
    )
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))

    def run(p):  # a class-conditional loop of the user's own
        gen = torch.Generator().manual_seed(0)
        for t in TIMESTEPS:
            p.unet(torch.randn(3, 3, 8, 8, generator=gen), t, class_labels=torch.tensor([1, 4, 7]))

    data = quantize_recording(pipe, monkeypatch, w8a8(sampler="all"), calibration_fn=run, num_samples=12)
    assert data.inputs["class_labels"].tolist() == [1, 4, 7] * 4
    with torch.no_grad():
        replayed = pipe.unet(**data.unet_kwargs(slice(0, 3))).sample
        other = pipe.unet(**{**data.unet_kwargs(slice(0, 3)), "class_labels": torch.tensor([0, 0, 0])}).sample
    assert not torch.allclose(replayed, other)


def test_nested_added_cond_kwargs_join_and_replay():
    """IP-Adapter's `image_embeds` is a list of tensors inside added_cond_kwargs."""
    from diffusers_ptq import CalibrationSet

    rows = 4
    data = CalibrationSet(
        inputs={"sample": torch.randn(rows, 4, 8, 8)},
        timesteps=torch.tensor([900, 600, 300, 1]),
        train_timesteps=torch.tensor([900, 600, 300, 1]),
        step_index=torch.arange(rows),
        trajectory=torch.zeros(rows, dtype=torch.long),
        step_timesteps=torch.tensor([900, 600, 300, 1]),
        num_train_timesteps=1000,
        added_cond_kwargs={"image_embeds": [torch.randn(rows, 2, 8)], "text_embeds": torch.randn(rows, 8)},
    )
    kwargs = data.unet_kwargs(slice(1, 3), dtype=torch.float64)
    embeds = kwargs["added_cond_kwargs"]["image_embeds"]
    assert isinstance(embeds, list) and embeds[0].shape == (2, 2, 8) and embeds[0].dtype == torch.float64
    joined = concat_calibration_sets([data, data])
    assert joined.added_cond_kwargs["image_embeds"][0].shape == (8, 2, 8)
    data.added_cond_kwargs["image_embeds"][0][2, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"added_cond_kwargs\['image_embeds'\]\[0\]"):
        data.check_finite()
