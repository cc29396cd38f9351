"""`bench --ablation ... --calibration-seeds`: every quantized row once per calibration draw, and the
per-recipe summary over draws."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusers_ptq import cli
from diffusers_ptq.benchmark.ablation.benchmark import AblationResult, ablation_rows, study_notes
from diffusers_ptq.benchmark.ablation.draws import draw_name, summarise_draws
from diffusers_ptq.benchmark.ablation.report import ablation_table, write_ablation_outputs
from diffusers_ptq.benchmark.ablation.settings import AblationSettings
from diffusers_ptq.benchmark.quality.benchmark import RowResult


def test_every_quantized_row_runs_once_per_draw_and_the_float_row_once() -> None:
    settings = AblationSettings("w4", rows=["nearest", "gptq"], calibration_seeds=[3, 1])
    rows = ablation_rows(settings)
    assert [r.name for r in rows] == [
        "float",
        "W4A8 nearest [calibration seed 3]",
        "W4A8 gptq [calibration seed 3]",
        "W4A8 nearest [calibration seed 1]",
        "W4A8 gptq [calibration seed 1]",
    ]
    assert [r.calibration_seed for r in rows] == [None, 3, 3, 1, 1]
    assert [r.config.calibration.seed for r in rows[1:]] == [3, 3, 1, 1]
    assert [r.recipe for r in rows[1:]] == ["W4A8 nearest", "W4A8 gptq"] * 2
    # The draws differ in the calibration seed only.
    a, b = rows[1].config.to_dict(), rows[3].config.to_dict()
    a["calibration"].pop("seed"), b["calibration"].pop("seed")
    assert a == b
    # One draw keeps the names results made before draws existed use.
    single = ablation_rows(AblationSettings("w4", rows=["nearest"], calibration_seeds=[2]))
    assert [r.name for r in single] == ["float", "W4A8 nearest"]
    assert draw_name("W4A8 nearest", 2, 1) == "W4A8 nearest"
    for study in ("groups", "selectors"):
        names = [r.name for r in ablation_rows(AblationSettings(study, calibration_seeds=[0, 1]))[1:]]
        assert len(names) == len(set(names)) and all(n.endswith("]") for n in names), study


def _result(fd: dict[str, float], sqnr: float = 20.0) -> AblationResult:
    """A finished two-draw w4 study with made-up metrics (FD per row name; float FD 10)."""
    settings = AblationSettings("w4", rows=["nearest", "gptq"], calibration_seeds=[0, 5], seeds=[0, 1])
    rows = ablation_rows(settings)
    results = []
    for i, spec in enumerate(rows):
        value = 10.0 if spec.config is None else fd[spec.name]
        row = RowResult(spec.name, None, spec.weight_bits, spec.act_bits, {"FD": [value - 1, value + 1]})
        if spec.config is not None:
            row.sqnr_db, row.bias_per_step = sqnr + i, [0.01 * i, 0.03 * i]
        results.append(row)
    return AblationResult(settings, rows, results, [999, 0], {}, "made up")


FD = {
    "W4A8 nearest [calibration seed 0]": 12.0,
    "W4A8 gptq [calibration seed 0]": 10.5,
    "W4A8 nearest [calibration seed 5]": 13.0,
    "W4A8 gptq [calibration seed 5]": 10.0,
}


def test_summary_gives_each_recipe_its_change_per_draw_mean_and_spread(tmp_path: Path) -> None:
    result = _result(FD)
    nearest, gptq = summarise_draws(result.pairs(), 10.0)
    assert (nearest.recipe, nearest.seeds) == ("W4A8 nearest", [0, 5])
    assert nearest.fd_change == pytest.approx([20.0, 30.0])
    assert nearest.fd_change_mean == pytest.approx(25.0) and nearest.fd_change_spread == pytest.approx(10.0)
    assert gptq.fd_change == pytest.approx([5.0, 0.0]) and gptq.fd_change_mean == pytest.approx(2.5)
    assert nearest.sqnr_db == [21.0, 23.0] and nearest.bias == pytest.approx([0.02, 0.06])
    table = ablation_table(result)
    assert "Over calibration draws (seeds 0, 5):" in table
    assert "| W4A8 nearest | 0: +20.0 %, 5: +30.0 % | +25.0 % | 10.0 | 22.00 | 0.0400 |" in table
    assert "| W4A8 gptq | 0: +5.0 %, 5: +0.0 % | +2.5 % | 5.0 | 23.00 | 0.0600 |" in table
    write_ablation_outputs(result, tmp_path, header="header\n\n")
    data = json.loads((tmp_path / "results.json").read_text())
    assert [d["recipe"] for d in data["draws"]] == ["W4A8 nearest", "W4A8 gptq"]
    assert data["draws"][0]["fd_change_mean_pct"] == pytest.approx(25.0)
    assert data["settings"]["calibration_seeds"] == [0, 5]
    assert (tmp_path / "w4_parts.png").stat().st_size > 0
    assert "once per calibration draw (calibration seeds 0, 5:" in " ".join(study_notes(result.settings))
    one_draw = study_notes(AblationSettings("w4", calibration_seeds=[2]))
    assert one_draw[-1] == "Every quantized row calibrates on calibration seed 2."
    assert not any("calibration seed" in note for note in study_notes(AblationSettings("w4")))


def test_summary_without_a_fidelity_metric_shows_dashes() -> None:
    result = _result(FD)
    for row in result.results:
        row.metrics = {}
    (summary, _) = summarise_draws(result.pairs(), None)
    assert summary.fd_change == [None, None] and summary.fd_change_mean is None
    assert summary.fd_change_spread is None
    assert "| W4A8 nearest | 0: –, 5: – | – | – | 22.00 | 0.0400 |" in ablation_table(result)


def test_two_draws_end_to_end_on_a_tiny_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "draws"
    argv = ["bench", "--model", "tiny:ddim", "--ablation", "w4", "--quick", "--rows", "nearest"]
    argv += ["--calibration-seeds", "0,1", "--num-inference-steps", "3", "--num-samples", "2"]
    argv += ["--sqnr-samples", "2", "--calibration-samples", "6", "--output", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "calibration seeds 0, 1;" in printed and "Over calibration draws (seeds 0, 1):" in printed
    data = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["float", "W4A8 nearest [calibration seed 0]", "W4A8 nearest [calibration seed 1]"]
    first, second = data["rows"][1:]
    assert first["config"]["calibration"]["seed"] == 0 and second["config"]["calibration"]["seed"] == 1
    # Another draw calibrates on other samples, so it quantizes differently.
    assert first["sqnr_db"] != second["sqnr_db"]
    assert data["draws"][0]["sqnr_db"] == [first["sqnr_db"], second["sqnr_db"]]
    assert "once per calibration draw (calibration seeds 0, 1" in (out / "table.md").read_text()
    assert (out / "w4_parts.png").stat().st_size > 0
