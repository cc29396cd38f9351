"""benchmarks/mixed_precision_cost.py on a tiny pipeline: rows, sizes and the promoted layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusers_ptq.integer.features import onednn_available
from script_helpers import load_script


@pytest.mark.slow  # ~9 s on 2 CPU cores
@pytest.mark.skipif(not onednn_available(), reason="convert needs torch's oneDNN int8 ops on the CPU")
def test_rows_sizes_and_promoted_layers(tmp_path: Path) -> None:
    script = load_script("benchmarks", "mixed_precision_cost")
    out = tmp_path / "cost.json"
    argv = ["--model", "tiny:ddim", "--layers", "2", "--batch", "2", "--repeats", "1"]
    result = script.main([*argv, "--num-samples", "8", "--num-inference-steps", "4", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    base, high, kept = result["rows"]
    assert [r["row"] for r in result["rows"]] == ["W4A8", "W4A8 + top 2 at W8A8", "W4A8 + top 2 float"]
    assert base["promoted"] == [] and len(high["promoted"]) == len(kept["promoted"]) == 2
    assert base["bytes"] < high["bytes"] < kept["bytes"]
    assert high["layers_by_bits"]["W8A8"] == base["layers_by_bits"]["W8A8"] + 2
    assert kept["integer_layers"] == base["integer_layers"] - 2
