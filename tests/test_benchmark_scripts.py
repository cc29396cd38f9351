"""Smoke tests for the measurement scripts in benchmarks/ that have no test of their own (tiny shapes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from diffusers_ptq.integer.features import onednn_available

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not onednn_available(), reason="needs torch's oneDNN int8 ops")
def test_gemm_split_rows_are_exact_and_written(tmp_path: Path) -> None:
    script = _load("gemm_split")
    out = tmp_path / "gemm.json"
    argv = ["--shape", "96", "72", "24", "--repeats", "2", "--warmup", "0", "--output", str(out)]
    assert script.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["shape"] == {"M": 96, "K": 72, "N": 24}
    assert set(result["median_ms"]) == {
        "fp32",
        "int8 (one GEMM, no split)",
        "int8 split pair (W8A8)",
        "int8 split concat [a | a]",
    }
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not onednn_available(), reason="needs torch's oneDNN int8 ops")
def test_gemm_split_check_catches_a_wrong_row() -> None:
    script = _load("gemm_split")
    rows, operands = script.gemm_rows(32, 16, 8)
    rows["int8 split pair (W8A8)"] = rows["int8 (one GEMM, no split)"]  # W4 codes where W8 is expected
    with pytest.raises(RuntimeError, match="split pair"):
        script.check(rows, operands)


def test_gemm_split_rejects_bad_shape(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _load("gemm_split").main(["--shape", "0", "8", "8"])
    assert "--shape must be positive" in capsys.readouterr().err
