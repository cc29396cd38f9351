"""`diffusers-ptq bench --no-reconstruction`: every preset runs calibration only, and the table says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusers_ptq import cli
from diffusers_ptq.benchmark.quality.benchmark import reconstruction_note, row_configs
from diffusers_ptq.benchmark.quality.settings import QUICK_RECONSTRUCTION_MINUTES, BenchSettings
from diffusers_ptq.config import PTQConfig

# The quickest run of a reconstructing preset: one row, two images, three steps, six calibration samples.
QUICKEST = ["--presets", "q-diffusion", "--bits", "W8A8", "--num-samples", "2", "--seeds", "0"]
QUICKEST += ["--num-inference-steps", "3", "--sqnr-samples", "2", "--calibration-samples", "6"]


def test_every_row_is_built_without_reconstruction() -> None:
    assert PTQConfig.preset("q-diffusion").reconstruction.enabled  # the case this switch exists for
    settings = BenchSettings.quick(reconstruction=False)
    settings.validate()
    assert settings.reconstruction_minutes is None  # --quick's cap is for reconstruction that runs
    assert BenchSettings.quick().reconstruction_minutes == QUICK_RECONSTRUCTION_MINUTES
    configs = row_configs(settings)
    assert configs and not any(c.reconstruction.enabled for c in configs.values())
    assert settings.to_dict()["reconstruction"] is False
    assert "reconstruction" not in BenchSettings().to_dict()  # on: recorded as before the switch existed
    note = reconstruction_note(settings)
    assert note is not None and "--no-reconstruction" in note and "q-diffusion" in note
    assert reconstruction_note(BenchSettings()) is None


@pytest.mark.parametrize("value", [0, "no", None])
def test_reconstruction_must_be_a_bool(value) -> None:
    with pytest.raises(ValueError, match=r"reconstruction=.* expected True or False"):
        BenchSettings(reconstruction=value).validate()


def test_a_reconstruction_budget_without_reconstruction_is_rejected() -> None:
    with pytest.raises(ValueError, match="applies only with reconstruction"):
        BenchSettings(reconstruction=False, reconstruction_minutes=1.0).validate()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--no-reconstruction", "--reconstruction-minutes", "1"], "applies only with reconstruction"),
        (["--quick", "--no-reconstruction", "--reconstruction-minutes", "1"], "applies only with"),
        (["--ablation", "groups", "--no-reconstruction"], "--no-reconstruction does not apply"),
    ],
)
def test_bench_command_rejects_flags_that_need_reconstruction(
    extra: list[str], message: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "b"
    assert cli.main(["bench", "--model", "tiny:ddim", *extra, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bench_command_runs_q_diffusion_without_reconstruction(tmp_path: Path) -> None:
    out = tmp_path / "b"
    argv = ["bench", "--model", "tiny:ddim", *QUICKEST, "--no-reconstruction"]
    assert cli.main([*argv, "--output", str(out), "--no-progress"]) == 0
    table = (out / "table.md").read_text()
    assert "reconstruction off (--no-reconstruction)" in table and "q-diffusion W8A8" in table
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["reconstruction"] is False
    (row,) = [r for r in data["rows"] if r["name"] == "q-diffusion W8A8"]
    assert row["config"]["reconstruction"]["enabled"] is False
    assert row["calibration_info"]["reconstruction"] is None  # no reconstruction pass ran
