"""benchmarks/variance_absorption.py: float, quantized and absorbed rows on the same noise, one JSON file."""

from __future__ import annotations

import argparse
import json

import pytest

from script_helpers import load_script

script = load_script("benchmarks", "variance_absorption")


def test_bits_and_bad_arguments_are_refused():
    assert script.parse_bits("W4A8") == (4, 8)
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected e\.g\. W4A8"):
        script.parse_bits("4bit")
    with pytest.raises(SystemExit):
        script.main(["--eta", "0", "--output", "x.json"])


@pytest.mark.slow  # ~13 s on 2 CPU cores
def test_smoke_run_on_the_colour_model_writes_three_rows(tmp_path):
    out = tmp_path / "va.json"
    argv = [
        "--model",
        "colour-fashion",
        "--num-samples",
        "4",
        "--batch-size",
        "2",
        "--steps",
        "6",
        "--calibration-samples",
        "12",
        "--threads",
        "1",
        "--no-progress",
        "--output",
        str(out),
    ]
    assert script.main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["row"] for r in result["rows"]] == ["float", "default W4A8", "default W4A8 + absorption"]
    assert all(r["FD"] > 0 for r in result["rows"])
    ratios = result["noise_ratio_per_noisy_step"]
    # 6 DDIM steps, the last one noiseless: 5 noisy steps per call, each ratio in [0, 1], the early ones ~1
    assert len(ratios) == 5 and all(0.0 <= r <= 1.0 for r in ratios) and ratios[0] > 0.99
    assert len(result["residual_var"]) == 1 and result["residual_var"][0] > 0
    assert not list(tmp_path.glob("*.tmp"))
