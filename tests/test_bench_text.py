"""The quality benchmark on text-to-image pipelines (prompts, CFG, CLIP score) and `bench --prompts`."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from diffusers_ptq import cli
from diffusers_ptq.benchmark.metrics import clip_score
from diffusers_ptq.benchmark.quality import benchmark as quality
from diffusers_ptq.benchmark.quality.benchmark import run_quality_benchmark
from diffusers_ptq.benchmark.quality.report import markdown_table
from diffusers_ptq.benchmark.quality.sampling import (
    ddim_text_pipeline,
    image_prompts,
    noise_error_per_step,
    record_trajectory,
    sample_images,
)
from diffusers_ptq.benchmark.quality.settings import BenchSettings
from diffusers_ptq.cli import bench as bench_cli
from diffusers_ptq.prepare import is_quantized
from diffusers_ptq.tiny import tiny_sd_pipeline

PROMPTS = ["a photo of a cat", "a red car"]
# Two prompts, two images, three DDIM steps, 16x16 latents: the smallest run that exercises every part.
TINY = {
    "num_samples": 2,
    "seeds": [0],
    "num_inference_steps": 3,
    "batch_size": 2,
    "sqnr_samples": 2,
    "calibration_samples": 2,
    "prompts": PROMPTS,
}
NO_CLIP = "CLIP score skipped: test says the weights are absent"


class PromptLength:
    """A stand-in CLIP score: deterministic in the images and records the prompts it was given."""

    name = "prompt length (stand-in)"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        self.calls.append(list(prompts))
        return {clip_score.CLIP_METRIC: float(images.mean()) + sum(map(len, prompts))}


@pytest.fixture
def no_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clip_score, "clip_unavailable_reason", lambda model=None: NO_CLIP)


def test_text_rows_measure_sqnr_per_step_and_skip_clip_without_weights(no_clip: None) -> None:
    pipe = tiny_sd_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    settings = BenchSettings(presets=["ptq4dm"], bits=["W8A8"], guidance_scale=5.0, **TINY)
    result = run_quality_benchmark(pipe, settings, progress=False)

    assert not is_quantized(pipe.unet) and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert [row.name for row in result.rows] == ["float", "ptq4dm W8A8"]
    float_row, w8 = result.rows
    assert float_row.sqnr_per_step == [] and float_row.metrics == {}
    assert len(result.timesteps) == 3 and len(w8.sqnr_per_step) == 3 and len(w8.mse_per_step) == 3
    assert min(w8.sqnr_per_step) > 18 and w8.sqnr_db > 21  # measured: steps 23.3-31.1 dB, 26.8 dB
    assert w8.config["calibration"]["guidance_scale"] == 5.0  # calibration sees the sampling guidance
    assert result.grids["float"].shape == (2, 3, 32, 32)
    assert any(note.startswith(NO_CLIP) for note in result.notes)
    assert result.to_dict()["settings"]["prompts"] == PROMPTS


def test_float_runs_are_paired_on_identical_start_latents(no_clip: None) -> None:
    pipe = tiny_sd_pipeline()
    settings = BenchSettings(presets=[], bits=[], **{**TINY, "num_samples": 3})
    first = run_quality_benchmark(pipe, settings, progress=False)
    second = run_quality_benchmark(pipe, settings, progress=False)
    assert torch.equal(first.grids["float"], second.grids["float"])

    float_pipe = ddim_text_pipeline(pipe)
    kwargs = {"num_inference_steps": 2, "progress": False, "prompts": PROMPTS, "guidance_scale": 7.5}
    one_call = sample_images(float_pipe, 3, seed=0, batch_size=3, **kwargs)
    batched = sample_images(float_pipe, 3, seed=0, batch_size=2, **kwargs)
    assert torch.allclose(one_call, batched, atol=1e-5)  # image i's noise does not depend on the batching
    assert not torch.allclose(one_call, sample_images(float_pipe, 3, seed=1, batch_size=3, **kwargs))
    assert image_prompts(PROMPTS, 1, 3) == ["a red car", "a photo of a cat", "a red car"]


def test_conditional_trajectory_keeps_both_guidance_halves(sdxl_pipe) -> None:
    for pipe in (tiny_sd_pipeline(), sdxl_pipe):
        float_pipe = ddim_text_pipeline(pipe)
        trajectory = record_trajectory(float_pipe, 2, seed=0, num_inference_steps=2, prompts=PROMPTS)
        assert trajectory.samples.shape[:3] == (2, 4, 4)  # steps, 2 images x (uncond, text), channels
        cond = trajectory.conditioning[0]
        assert cond["encoder_hidden_states"].shape[0] == 4
        # The prompt embeddings are one tensor for the whole run: stored once, not once per step.
        assert cond["encoder_hidden_states"] is trajectory.conditioning[1]["encoder_hidden_states"]
        mse, sqnr = noise_error_per_step(float_pipe.unet, trajectory)
        assert mse == [0.0, 0.0] and all(math.isinf(s) for s in sqnr)
    assert set(cond["added_cond_kwargs"]) == {"text_embeds", "time_ids"}  # SDXL's micro-conditioning


def test_clip_score_column_when_a_metric_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    metric = PromptLength()
    monkeypatch.setattr(quality, "clip_fidelity", lambda model, device: (metric, None))
    settings = BenchSettings(presets=[], bits=[], **{**TINY, "num_samples": 3, "seeds": [0, 1]})
    result = run_quality_benchmark(tiny_sd_pipeline(), settings, progress=False)
    assert metric.calls == [[PROMPTS[0], PROMPTS[1], PROMPTS[0]]] * 2  # each image with its own prompt
    assert len(result.rows[0].metrics[clip_score.CLIP_METRIC]) == 2  # one value per seed
    assert result.fidelity == metric.name and result.notes == []
    assert clip_score.CLIP_METRIC in markdown_table(result).splitlines()[0]


def test_clip_availability_never_downloads(tmp_path: Path) -> None:
    assert clip_score.clip_model_path("nobody-owns/this-clip-model-xyz") is None
    assert clip_score.clip_model_path(str(tmp_path)) is None  # an empty directory is no checkpoint
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    assert clip_score.clip_model_path(str(tmp_path)) == tmp_path
    reason = clip_score.clip_unavailable_reason("nobody-owns/this-clip-model-xyz")
    assert reason is not None and reason.startswith("CLIP score skipped:") and "\n" not in reason
    metric, note = clip_score.clip_fidelity("nobody-owns/this-clip-model-xyz")
    assert metric is None and note == reason


def test_clip_score_feeds_uint8_images_and_prompts_to_torchmetrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FakeCLIPScore:  # torchmetrics' CLIPScore interface: update(images, text), compute(), reset()
        def __init__(self, model_name_or_path: object) -> None:
            self.loader, self.batches = model_name_or_path, []

        def to(self, device: torch.device) -> FakeCLIPScore:
            return self

        def reset(self) -> None:
            self.batches = []

        def update(self, images: torch.Tensor, text: list[str]) -> None:
            self.batches.append((images, text))

        def compute(self) -> torch.Tensor:
            return torch.tensor(float(sum(len(t) for _, t in self.batches)))

    module = types.ModuleType("torchmetrics.multimodal.clip_score")
    module.CLIPScore = FakeCLIPScore
    for name in ("torchmetrics", "torchmetrics.multimodal"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "torchmetrics.multimodal.clip_score", module)
    monkeypatch.setattr(clip_score, "_import_error", lambda: None)  # the real answer is cached per process
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "vocab.json"):
        (tmp_path / name).write_text("{}")

    metric = clip_score.ClipScore(str(tmp_path), batch_size=2)
    assert callable(metric.metric.loader)  # a local loader: torchmetrics never resolves a Hub name
    images = torch.linspace(-1, 1, 3 * 1 * 2 * 2).reshape(3, 1, 2, 2)
    assert metric.compute(images, ["a", "b", "c"]) == {clip_score.CLIP_METRIC: 3.0}
    (first, text), (second, _) = metric.metric.batches
    assert first.dtype == torch.uint8 and first.shape == (2, 3, 2, 2) and second.shape[0] == 1
    assert int(first.min()) == 0 and int(second.max()) == 255 and text == ["a", "b"]
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        metric.compute(images, ["a", "b"])


def _prompts_file(
    tmp_path: Path, text: str = "a photo of a cat\n\n  a red car  \n", name: str = "p.txt"
) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


FAST = ["--presets", "ptq4dm", "--bits", "W8A8", "--num-samples", "2", "--seeds", "0", "--batch-size", "2"]
FAST += ["--num-inference-steps", "2", "--sqnr-samples", "2", "--calibration-samples", "2", "--no-progress"]


def test_bench_command_on_a_saved_text_to_image_pipeline(tmp_path: Path, capsys, no_clip: None) -> None:
    model = tmp_path / "sd"
    tiny_sd_pipeline().save_pretrained(model)
    out = tmp_path / "b"
    argv = ["bench", "--model", str(model), "--prompts", _prompts_file(tmp_path), "--guidance-scale", "4"]
    assert cli.main([*argv, *FAST, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 prompts, guidance scale 4.0" in printed and NO_CLIP in printed
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["prompts"] == PROMPTS and data["settings"]["guidance_scale"] == 4.0
    assert [len(row["sqnr_per_step"]) for row in data["rows"]] == [0, 2]
    assert NO_CLIP in (out / "table.md").read_text()
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["float.png", "ptq4dm-w8a8.png"]


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("tiny:sd", [], "--model tiny:sd is text-conditioned"),
        ("saved", [], "is text-conditioned (text-to-image): pass --prompts FILE"),
        (
            "tiny:ddim",
            ["--prompts", "PROMPTS"],
            "--prompts applies to text-to-image models; --model tiny:ddim",
        ),
        ("fashion", ["--prompts", "PROMPTS"], "--model fashion is unconditional"),
        ("tiny:sd", ["--prompts", "missing.txt"], "--prompts 'missing.txt': no such file"),
        ("tiny:sd", ["--prompts", "EMPTY"], "holds no prompts"),
        ("tiny:sd", ["--guidance-scale", "3"], "--guidance-scale applies to text-to-image models"),
        ("tiny:sd", ["--prompts", "PROMPTS", "--guidance-scale", "-1"], "guidance_scale=-1.0 is invalid"),
        ("tiny:sd", ["--prompts", "PROMPTS", "--compare-quanto"], "compare_quanto=True is invalid"),
        (
            "tiny:ddim",
            ["--prompts", "PROMPTS", "--ablation", "groups"],
            "--prompts does not apply to --ablation",
        ),
    ],
)
def test_bench_command_rejects_bad_text_input_before_loading(
    model: str, extra: list[str], message: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(bench_cli, "load_pipeline", refuse)
    if model == "saved":  # a local directory: its model_index.json says what it is, no weights loaded
        model = str(tmp_path / "sd")
        tiny_sd_pipeline().save_pretrained(model)
        capsys.readouterr()  # drop save_pretrained's progress bar
    files = {"PROMPTS": _prompts_file(tmp_path), "EMPTY": _prompts_file(tmp_path, "\n  \n", "empty.txt")}
    extra = [files.get(arg, arg) for arg in extra]
    out = tmp_path / "b"
    assert cli.main(["bench", "--model", model, *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_settings_validation_names_text_fields() -> None:
    with pytest.raises(ValueError, match=r"prompts=\[\] is invalid"):
        BenchSettings(prompts=[]).validate()
    with pytest.raises(ValueError, match=r"prompts=.* is invalid"):
        BenchSettings(prompts=["ok", "  "]).validate()
    with pytest.raises(ValueError, match="clip_model='' is invalid"):
        BenchSettings(clip_model="").validate()
    assert "prompts" not in BenchSettings().to_dict()  # unconditional runs record what they always did
    with pytest.raises(ValueError, match="StableDiffusionPipeline is text-conditioned: set prompts"):
        run_quality_benchmark(tiny_sd_pipeline(), BenchSettings(presets=[], bits=[]), progress=False)
