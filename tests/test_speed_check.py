"""The speed benchmark checks each row's output against the float model's, and --strict fails on errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffusers_ptq.benchmark.speed.benchmark import SpeedRowError, run_speed_benchmark
from diffusers_ptq.benchmark.speed.check import MIN_SQNR_DB, RowOutputError, check_output, min_sqnr_db
from diffusers_ptq.benchmark.speed.cli import main as speed_main
from diffusers_ptq.benchmark.speed.models import speed_models
from diffusers_ptq.benchmark.speed.report import markdown_report
from diffusers_ptq.benchmark.speed.rows import PREPARE, PreparedRow, RowContext
from diffusers_ptq.benchmark.speed.settings import SpeedSettings


class Broken(nn.Module):
    """The float UNet with its output spoiled by `spoil` (fast, and wrong)."""

    def __init__(self, unet: nn.Module, spoil) -> None:
        super().__init__()
        self.unet, self.spoil = unet, spoil

    def forward(self, **kwargs):
        return (self.spoil(self.unet(**kwargs).sample),)


def _broken_row(spoil):
    def prepare(ctx: RowContext) -> PreparedRow:
        return PreparedRow(Broken(ctx.float_model(), spoil), 1, ["broken on purpose"])

    return prepare


def _settings(rows: list[str], **overrides) -> SpeedSettings:
    return SpeedSettings(models=["tiny"], rows=rows, repeats=1, warmup=0, **overrides)


def _tiny_unet2d():
    return speed_models(["tiny"], batch_size=2)[1:]


def test_floors_follow_the_row_and_its_bits() -> None:
    w8, w4 = SpeedSettings(), SpeedSettings(weight_bits=4)
    assert min_sqnr_db("float-compiled", w4) == MIN_SQNR_DB["float"]
    assert min_sqnr_db("int8", w8) == MIN_SQNR_DB[8] > min_sqnr_db("int8", w4) == MIN_SQNR_DB[4]
    assert min_sqnr_db("quanto", w4) == MIN_SQNR_DB[8]  # other libraries stay W8A8
    ref = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert check_output("int8", w8, (ref + 1e-3 * ref.flip(0),), ref) > MIN_SQNR_DB[8]
    with pytest.raises(RowOutputError, match="shape"):
        check_output("int8", w8, ref[:1], ref)
    with pytest.raises(RowOutputError, match="non-finite"):
        check_output("int8", w8, torch.where(ref > 2, torch.inf, ref), ref)
    with pytest.raises(RowOutputError, match="below this row's 25 dB"):
        check_output("float", w8, ref + 0.1 * torch.randn_like(ref), ref)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (torch.neg, "wrong output: output SQNR -6.0 dB"),
        (torch.zeros_like, "wrong output: output SQNR 0.0 dB"),
        (lambda x: x * torch.nan, "wrong output: output has"),
    ],
)
def test_a_fast_row_with_a_wrong_output_is_an_error(spoil, message: str, monkeypatch) -> None:
    monkeypatch.setitem(PREPARE, "fake-quant", _broken_row(spoil))
    result = run_speed_benchmark(
        _settings(["float", "fake-quant"]), models=_tiny_unet2d(), log=lambda _: None
    )
    rows = {row.id: row for row in result.models[0].rows}
    assert rows["float"].ok and rows["float"].output_sqnr_db == 200.0  # the reference itself
    bad = rows["fake-quant"]
    assert bad.status == "error" and bad.reason.startswith(message), bad.reason
    assert bad.median_ms is None and bad.speedup is None  # never reported as a timing
    assert result.errors() == [f"tiny-unet2d: {bad.label}: {bad.reason}"]
    assert f"ERROR: {bad.reason}" in markdown_report(result)


def test_a_row_that_raises_fails_a_strict_run_only(monkeypatch) -> None:
    def no_compile(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", no_compile)
    rows = ["float", "float-compiled"]
    result = run_speed_benchmark(_settings(rows), models=_tiny_unet2d(), log=lambda _: None)
    compiled = result.models[0].rows[1]
    assert compiled.status == "error" and "torch.compile is not supported here" in compiled.reason
    with pytest.raises(SpeedRowError, match=r"1 row\(s\) in error: .*torch.compile is not supported") as info:
        run_speed_benchmark(_settings(rows, strict=True), models=_tiny_unet2d(), log=lambda _: None)
    assert info.value.result.models[0].rows[0].ok  # the whole run is kept


def test_a_missing_library_stays_a_skip_in_strict_mode(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # importing it now raises ImportError
    settings = _settings(["float", "quanto"], strict=True)
    result = run_speed_benchmark(settings, models=_tiny_unet2d(), log=lambda _: None)
    quanto = result.models[0].rows[1]
    assert quanto.status == "skipped" and "pip install 'diffusers-ptq[compare]'" in quanto.reason
    assert not result.errors()


def test_strict_command_writes_its_outputs_then_exits_1(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(PREPARE, "int8", _broken_row(torch.neg))
    monkeypatch.setattr(
        "diffusers_ptq.benchmark.speed.benchmark.speed_models", lambda names, b: _tiny_unet2d()
    )
    argv = ["--model", "tiny", "--rows", "float,int8", "--repeats", "1", "--warmup", "0"]
    assert speed_main([*argv, "--output", str(tmp_path / "lax")]) == 0
    assert "error: tiny-unet2d" in capsys.readouterr().err
    assert speed_main([*argv, "--strict", "--output", str(tmp_path / "strict")]) == 1
    assert "error (--strict): 1 row(s) in error" in capsys.readouterr().err
    data = json.loads((tmp_path / "strict" / "results.json").read_text())
    assert data["settings"]["strict"] is True
    assert [r["status"] for r in data["models"][0]["rows"]] == ["ok", "error"]
