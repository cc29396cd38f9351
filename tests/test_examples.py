"""Smoke tests for the scripts in examples/ (offline, on the tiny pipelines)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from script_helpers import load_script

torch.set_flush_denormal(True)


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
