"""Tests for the offline tiny pipelines in diffusers_ptq.tiny."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from diffusers_ptq.tiny import (
    PIPELINE_NAMES,
    SD_SCHEDULER_NAMES,
    build_tiny_pipeline,
    tiny_clip_tokenizer,
    tiny_ddim_pipeline,
    tiny_ddpm_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_unet2d,
)

PROMPTS = ["a photo of a cat sitting on the mat", "an orange house"]


def _quiet(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def sd_pipe() -> StableDiffusionPipeline:
    return _quiet(tiny_sd_pipeline())


@pytest.fixture(scope="module")
def sdxl_pipe() -> StableDiffusionXLPipeline:
    return _quiet(tiny_sdxl_pipeline())


def test_tokenizer_encodes_with_special_tokens_and_padding() -> None:
    tok = tiny_clip_tokenizer()
    assert len(tok) < 1000
    assert tok.model_max_length == 77
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"

    ids = tok(PROMPTS[0], padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    assert max(ids) < len(tok)
    first_eos = ids.index(tok.eos_token_id)
    assert all(i == tok.pad_token_id for i in ids[first_eos:])
    # Whole-word merges mean common words are a single token rather than one per letter.
    assert tok.convert_ids_to_tokens(ids[1:first_eos])[0] == "a</w>"
    assert "the</w>" in tok.convert_ids_to_tokens(ids)
    assert first_eos - 1 < len(PROMPTS[0].replace(" ", ""))


def test_tokenizer_handles_arbitrary_unicode_and_truncates() -> None:
    tok = tiny_clip_tokenizer()
    ids = tok("Ünïcödé ✓ 😀 " * 40, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # byte-level alphabet covers every byte
    assert max(ids) < len(tok)


def test_tokenizer_writes_files_to_directory(tmp_path) -> None:
    target = tmp_path / "tok"
    tok = tiny_clip_tokenizer(target)
    assert (target / "vocab.json").is_file()
    assert (target / "merges.txt").is_file()
    assert tok("the cat").input_ids == tiny_clip_tokenizer()("the cat").input_ids


def test_unet2d_forward_shape_and_size() -> None:
    unet = tiny_unet2d(sample_size=16)
    assert not unet.training
    assert sum(p.numel() for p in unet.parameters()) < 500_000
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 500])).sample
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_seeding_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b, c = tiny_unet2d(seed=0), tiny_unet2d(seed=0), tiny_unet2d(seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_sd_pipeline_seeding() -> None:
    a, b, c = tiny_sd_pipeline(seed=3), tiny_sd_pipeline(seed=3), tiny_sd_pipeline(seed=4)
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(a, name), getattr(b, name)), name
        assert not _same_weights(getattr(a, name), getattr(c, name)), name


@pytest.mark.parametrize(
    ("builder", "cls"), [(tiny_ddpm_pipeline, DDPMPipeline), (tiny_ddim_pipeline, DDIMPipeline)]
)
def test_unconditional_pipelines_run(builder, cls) -> None:
    pipe = _quiet(builder())
    assert isinstance(pipe, cls)
    images = pipe(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("scheduler", SD_SCHEDULER_NAMES)
def test_sd_pipeline_runs_with_each_scheduler(scheduler: str) -> None:
    pipe = _quiet(tiny_sd_pipeline(scheduler=scheduler))
    images = pipe(
        PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 32, 32, 3)
    assert np.isfinite(images).all()


def test_sd_pipeline_latents_and_determinism(sd_pipe: StableDiffusionPipeline) -> None:
    def run() -> torch.Tensor:
        return sd_pipe(
            PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent"
        ).images

    latents = run()
    assert latents.shape == (2, 4, 16, 16)
    assert torch.isfinite(latents).all()
    assert torch.equal(latents, run())


def test_sd_pipeline_bad_scheduler() -> None:
    with pytest.raises(ValueError, match="euler_karras"):
        tiny_sd_pipeline(scheduler="heun")


@pytest.mark.parametrize(("output_type", "shape"), [("np", (2, 32, 32, 3)), ("latent", (2, 4, 16, 16))])
def test_sdxl_pipeline_runs(sdxl_pipe: StableDiffusionXLPipeline, output_type: str, shape) -> None:
    out = sdxl_pipe(
        PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type=output_type
    ).images
    assert tuple(out.shape) == shape
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("ddpm", DDPMPipeline),
        ("ddim", DDIMPipeline),
        ("sd", StableDiffusionPipeline),
        ("sdxl", StableDiffusionXLPipeline),
    ],
)
def test_build_tiny_pipeline(name: str, cls: type) -> None:
    assert name in PIPELINE_NAMES
    pipe = build_tiny_pipeline(name, seed=0)
    assert type(pipe) is cls
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            assert not module.training
            assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())


def test_build_tiny_pipeline_bad_name() -> None:
    with pytest.raises(ValueError, match="sdxl"):
        build_tiny_pipeline("flux")
