"""The quality benchmark (diffusers_ptq.benchmark) and `diffusers-ptq bench`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffusers_ptq import cli
from diffusers_ptq.benchmark.quality.benchmark import _row_config, run_quality_benchmark
from diffusers_ptq.benchmark.quality.report import markdown_table, write_outputs
from diffusers_ptq.benchmark.quality.sampling import (
    ddim_pipeline,
    noise_error_per_step,
    record_trajectory,
    sample_images,
)
from diffusers_ptq.benchmark.quality.settings import BenchSettings, parse_bits
from diffusers_ptq.config import PTQConfig
from diffusers_ptq.prepare import is_quantized

# The smallest run that still exercises every part: two rows per bit setting, a few images, a few steps.
TINY = {
    "num_samples": 4,
    "seeds": [0, 1],
    "num_inference_steps": 4,
    "batch_size": 4,
    "sqnr_samples": 2,
    "reconstruction_minutes": 0.02,
}


class MeanBrightness:
    """A stand-in fidelity metric: deterministic in the images, so paired rows can be compared exactly."""

    name = "mean brightness"

    def compute(self, images: torch.Tensor) -> dict[str, float]:
        return {"FD": float(images.mean() + 2.0), "IS": float(images.std())}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"presets": ["nope"]}, "'nope' is not a preset"),
        ({"bits": ["W8"]}, "W<weight bits>A<act bits>"),
        ({"num_samples": 1}, "FD needs at least 2"),
        ({"seeds": []}, "seeds="),
        ({"batch_size": 0}, "batch_size=0"),
        ({"calibration_samples": 0}, "calibration_samples=0"),
        ({"calibration_seed": -1}, "calibration_seed=-1 is invalid; expected an integer >= 0"),
    ],
)
def test_bad_settings_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchSettings(**overrides).validate()


def test_rows_and_bits() -> None:
    assert parse_bits("w4a8") == (4, 8)
    rows = BenchSettings(presets=["ptq4dm", "q-diffusion"], bits=["W8A8", "W4A8"]).rows()
    assert [r[0] for r in rows] == [
        "float",
        "ptq4dm W8A8",
        "q-diffusion W8A8",
        "ptq4dm W4A8",
        "q-diffusion W4A8",
    ]
    quick = BenchSettings.quick()
    assert quick.rows() == BenchSettings().rows()  # --quick keeps every row
    assert quick.num_samples < BenchSettings().num_samples


def test_noise_does_not_depend_on_the_batch_size(ddim_pipe) -> None:
    pipe = ddim_pipeline(ddim_pipe)
    one_call = sample_images(pipe, 3, seed=5, num_inference_steps=2, batch_size=3, progress=False)
    batched = sample_images(pipe, 3, seed=5, num_inference_steps=2, batch_size=2, progress=False)
    assert torch.allclose(one_call, batched, atol=1e-5)
    other_seed = sample_images(pipe, 3, seed=6, num_inference_steps=2, batch_size=3, progress=False)
    assert not torch.allclose(one_call, other_seed)
    assert one_call.min() >= -1 and one_call.max() <= 1


def test_float_unet_has_no_noise_error(ddim_pipe) -> None:
    pipe = ddim_pipeline(ddim_pipe)
    trajectory = record_trajectory(pipe, 2, seed=0, num_inference_steps=3)
    assert trajectory.samples.shape[:2] == (3, 2) and trajectory.timesteps.tolist() == [666, 333, 0]
    mse, sqnr = noise_error_per_step(pipe.unet, trajectory)
    assert mse == [0.0, 0.0, 0.0] and all(math.isinf(s) for s in sqnr)


def test_benchmark_rows_are_paired_and_leave_the_float_model_alone(ddim_pipe, tmp_path: Path) -> None:
    settings = BenchSettings(presets=["q-diffusion"], bits=["W8A8", "W4A8"], calibration_samples=8, **TINY)
    before = {k: v.clone() for k, v in ddim_pipe.unet.state_dict().items()}
    result = run_quality_benchmark(ddim_pipe, settings, MeanBrightness(), progress=False)
    assert not is_quantized(ddim_pipe.unet)
    assert all(torch.equal(before[k], v) for k, v in ddim_pipe.unet.state_dict().items())

    assert [row.name for row in result.rows] == ["float", "q-diffusion W8A8", "q-diffusion W4A8"]
    float_row, w8, w4 = result.rows
    assert float_row.sqnr_db is None and float_row.calibration_s == 0.0
    assert len(float_row.metrics["FD"]) == 2  # one value per seed
    assert len(w8.sqnr_per_step) == 4 and len(result.timesteps) == 4
    assert w8.sqnr_db > w4.sqnr_db > 0  # 4-bit weights lose more than 8-bit ones
    assert w8.config["weights"]["bits"] == 8 and w8.config["calibration"]["num_samples"] == 8
    assert result.grids["float"].shape == (4, 3, 16, 16)
    # Same noise: the W8A8 images stay close to the float ones.
    assert (result.grids["q-diffusion W8A8"] - result.grids["float"]).abs().mean() < 0.2

    rerun = run_quality_benchmark(
        ddim_pipe, BenchSettings(presets=["q-diffusion"], bits=[], **TINY), MeanBrightness()
    )
    assert rerun.rows[0].metrics == float_row.metrics  # sampling is deterministic given the seeds

    write_outputs(result, tmp_path, header="header\n\n")
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("header") and table.count("\n| ") == 4  # header row + 3 rows
    assert "q-diffusion W4A8" in markdown_table(result) and "%" in table
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == [
        "float.png",
        "q-diffusion-w4a8.png",
        "q-diffusion-w8a8.png",
    ]
    assert (tmp_path / "sqnr_per_step.png").stat().st_size > 0
    assert (tmp_path / "noise_bias_per_step.png").stat().st_size > 0
    assert len(w8.bias_per_step) == 4 and "noise bias" in table
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"][1]["sqnr_db"] == pytest.approx(w8.sqnr_db)


def test_bench_command_without_a_classifier_still_measures_sqnr(tmp_path: Path, capsys) -> None:
    out = tmp_path / "b"
    argv = ["bench", "--model", "tiny:ddim", "--presets", "ptq4dm", "--bits", "W8A8", "--num-samples", "2"]
    argv += [
        "--seeds",
        "0",
        "--num-inference-steps",
        "3",
        "--sqnr-samples",
        "2",
        "--calibration-samples",
        "6",
    ]
    assert cli.main([*argv, "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "FD/IS skipped" in printed and "ptq4dm W8A8" in printed
    assert "reference.md" not in {p.name for p in out.iterdir()}
    assert "no classifier matches" in (out / "table.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "tiny:sd"], "text-conditioned"),
        (["--bits", "W4"], "W<weight bits>A<act bits>"),
        (["--presets", "gptq"], "not a preset"),
        (["--num-samples", "1"], "at least 2"),
        (["--calibration-seed", "-2"], "calibration_seed=-2 is invalid"),
    ],
)
def test_bench_command_rejects_bad_input(extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "b"
    assert cli.main(["bench", "--model", "tiny:ddim", *extra, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # ~14 s on 2 CPU cores
def test_bench_on_the_shipped_model_reports_fd_against_references(tmp_path: Path) -> None:
    out = tmp_path / "fashion"
    argv = ["bench", "--quick", "--presets", "q-diffusion", "--bits", "W8A8", "--num-samples", "16"]
    argv += ["--num-inference-steps", "5", "--calibration-samples", "16", "--sqnr-samples", "2"]
    argv += ["--reconstruction-minutes", "0.05"]  # --quick's own cap is sized for the full quick run
    assert cli.main([*argv, "--output", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [len(r["metrics"]["FD"]) for r in rows] == [1, 1]
    reference = (out / "reference.md").read_text()
    assert "Gaussian noise" in reference and "real train (all 60k) vs test" in reference
    assert "Command: `diffusers-ptq bench --quick" in (out / "table.md").read_text()


def test_calibration_seed_reaches_every_row_and_defaults_to_the_library_s() -> None:
    assert _row_config(BenchSettings(), "q-diffusion", 8, 8).calibration.seed == PTQConfig().calibration.seed
    for preset in ("default", "q-diffusion"):
        assert _row_config(BenchSettings(calibration_seed=3), preset, 4, 8).calibration.seed == 3
