"""`diffusers-ptq quantize --pipeline-kwargs JSON` and the --init-image / --mask-image / --control-image
conveniences, on tiny img2img / inpainting / ControlNet pipelines loaded from a local directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from diffusers_ptq import cli
from diffusers_ptq.calibration import get_pipeline_spec
from diffusers_ptq.cli.pipeline_args import pipeline_kwargs
from diffusers_ptq.tiny_variants import (
    tiny_controlnet_pipeline,
    tiny_image,
    tiny_inpaint_pipeline,
    tiny_sd_img2img_pipeline,
)

torch.set_flush_denormal(True)
FAST = ["--num-samples", "4", "--num-inference-steps", "4", "--samples", "1", "--no-progress"]
FAST += ["--weight-rounding", "nearest", "--bias-correction", "off", "--float-layers", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_pipes")
    tiny_sd_img2img_pipeline().save_pretrained(root / "img2img")
    tiny_image(0).save(root / "init.png")
    tiny_image(1, "mask").save(root / "mask.png")
    return {"img2img": root / "img2img", "init": root / "init.png", "mask": root / "mask.png"}


def _args(**given: str | None) -> argparse.Namespace:
    names = ("pipeline_kwargs", "init_image", "mask_image", "control_image")
    return argparse.Namespace(**{name: given.get(name) for name in names})


def test_img2img_from_a_local_directory(files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["quantize", "--model", str(files["img2img"]), "--init-image", str(files["init"])]
    argv += ["--pipeline-kwargs", json.dumps({"strength": 0.5}), "--prompt", "a cat", *FAST]
    assert cli.main([*argv, "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"] == "StableDiffusionImg2ImgPipeline" and report["distinct_prompts"] == 1
    assert report["calibration_rows"] == 2 * 4  # both guidance halves of 4 samples
    assert "SQNR of quantized vs float" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            ["--mask-image", "MASK"],
            "--mask-image is given but StableDiffusionImg2ImgPipeline takes no such image",
        ),
        (["--pipeline-kwargs", "{strength: 1}"], "--pipeline-kwargs is not valid JSON"),
        (["--pipeline-kwargs", "[1]"], "must be a JSON object, got list"),
        (["--pipeline-kwargs", '{"prompt": "x"}'], "'prompt', which calibration sets itself"),
        (["--pipeline-kwargs", '{"strenght": 0.5}'], "takes no argument 'strenght'"),
        (["--pipeline-kwargs", '{"image": 1}', "--init-image", "INIT"], "both set 'image'"),
        (["--init-image", "missing.png"], "--init-image file 'missing.png' does not exist"),
    ],
)
def test_bad_call_arguments_fail_before_anything_runs(files, tmp_path, capsys, extra, match):
    extra = [str(files["mask"]) if a == "MASK" else str(files["init"]) if a == "INIT" else a for a in extra]
    argv = ["quantize", "--model", str(files["img2img"]), *extra, *FAST, "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_image_flags_map_to_the_pipelines_argument_names(files):
    inpaint = tiny_inpaint_pipeline()
    kwargs = pipeline_kwargs(
        _args(init_image=str(files["init"]), mask_image=str(files["mask"])),
        inpaint,
        get_pipeline_spec(inpaint),
    )
    assert sorted(kwargs) == ["image", "mask_image"] and kwargs["image"].size == (32, 32)
    controlnet = tiny_controlnet_pipeline()
    spec = get_pipeline_spec(controlnet)
    assert sorted(pipeline_kwargs(_args(control_image=str(files["init"])), controlnet, spec)) == ["image"]
    with pytest.raises(ValueError, match="--init-image is given but StableDiffusionControlNetPipeline"):
        pipeline_kwargs(_args(init_image=str(files["init"])), controlnet, spec)


def _truncated_timesteps(steps: int, strength: float) -> list[int]:
    scheduler = tiny_sd_img2img_pipeline().scheduler
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps[steps - int(steps * strength) :]]


def test_inspect_ranges_with_init_image_and_strength(files, tmp_path: Path) -> None:
    out = tmp_path / "ranges"
    argv = ["inspect", "--model", str(files["img2img"]), "--prompt", "a cat", "--num-inference-steps", "4"]
    argv += ["--init-image", str(files["init"]), "--pipeline-kwargs", '{"strength": 0.5}']
    assert cli.main([*argv, "--output", str(out)]) == 0
    data = json.loads((out / "activation_ranges.json").read_text())
    assert data["timesteps"] == _truncated_timesteps(4, 0.5)
    # --quantized replays a plain DDIM trajectory: image arguments are refused before any work.
    bad = tmp_path / "bad"
    assert cli.main([*argv, "--quantized", str(tmp_path), "--output", str(bad)]) == 2
    assert not bad.exists()


def test_inspect_sensitivity_with_init_image_and_strength(files, tmp_path: Path) -> None:
    out = tmp_path / "sens"
    argv = ["inspect", "--sensitivity", "--model", str(files["img2img"]), "--num-samples", "4"]
    argv += ["--num-inference-steps", "4", "--max-rows", "2", "--no-progress", "--prompt", "a cat"]
    argv += ["--init-image", str(files["init"]), "--pipeline-kwargs", '{"strength": 0.5}']
    assert cli.main([*argv, "--output", str(out)]) == 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert set(data["timesteps"]) <= set(_truncated_timesteps(4, 0.5))
    assert data["units"]
