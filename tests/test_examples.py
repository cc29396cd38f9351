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


# ~7-10 s each on 2 CPU cores: slow (the SD text-to-image example runs by default).
@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["sdxl_text2image", "stable_diffusion_img2img", "stable_diffusion_inpaint", "controlnet"]
)
def test_pipeline_examples_tiny(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = _run_tiny(name, tmp_path, capsys, "--act-bits", "none")
    assert "quantizing with the default recipe, w8" in out


@pytest.mark.slow  # ~7.5 s on 2 CPU cores
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


_HUB_CLIENT = r"""
import os, socket, sys

# Nothing may leave the machine: only loopback connections.
_connect = socket.socket.connect
def _local_only(sock, address):
    if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
        raise ConnectionRefusedError(f"test guard: refused a connection to {address!r}")
    return _connect(sock, address)
socket.socket.connect = _local_only

import torch
from diffusers_ptq import PTQConfig, push_to_hub, quantize_pipeline
from diffusers_ptq.tiny import tiny_sd_pipeline

torch.set_flush_denormal(True)
token = os.environ["HUB_TEST_TOKEN"]
tiny_sd_pipeline().push_to_hub("alice/tiny-sd", token=token)  # the float base model
pipe = tiny_sd_pipeline()
recipe = PTQConfig(weight_bits=8, act_bits=None)
quantize_pipeline(pipe, recipe, prompts=["a cat"], num_samples=4, num_inference_steps=2, progress=False)
pipe.unet.ptq_state.base_model = "alice/tiny-sd"
push_to_hub(pipe, "alice/tiny-sd-w8", token=token)

sys.path.insert(0, os.environ["EXAMPLES_DIR"])
import load_quantized_from_hub

argv = ["alice/tiny-sd-w8", "--num-inference-steps", "2", "--prompt", "a cat", "--output", os.environ["GRID"]]
sys.exit(load_quantized_from_hub.main(argv))
"""


@pytest.mark.slow  # ~11 s: a subprocess that quantizes, pushes two pipelines and runs the example
def test_load_quantized_from_hub_from_a_local_hub(tmp_path: Path) -> None:
    """The example's Hub mode against tests/hub_server.py: repo id in, base model from the checkpoint."""
    import os
    import subprocess

    import diffusers_ptq
    from hub_server import HubServer

    src = Path(diffusers_ptq.__file__).resolve().parents[1]
    with HubServer(tokens={"hf_example_token": "alice"}) as hub:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"
        }
        env.update(
            HF_ENDPOINT=hub.url,
            HF_HOME=str(tmp_path / "hf_home"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HUB_TEST_TOKEN="hf_example_token",
            EXAMPLES_DIR=str(ROOT / "examples"),
            GRID=str(tmp_path / "grid.png"),
            PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
        )
        proc = subprocess.run(
            [sys.executable, "-c", _HUB_CLIENT], env=env, capture_output=True, text=True, timeout=300
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "alice/tiny-sd-w8 on cpu: w8" in proc.stdout
    assert "float reference: alice/tiny-sd" in proc.stdout
    assert 20.0 < _sqnr(proc.stdout) < math.inf
    with Image.open(tmp_path / "grid.png") as image:
        assert image.height == 2 * image.width


def test_common_flags_and_input_images(tmp_path: Path) -> None:
    common = _load("example_common")
    with pytest.raises(SystemExit):  # argparse's usage error, before any model is built
        common.make_parser(None, "x.png").parse_args(["--act-bits", "four"])
    args = common.make_parser(None, "x.png").parse_args(["--act-bits", "none", "--weight-bits", "4"])
    assert common.default_recipe_kwargs(args) == {"weight_bits": 4, "act_bits": None}
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    image = common.load_input_image(str(tmp_path / "red.png"), 64)
    assert image.size == (64, 64) and image.getpixel((10, 10)) == (255, 0, 0)
