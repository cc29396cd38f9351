"""Bad input and faults: malformed configs, missing or corrupt tensors, other architectures, killed saves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

import diffusers_ptq
from diffusers_ptq import CheckpointError, PTQQuantizer
from diffusers_ptq.serialization import FORMAT_VERSION
from serialization_helpers import (
    WEIGHTS,
    edit_config,
    rewrite,
    save_quantized_ddim,
    unet_copy,
)


@pytest.fixture(scope="module")
def saved_ddim(tmp_path_factory):
    return save_quantized_ddim(tmp_path_factory)


# -- bad input and faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["config", "header"])
def test_newer_format_version_is_refused(saved_ddim, tmp_path, where):
    unet_dir = unet_copy(saved_ddim, tmp_path)
    if where == "config":
        edit_config(unet_dir, lambda q: q.update(format_version=FORMAT_VERSION + 1))
    else:
        rewrite(unet_dir / WEIGHTS, lambda t, m: m.update({"diffusers_ptq.format_version": "2"}))
    with pytest.raises(CheckpointError, match=r"format_version.*=2 is newer than this diffusers-ptq reads"):
        UNet2DModel.from_pretrained(unet_dir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: q.update(calibration_seed=3), r"unknown field\(s\) \['calibration_seed'\]"),
        (
            lambda q: q["ptq_config"]["weights"].update(rounding_mode="up"),
            r"unknown key\(s\) \['weights.rounding_mode'\]",
        ),
        (lambda q: q.pop("ptq_config"), "has no 'ptq_config'"),
        (lambda q: q.update(num_timestep_groups=0), "num_timestep_groups=0 is invalid"),
    ],
)
def test_malformed_quantization_config_is_named(saved_ddim, tmp_path, edit, message):
    unet_dir = unet_copy(saved_ddim, tmp_path)
    edit_config(unet_dir, edit)
    with pytest.raises(ValueError, match=message):
        UNet2DModel.from_pretrained(unet_dir)


@pytest.mark.parametrize(
    ("key", "named"),
    [
        (
            "down_blocks.0.resnets.0.conv1.act_quantizers.0.scale",
            "down_blocks.0.resnets.0.conv1.act_quantizers",
        ),
        ("down_blocks.0.resnets.0.conv1.weight_packed", "down_blocks.0.resnets.0.conv1.weight"),
    ],
)
def test_missing_tensor_is_named(saved_ddim, tmp_path, key, named):
    unet_dir = unet_copy(saved_ddim, tmp_path)
    rewrite(unet_dir / WEIGHTS, lambda t, m: t.pop(key))
    with pytest.raises(CheckpointError, match=f"no tensor for {named}"):
        UNet2DModel.from_pretrained(unet_dir)


def test_other_architecture_names_first_mismatched_module_and_shape(saved_ddim):
    pipe, directory = saved_ddim
    with torch.device("meta"):
        other = UNet2DModel.from_config({**pipe.unet.config, "block_out_channels": (16, 48)})
    first = next(
        layer.name
        for layer in pipe.unet.ptq_state.plan.layers
        if other.get_submodule(layer.name).weight.shape != pipe.unet.get_submodule(layer.name).weight.shape
    )
    with pytest.raises(CheckpointError) as err:
        UNet2DModel.from_pretrained(directory / "unet", block_out_channels=(16, 48))
    message = str(err.value)
    assert message.startswith(f"layer {first!r}: the checkpoint's weight has shape")
    assert str(list(pipe.unet.get_submodule(first).weight.shape)) in message
    assert str(list(other.get_submodule(first).weight.shape)) in message
    assert "another architecture" in message


def test_other_model_class_names_the_missing_module(saved_ddim):
    with pytest.raises(CheckpointError, match=r"UNet2DConditionModel has .* there: .* another architecture"):
        UNet2DConditionModel.from_pretrained(saved_ddim[1] / "unet")


def test_corrupted_tensor_data_fails_its_checksum(saved_ddim, tmp_path):
    unet_dir = unet_copy(saved_ddim, tmp_path)
    path = unet_dir / WEIGHTS
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"fails its CRC-32 check .* corrupted"):
        UNet2DModel.from_pretrained(unet_dir)


def test_truncated_file_gives_a_clear_error(saved_ddim, tmp_path):
    unet_dir = unet_copy(saved_ddim, tmp_path)
    path = unet_dir / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises((OSError, ValueError), match=WEIGHTS):
        UNet2DModel.from_pretrained(unet_dir)


def test_header_without_manifest_is_refused(saved_ddim, tmp_path):
    unet_dir = unet_copy(saved_ddim, tmp_path)
    rewrite(unet_dir / WEIGHTS, lambda t, m: [m.pop(k) for k in list(m) if k.startswith("diffusers_ptq")])
    with pytest.raises(CheckpointError, match=r"no 'diffusers_ptq\.format_version' metadata"):
        UNet2DModel.from_pretrained(unet_dir)


def test_pickle_is_never_written(saved_ddim, tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        saved_ddim[0].unet.save_pretrained(tmp_path / "out", safe_serialization=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


# -- atomic saving ------------------------------------------------------------------------------------------


def test_failed_save_leaves_the_previous_checkpoint_untouched(saved_ddim, tmp_path, monkeypatch):
    target = unet_copy(saved_ddim, tmp_path)
    (target / "README.md").write_text("my notes")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real = safetensors.torch.save_file

    def failing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        saved_ddim[0].unet.save_pretrained(target)
    with pytest.raises(OSError, match="disk full"):
        saved_ddim[0].unet.save_pretrained(tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]  # no partial directory, no "fresh"
    monkeypatch.undo()
    saved_ddim[0].unet.save_pretrained(target)  # a successful save replaces it, keeping the user's README
    assert (target / "README.md").read_text() == "my notes"


_KILLED_SAVE = """
import json, os, signal, sys
from diffusers import UNet2DModel

