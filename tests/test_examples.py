"""Smoke tests for the scripts in examples/ (offline, on the tiny pipelines)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from script_helpers import ROOT, load_script

torch.set_flush_denormal(True)
sys.path.insert(0, str(ROOT / "examples"))  # as `python examples/X.py` does: the scripts share example_common


def _load(name: str) -> ModuleType:
    return load_script("examples", name)


def test_stable_diffusion_text2image_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    example = _load("stable_diffusion_text2image")
    output = tmp_path / "grid.png"
    # Weight-only W8 keeps the tiny run to a few seconds; the full W8A8 path is covered by test_cli.
    argv = ["--tiny", "--act-bits", "none", "--prompt", "a red cube", "--output", str(output)]
    assert example.main(argv) == 0
    with Image.open(output) as image:
        assert image.height == 2 * image.width  # one prompt: a float tile above a quantized tile
    assert "SQNR of quantized vs float images" in capsys.readouterr().out


def _sqnr(output: str) -> float:
    match = re.search(r"SQNR of quantized vs float images: (\S+) dB", output)
    assert match is not None, output
    return float(match.group(1))


def _run_tiny(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str
) -> tuple[str, Image.Image]:
    """Run examples/`name`.py --tiny weight-only on one prompt; its output and grid (float over quantized)."""
    output = tmp_path / "grid.png"
    argv = ["--tiny", "--prompt", "a red cube", "--output", str(output), *extra]
    assert _load(name).main(argv) == 0
    out = capsys.readouterr().out
    # Quantization changed the images (finite SQNR) without wrecking them.
    assert 20.0 < _sqnr(out) < math.inf
    with Image.open(output) as image:
        image.load()
    assert image.height == 2 * image.width  # one prompt: a float tile above a quantized tile
    return out, image


@pytest.mark.parametrize(
    "name", ["sdxl_text2image", "stable_diffusion_img2img", "stable_diffusion_inpaint", "controlnet"]
)
def test_pipeline_examples_tiny(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = _run_tiny(name, tmp_path, capsys, "--act-bits", "none")
    assert "quantizing with the default recipe, w8" in out


def test_load_quantized_from_hub_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Weight-only keeps it to seconds; W8A8 reloading is covered bit for bit by test_serialization.
    out, _ = _run_tiny("load_quantized_from_hub", tmp_path, capsys, "--act-bits", "none")
    assert "reproduces the quantized images bit for bit: True" in out


def test_load_quantized_from_hub_needs_a_repo() -> None:
    with pytest.raises(SystemExit):
        _load("load_quantized_from_hub").main([])


def test_edge_map_is_white_edges_on_black() -> None:
    controlnet = _load("controlnet")
    edges = np.asarray(controlnet.edge_map(controlnet.synthetic_drawing()))
    assert set(np.unique(edges)) == {0, 255}
    assert 0.05 < (edges > 0).mean() < 0.5
