"""Tests for the `diffusers-ptq` command line (diffusers_ptq.cli)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_ptq import PTQConfig, cli
from diffusers_ptq.cli import common, quantize

torch.set_flush_denormal(True)

QUANTIZE_OPTIONS = [
    "--model",
    "--preset",
    "--config",
    "--weight-bits",
    "--act-bits",
    "--timestep-groups",
    "--bias-correction",
    "--weight-rounding",
    "--float-layers",
    "--num-samples",
    "--num-inference-steps",
    "--batch-size",
    "--seed",
    "--guidance-scale",
    "--prompt",
    "--prompts-file",
    "--pipeline-kwargs",
    "--init-image",
    "--mask-image",
    "--control-image",
    "--device",
    "--dtype",
    "--no-progress",
    "--samples",
    "--output",
    "--overwrite",
]
OUTPUT_FILES = {
    "ptq_config.json",
    "report.json",
    "report.txt",
    "quantizer_state.safetensors",
    "comparison.png",
}
# Cheapest settings that still run the whole flow: float images, calibration, quantized images.
FAST = ["--num-samples", "4", "--num-inference-steps", "2", "--samples", "1", "--no-progress"]


def test_quantize_tiny_ddim_writes_all_outputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = ["quantize", "--model", "tiny:ddim", "--num-samples", "16", "--num-inference-steps", "5"]
    assert cli.main([*argv, "--samples", "2", "--output", str(out), "--no-progress"]) == 0
    # Only the output directory: no temporary directory left next to it.
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES

    config = PTQConfig.from_json((out / "ptq_config.json").read_text())
    assert config.calibration.num_samples == 16 and config.calibration.num_inference_steps == 5
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_samples"] == 16 and report["num_inference_steps"] == 5
    assert (out / "report.txt").read_text().startswith("diffusers-ptq: custom w8a8")

    state = load_file(out / "quantizer_state.safetensors")
    scales = [k for k in state if k.endswith(".scale")]
    assert scales and all(state[k].numel() >= 1 for k in scales)
    assert any(k.endswith(".zero_point") for k in state) and any(k.endswith(".group_map") for k in state)
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    with safe_open(out / "quantizer_state.safetensors", framework="pt") as f:
        assert f.metadata()["tag"] == "w8a8"

    with Image.open(out / "comparison.png") as image:
        tile = image.height // 2
        assert image.size == (2 * tile, 2 * tile)  # two samples per row, two rows, square tiles
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).float()
    top, bottom = pixels[:tile], pixels[tile:]
    # Same noise, small error: measured 9.8 of 255 per pixel and 20.6 dB.
    assert not torch.equal(top, bottom) and (top - bottom).abs().mean() < 16
    sqnr = re.search(r"SQNR of quantized vs float: ([\d.]+) dB", capsys.readouterr().out)
    assert sqnr is not None and float(sqnr.group(1)) > 16


def test_quantize_tiny_sd_with_preset_and_prompts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sd"
    argv = ["quantize", "--model", "tiny:sd", "--preset", "q-diffusion", "--prompt", "a red cube"]
    argv += ["--prompt", "a blue sphere on grass", "--output", str(out), *FAST]
    argv += ["--reconstruction-iterations", "3", "--reconstruction-act-iterations", "2"]
    argv += ["--reconstruction-checkpoint", str(tmp_path / "ckpt")]
    assert cli.main(argv) == 0
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "q-diffusion"
    units = report["reconstruction"]["units"]
    assert {u["iterations"] for u in units if u["phase"] == "weights"} == {3}
    assert {u["iterations"] for u in units if u["phase"] == "acts"} == {2}
    assert "reconstruction:" in (out / "report.txt").read_text()
    assert json.loads((out / "ptq_config.json").read_text())["reconstruction"]["iterations"] == 3
    assert any((tmp_path / "ckpt").iterdir())  # finished blocks, for resuming
    assert "built-in prompts" not in capsys.readouterr().out


def test_quantize_without_reconstruction(tmp_path: Path) -> None:
    out = tmp_path / "ddim"
    argv = ["quantize", "--model", "tiny:ddim", "--preset", "eda-dm", "--weight-bits", "4"]
    argv += ["--no-reconstruction", "--output", str(out), *FAST]
    assert cli.main(argv) == 0
    assert json.loads((out / "report.json").read_text())["reconstruction"] is None
    config = json.loads((out / "ptq_config.json").read_text())["reconstruction"]
    assert config["enabled"] is False
    assert config["weight_lr"] == 0.5  # the preset's W4A8 learning rate followed --weight-bits


def test_text_pipeline_without_prompts_uses_builtin_list(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}

    def record(pipe: object, config: PTQConfig, *, prompts: list[str], progress: bool, **_: object) -> None:
        seen["prompts"] = prompts
        raise ValueError("stop after recording the prompts")

    monkeypatch.setattr(quantize, "quantize_pipeline", record)
    argv = ["quantize", "--model", "tiny:sd", "--output", str(tmp_path / "o"), *FAST]
    assert cli.main(argv) == 2
    assert f"using {len(quantize.DEFAULT_PROMPTS)} built-in prompts" in capsys.readouterr().out
    # As given: quantize_pipeline cycles them over the calibration trajectories.
    assert seen["prompts"] == quantize.DEFAULT_PROMPTS
    assert cli.main([*argv, "--prompt", "a cat"]) == 2
    assert seen["prompts"] == ["a cat"]
    assert list(tmp_path.iterdir()) == []


def test_quantize_help_mentions_every_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    parser_options = {
        opt
        for action in cli.build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
        for opt in action.option_strings
    }
    for option in {*QUANTIZE_OPTIONS, *parser_options}:
        assert option in text, option
    for word in ("tiny:ddim", "tiny:sdxl", "q-diffusion", "ptq4dm", "float16", "per_step", "Default"):
        assert word in text
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "quantize" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "setup", "message"),
    [
        (["--preset", "nope"], None, "unknown preset"),
        (["--config", "{cfg}"], "{not json", "malformed"),
        (["--config", "{cfg}"], '{"weights": {"bits": 99}}', "weights.bits=99"),
        (["--config", "{dir}/missing.json"], None, "does not exist"),
        (["--weight-bits", "1"], None, "weights.bits=1"),
        (["--timestep-groups", "0"], None, "timestep_groups=0"),
        (["--prompts-file", "{dir}/missing.txt"], None, "does not exist"),
        (["--samples", "0"], None, "--samples=0"),
        (["--model", "tiny:nope"], None, "unknown tiny pipeline"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nope"], None, "vice"),
    ],
)
def test_bad_input_exits_2_with_one_line_message(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], setup: str | None, message: str
) -> None:
    cfg = tmp_path / "cfg.json"
    if setup is not None:
        cfg.write_text(setup)
    extra = [a.format(cfg=cfg, dir=tmp_path) for a in extra]
    out = tmp_path / "out"
    assert cli.main(["quantize", *extra, "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusers-ptq: error: ") and err.count("\n") == 1
    assert message in err
    assert not out.exists()


def test_non_empty_output_is_refused_without_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["quantize", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "argv", [["quantize", "--preset", "ptq4dm", "--config", "x.json"], ["quantize", "--act-bits", "x"], []]
)
def test_argparse_errors_exit_2(tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--output", str(tmp_path / "o")] if argv else argv)
    assert exc.value.code == 2


@pytest.mark.parametrize(("error", "existing"), [(RuntimeError, False), (ValueError, True)])
def test_failure_during_quantization_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[Exception], existing: bool
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise error("calibration blew up")

    monkeypatch.setattr(quantize, "quantize_pipeline", fail)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("previous run")
    argv = ["quantize", "--model", "tiny:ddim", "--output", str(out), "--overwrite", *FAST]
    if error is RuntimeError:  # unexpected errors propagate with their traceback
        with pytest.raises(RuntimeError, match="blew up"):
            cli.main(argv)
    else:  # ValueError/TypeError from quantize_pipeline's validation: a message and exit code 2
        assert cli.main(argv) == 2
    expected = ["old.txt"] if existing else None
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == expected
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])


def test_output_directory_is_replaced_entirely(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("old")  # unlike checkpoint saves, command outputs carry nothing over
    with common.atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_prompts_file_is_read_one_prompt_per_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog on a sofa  \n")
    args = cli.build_parser().parse_args(
        ["quantize", "--output", "o", "--prompt", "x", "--prompts-file", str(path)]
    )
    assert quantize._read_prompts(args) == ["x", "a cat", "a dog on a sofa"]


def test_presets_lists_every_preset(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert "ptq4dm" in names and "q-diffusion" in names
    summary = json.loads(lines[names.index("ptq4dm")].split(maxsplit=1)[1])
    assert summary["sampler"] == "skew_normal" and summary["timestep_groups"] == 1
    assert cli.main(["presets", "--full"]) == 0
    assert '"method": "q-diffusion"' in capsys.readouterr().out


def test_quantize_flags_set_the_default_recipes_parts() -> None:
    parse = cli.build_parser().parse_args
    base = ["quantize", "--output", "o"]
    default = quantize._build_config(parse(base))
    assert default == PTQConfig()  # the default recipe, unchanged without flags
    plain = quantize._build_config(
        parse([*base, "--weight-rounding", "nearest", "--bias-correction", "off", "--float-layers", "0"])
    )
    assert plain.weights.rounding == "nearest" and plain.bias_correction == "off"
    assert not plain.layers.mixed_precision.enabled
    three = quantize._build_config(parse([*base, "--float-layers", "3"])).layers.mixed_precision
    assert (three.mode, three.max_layers, three.high_bits) == ("max_layers", 3, None)
    with pytest.raises(ValueError, match=r"weights\.rounding='adaround'.*'nearest', 'gptq'"):
        quantize._build_config(parse([*base, "--weight-rounding", "adaround"]))


def test_act_bits_accepts_none_for_weight_only_on_both_commands() -> None:
    parse = cli.build_parser().parse_args
    for command in (["quantize", "--output", "o"], ["inspect", "--sensitivity", "--output", "o"]):
        assert parse([*command, "--act-bits", "None"]).act_bits == "none"
        assert parse([*command, "--act-bits", "6"]).act_bits == 6
    weight_only = quantize._build_config(parse(["quantize", "--output", "o", "--act-bits", "none"]))
    assert weight_only.activations.bits is None


@pytest.mark.slow  # a fresh interpreter importing diffusers: ~7 s on 2 CPU cores
def test_module_entry_point_runs_the_cli() -> None:
    # `python -m diffusers_ptq` (what `torchrun -m` / `accelerate launch -m` run) is the console script.
    proc = subprocess.run(
        [sys.executable, "-m", "diffusers_ptq", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "quantize" in proc.stdout and proc.stdout.startswith("usage: diffusers-ptq")
