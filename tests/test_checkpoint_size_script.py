"""benchmarks/checkpoint_size.py against its committed result (BENCHMARKS.md section 4).

The full Stable Diffusion 1.5 run builds 860 M random parameters (about 80 s and 11 GB of RAM on 2 cores),
so it is marked slow; the default run checks the same main() on SD 1.5's layout at a small width, and that
the committed JSON matches the shipped config and the figures BENCHMARKS.md prints from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_ptq.zoo import sd15_unet_config
from script_helpers import ROOT, load_script

RESULT = ROOT / "benchmarks" / "results" / "checkpoint_size.json"


def committed() -> dict:
    return json.loads(RESULT.read_text())


def per_channel_rows(result: dict) -> list[dict]:
    """The rows a run without --group-sizes makes (float16 and one per bit width)."""
    return [r for r in result["rows"] if "group_size" not in r]


def test_main_writes_the_result_layout_on_a_narrow_sd15(tmp_path: Path) -> None:
    config = sd15_unet_config()
    config.update(block_out_channels=[32, 64, 128, 128], cross_attention_dim=32, sample_size=8)
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "sizes.json"
    script = load_script("benchmarks", "checkpoint_size")
    result = script.main(["--config", str(tmp_path / "config.json"), "--verify", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert [row["checkpoint"] for row in result["rows"]] == [
        r["checkpoint"] for r in per_channel_rows(committed())
    ]
    fp16, w8, w4 = result["rows"]
    assert w8["bit_exact"] and w4["bit_exact"]
    assert w8["quantized_layers"] == w4["quantized_layers"] == committed()["rows"][1]["quantized_layers"]
    assert w4["bytes"] < w8["bytes"] < fp16["bytes"]


def test_committed_result_is_the_shipped_config_and_matches_benchmarks_md() -> None:
    result = committed()
    assert result["config"] == "diffusers_ptq/zoo/assets/sd15_unet/config.json"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sd15_unet_config())
    assert result["parameters"] == sum(p.numel() for p in unet.parameters())
    fp16 = result["rows"][0]["bytes"]
    text = (ROOT / "BENCHMARKS.md").read_text()
    section = text[text.index("## 4. Checkpoint size") : text.index("## 5.")]
    assert "benchmarks/results/checkpoint_size.json" in section
    for row in result["rows"]:
        assert row["ratio_vs_fp16"] == pytest.approx(row["bytes"] / fp16)
        line = next(x for x in section.splitlines() if x.startswith(f"| {row['checkpoint']}"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{row['bytes'] / 1e6:,.1f} MB"
        assert cells[2] == f"{row['ratio_vs_fp16']:.3f}x"
    assert re.search(rf"{result['parameters'] / 1e6:.1f} M parameters", section)


@pytest.mark.slow
def test_full_sd15_run_reproduces_the_committed_sizes() -> None:
    result = load_script("benchmarks", "checkpoint_size").main([])  # the group rows: see the test below
    expected = committed()
    assert result["parameters"] == expected["parameters"]
    assert [(r["checkpoint"], r["bytes"]) for r in result["rows"]] == [
        (r["checkpoint"], r["bytes"]) for r in per_channel_rows(expected)
    ]


def test_committed_group_rows_add_the_same_scale_tables_at_every_bit_width() -> None:
    """A group row's extra bytes are its scales and zero points (8 bytes per group), which do not depend on
    the weight bits; smaller groups store more of them (about twice as many at 64 as at 128)."""
    rows = {r["checkpoint"]: r for r in committed()["rows"]}
    extra = {}
    for size in (128, 64):
        w8 = rows[f"W8A8 g{size}"]["bytes"] - rows["W8A8"]["bytes"]
        w4 = rows[f"W4A8 g{size}"]["bytes"] - rows["W4A8"]["bytes"]
        # equal up to the safetensors JSON header, whose length varies by a few bytes
        assert w8 > 1_000_000 and abs(w8 - w4) < 1024, size
        extra[size] = w8
    assert 1.9 < extra[64] / extra[128] < 2.2


def test_group_size_rows_on_a_narrow_sd15(tmp_path: Path) -> None:
    config = sd15_unet_config()
    config.update(block_out_channels=[32, 64, 128, 128], cross_attention_dim=32, sample_size=8)
    (tmp_path / "config.json").write_text(json.dumps(config))
    script = load_script("benchmarks", "checkpoint_size")
    args = ["--config", str(tmp_path / "config.json"), "--bits", "4", "--group-sizes", "32", "--verify"]
    result = script.main(args)
    fp16, w4, grouped = result["rows"]
    assert [row["checkpoint"] for row in result["rows"]] == ["float16", "W4A8", "W4A8 g32"]
    assert grouped["bit_exact"] and grouped["group_size"] == 32 and result["group_sizes"] == [32]
    assert grouped["per_channel_fallbacks"] >= 1  # conv_in: K = 4 x 9
    assert grouped["quantized_layers"] == w4["quantized_layers"]
    # Same packed codes, plus one fp32 scale (symmetric: zero points too, all stored) per group.
    assert w4["bytes"] < grouped["bytes"] < fp16["bytes"]