source, target = sys.argv[1], sys.argv[2]
try:
    UNet2DModel.from_pretrained(source)
    print(json.dumps({"without_import": "loaded"}), flush=True)
except Exception as err:
    print(json.dumps({"without_import": f"{type(err).__name__}: {err}"}), flush=True)

import diffusers_ptq  # noqa: E402,F401
import safetensors.torch  # noqa: E402

unet = UNet2DModel.from_pretrained(source)
real = safetensors.torch.save_file

def write_half_then_die(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) // 2)
    print(json.dumps({"killed_while_writing": filename}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = write_half_then_die
unet.save_pretrained(target)
print(json.dumps({"survived": True}), flush=True)
"""


@pytest.fixture(scope="module")
def killed_save(saved_ddim, tmp_path_factory):
    """A child process loads a checkpoint without importing diffusers_ptq, then with it, and is SIGKILLed
    half-way through saving over an existing checkpoint."""
    root = tmp_path_factory.mktemp("killed")
    target = root / "unet"
    shutil.copytree(saved_ddim[1] / "unet", target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    src = Path(diffusers_ptq.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(saved_ddim[1] / "unet"), str(target)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    events = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            events.update(json.loads(line))
    return proc, events, root, target, before


def test_loading_without_import_gives_diffusers_error(killed_save):
    _, events, *_ = killed_save
    assert events["without_import"].startswith("ValueError: Unknown quantization type, got diffusers_ptq")


def test_save_killed_midway_never_leaves_a_half_written_checkpoint(killed_save):
    proc, events, root, target, before = killed_save
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "killed_while_writing" in events and "survived" not in events
    partial = Path(events["killed_while_writing"]).parent
    assert partial.parent == root and partial.name.startswith(".unet.") and partial.name.endswith(".partial")
    # The target is the previous checkpoint, byte for byte, and still loads.
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert isinstance(UNet2DModel.from_pretrained(target).hf_quantizer, PTQQuantizer)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["unet"]
    # What the killed save left is hidden, and loading it fails with a clear error.
    with pytest.raises((OSError, ValueError), match=WEIGHTS):
        UNet2DModel.from_pretrained(partial)
