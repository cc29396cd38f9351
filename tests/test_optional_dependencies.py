"""A missing optional package stops its command before any work and names the `pip install` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from diffusers_ptq.cli import bench as bench_cli
from diffusers_ptq.cli import inspect_ranges as inspect_cli
from diffusers_ptq.cli import main as cli_main

PLOT_HINT = "pip install 'diffusers-ptq[plot]'"


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as on a machine without it.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _no_model(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a model was loaded although the plot could never be written")


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--quick", "--no-progress"],
        ["bench", "--ablation", "groups", "--quick", "--no-progress"],
        ["inspect", "--model", "tiny:ddim"],
    ],
    ids=["bench", "ablation", "inspect"],
)
def test_missing_matplotlib_stops_before_work(
    argv: list[str], tmp_path: Path, no_matplotlib: None, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(bench_cli, "load_pipeline", _no_model)
    monkeypatch.setattr(inspect_cli, "load_pipeline", _no_model)
    out = tmp_path / "out"
    assert cli_main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert PLOT_HINT in err, err
    assert not out.exists()


def test_speed_benchmark_missing_matplotlib_stops_before_work(
    tmp_path: Path, no_matplotlib: None, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from diffusers_ptq.benchmark.speed import cli as speed_cli

    monkeypatch.setattr(speed_cli, "run_speed_benchmark", _no_model)
    out = tmp_path / "out"
    assert speed_cli.main(["--model", "fashion", "--output", str(out)]) == 2
    assert PLOT_HINT in capsys.readouterr().err
    assert not out.exists()
