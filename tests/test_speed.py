"""The speed benchmark (benchmarks/speed.py) and the optimum-quanto rows of both benchmarks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusers_ptq import cli
from diffusers_ptq.benchmark.quality.benchmark import run_quality_benchmark
from diffusers_ptq.benchmark.quality.report import markdown_table
from diffusers_ptq.benchmark.quality.settings import BenchSettings
from diffusers_ptq.benchmark.quanto_row import (
    QUANTO_METHOD,
    QUANTO_ROW,
    quanto_pipeline_quantizer,
    quanto_unavailable_reason,
)
from diffusers_ptq.benchmark.speed import benchmark as speed_module
from diffusers_ptq.benchmark.speed.benchmark import run_speed_benchmark
from diffusers_ptq.benchmark.speed.cli import main as speed_main
from diffusers_ptq.benchmark.speed.measure import Timing, model_bytes
from diffusers_ptq.benchmark.speed.models import speed_models, spread_timesteps
from diffusers_ptq.benchmark.speed.settings import SpeedSettings, parse_models
from diffusers_ptq.cli.bench import _settings as bench_settings
from diffusers_ptq.config import CalibrationConfig
from diffusers_ptq.tiny import tiny_ddim_pipeline

QUANTO = quanto_unavailable_reason() is None
needs_quanto = pytest.mark.skipif(not QUANTO, reason="optimum-quanto is not installed")


def _rows(result: dict, model: str) -> dict[str, dict]:
    entry = next(m for m in result["models"] if m["name"] == model)
    return {row["id"]: row for row in entry["rows"]}


@pytest.mark.slow  # ~14 s on 2 CPU cores
def test_speed_benchmark_end_to_end_on_tiny_models(tmp_path: Path, capsys) -> None:
    out = tmp_path / "speed"
    argv = ["--model", "tiny", "--rows", "float,fake-quant,int8,quanto", "--repeats", "1", "--warmup", "0"]
    assert speed_main([*argv, "--batch-size", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"table.md", "results.json", "speed.png"}
    result = json.loads((out / "results.json").read_text())
    assert result["device_type"] == "cpu" and result["device"]  # the CPU is named
    assert [m["name"] for m in result["models"]] == ["tiny-sd", "tiny-unet2d"]
    assert result["models"][0]["inputs"]["encoder_hidden_states"] == [2, 77, 32]
    for model in ("tiny-sd", "tiny-unet2d"):
        rows = _rows(result, model)
        assert list(rows) == ["float", "fake-quant", "int8", "quanto"]
        for name in ("float", "fake-quant", "int8"):
            row = rows[name]
            assert row["status"] == "ok", row["reason"]
            assert row["median_ms"] > 0 and len(row["times_ms"]) == 1
            assert row["peak_bytes"] > 0 and row["weight_bytes"] > 0 and row["speedup"] > 0
        assert rows["float"]["speedup"] == 1.0
        assert any("layers on int8" in note for note in rows["int8"]["notes"])
        quanto = rows["quanto"]
        assert quanto["status"] == ("ok" if QUANTO else "skipped")
        if not QUANTO:
            assert "optimum-quanto" in quanto["reason"]
    table = (out / "table.md").read_text()
    assert result["device"] in table and "| int8 W8A8 eager (diffusers-ptq) |" in table
    assert "the float speed" in printed
    assert Image.open(out / "speed.png").size[0] > 100


def test_w4a8_rows_run_packed_weights() -> None:
    settings = SpeedSettings(models=["tiny"], rows=["fake-quant", "int8"], weight_bits=4)
    settings.repeats, settings.warmup = 1, 0
    tiny_unet2d = speed_models(["tiny"], batch_size=2)[1:]
    result = run_speed_benchmark(settings, models=tiny_unet2d, log=lambda _: None)
    rows = {row.id: row for row in result.models[0].rows}
    assert rows["int8"].ok and rows["int8"].label == "int8 W4A8 eager (diffusers-ptq)"
    assert "simulated W4A8" in rows["fake-quant"].notes[0]
    # Packed nibbles: the codes take a quarter of the fp16 bytes (plus per-channel constants).
    assert any("weights 0.2" in note for note in rows["int8"].notes)


def test_missing_libraries_and_failures_skip_their_row_only(monkeypatch) -> None:
    for name in ("torchao", "torchao.quantization", "optimum.quanto"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them now raises ImportError

    def no_compile(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", no_compile)
    settings = SpeedSettings(models=["tiny"], rows=["int8", "int8-compiled", "torchao", "quanto"])
    settings.repeats, settings.warmup = 1, 0
    tiny_unet2d = speed_models(["tiny"], batch_size=2)[1:]
    result = run_speed_benchmark(settings, models=tiny_unet2d, log=lambda line: None)
    rows = {row.id: row for row in result.models[0].rows}
    assert rows["int8"].ok
    assert rows["int8-compiled"].reason == "failed: RuntimeError: torch.compile is not supported here"
    for name, package in (("torchao", "torchao"), ("quanto", "optimum-quanto")):
        assert not rows[name].ok
        assert f"{package} is not installed" in rows[name].reason
        assert "diffusers-ptq[compare]" in rows[name].reason
    assert rows["int8"].speedup is None  # no float row: no ratios


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rows", "float,nope"], "row 'nope' is not valid"),
        (["--model", "sd14"], "--model 'sd14' is not valid"),
        (["--repeats", "0"], "repeats=0"),
        (["--warmup", "-1"], "warmup=-1"),
        (["--batch-size", "0"], "batch_size=0"),
        (["--calibration-rows", "0"], "calibration_rows=0"),
        (["--weight-bits", "6"], "weight_bits=6 is invalid; choose from 8, 4"),
        (["--compile-mode", "fast"], "compile_mode='fast'"),
        (["--device", "meta"], "is not supported; use cpu or cuda"),
        (["--device", "nonsense"], "is not a torch device"),
    ],
)
def test_bad_options_fail_before_any_model_is_built(argv, message, tmp_path, monkeypatch, capsys) -> None:
    def no_models(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(speed_module, "speed_models", no_models)
    assert speed_main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_and_non_empty_output_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(speed_module, "speed_models", None)  # calling it would fail loudly
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert speed_main(["--model", "tiny", "--output", str(tmp_path / "full")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    if not torch.cuda.is_available():
        assert speed_main(["--device", "cuda", "--output", str(tmp_path / "o")]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own check, exit code 2
        speed_main(["--dtype", "float8", "--output", str(tmp_path / "o")])


def test_settings_helpers() -> None:
    assert parse_models("both") == ["sd15", "fashion"]
    assert parse_models("fashion,both") == ["fashion", "sd15"]
    assert SpeedSettings(rows=["quanto", "float"]).ordered_rows() == ["float", "quanto"]
    assert SpeedSettings(device="cpu").torch_dtype() == torch.float32
    t = spread_timesteps(4)
    assert t.tolist() == [875, 625, 375, 125]
    assert Timing([0.003, 0.001, 0.002]).summary_ms()["median_ms"] == pytest.approx(2.0)
    shared = torch.nn.Linear(4, 4)
    twice = torch.nn.Sequential(shared, shared)  # a tied module is counted once
    assert model_bytes(twice) == (16 + 4) * 4


# -- the quanto row of the quality benchmark -----------------------------------------------------------------


def test_bench_compare_quanto_setting_and_flag(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="compare_quanto='yes'"):
        BenchSettings(compare_quanto="yes").validate()
    parser = cli.build_parser()
    assert bench_settings(parser.parse_args(["bench", "--compare-quanto", "--output", "o"])).compare_quanto
    assert not bench_settings(parser.parse_args(["bench", "--output", "o"])).compare_quanto
    argv = ["bench", "--ablation", "groups", "--compare-quanto", "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "--compare-quanto does not apply to --ablation" in capsys.readouterr().err


class MeanBrightness:
    name = "mean brightness"

    def compute(self, images: torch.Tensor) -> dict[str, float]:
        return {"FD": float(images.mean() + 2.0), "IS": float(images.std())}


def _quanto_settings() -> BenchSettings:
    return BenchSettings(
        presets=[],
        compare_quanto=True,
        num_samples=4,
        seeds=[0],
        num_inference_steps=4,
        batch_size=4,
        sqnr_samples=2,
        calibration_samples=8,
    )


@needs_quanto
def test_quanto_quality_row_on_the_tiny_ddim_pipeline(ddim_pipe) -> None:
    result = run_quality_benchmark(ddim_pipe, _quanto_settings(), MeanBrightness(), progress=False)
    assert [row.name for row in result.rows] == ["float", QUANTO_ROW]
    row = result.rows[1]
    assert row.preset == QUANTO_METHOD and (row.weight_bits, row.act_bits) == (8, 8)
    # q-diffusion records every 2nd of 4 steps: 8 samples are 4 trajectories, calibrated in one call.
    info = row.calibration_info
    assert (info["trajectories"], info["num_inference_steps"], info["unet_calls"]) == (4, 4, 4)
    assert row.sqnr_db > 25 and min(row.sqnr_per_step) > 22  # measured 31.9 dB, steps 28.8-38.6
    assert len(row.sqnr_per_step) == 4 and row.metrics["FD"]
    assert result.grids[QUANTO_ROW].shape == result.grids["float"].shape
    assert QUANTO_ROW in markdown_table(result)
    assert not any(type(m).__module__.startswith("optimum") for m in ddim_pipe.unet.modules())


@needs_quanto
def test_quanto_calibrates_on_the_capture_noise() -> None:
    """The calibration trajectories start from the noise diffusers-ptq's capture draws (same seed)."""
    pipe = tiny_ddim_pipeline()
    calibration = CalibrationConfig(num_samples=6, num_inference_steps=3, batch_size=2, seed=7)
    first_inputs = []
    pipe.unet.register_forward_pre_hook(lambda m, args: first_inputs.append(args[0].clone()))
    info = quanto_pipeline_quantizer(calibration)(pipe)
    assert (info["trajectories"], info["unet_calls"]) == (2, 3)  # all 3 steps recorded: 2 trajectories
    generator = torch.Generator().manual_seed(7)
    assert torch.equal(first_inputs[0], torch.randn(2, 3, 16, 16, generator=generator))


def test_quanto_row_is_skipped_with_a_note_when_missing(ddim_pipe, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    settings = _quanto_settings()
    settings.presets, settings.bits = ["ptq4dm"], ["W8A8"]
    result = run_quality_benchmark(ddim_pipe, settings, None, progress=False)
    assert [row.name for row in result.rows] == ["float", "ptq4dm W8A8"]  # the preset rows still run
    preset_row = result.rows[1]
    assert preset_row.config is not None and preset_row.calibration_info["selection"] is not None
    assert preset_row.sqnr_db > 20 and len(preset_row.sqnr_per_step) == 4  # measured 25.2 dB
    assert any(f"{QUANTO_ROW} skipped: optimum-quanto is not installed" in n for n in result.notes)
