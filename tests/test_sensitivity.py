"""Per-layer sensitivity (`measure_sensitivity`, `inspect --sensitivity`) on tiny offline pipelines."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from diffusers_ptq import PTQConfig, cli, quantize_unet, set_quant_state
from diffusers_ptq.prepare import is_quantized
from diffusers_ptq.sensitivity import measure_sensitivity
from diffusers_ptq.sensitivity.run import capture_for_sensitivity
from recipe_helpers import plain
from sensitivity_helpers import SENSITIVE, make_sensitive

SEARCH = {"num_candidates": 20}  # a short range search keeps calibration quick; tested in test_primitives
CALIB = {"num_samples": 16, "num_inference_steps": 4, "batch_size": 8}


def _config(**overrides) -> PTQConfig:
    # Per-channel weight scales: `make_sensitive`'s one outlier per output channel then coarsens the
    # whole row's grid (with group scales it would coarsen one group of the row).
    weights = {**SEARCH, "granularity": "per_channel"}
    base = plain(weight_bits=4, act_bits=8, weights=weights, activations=SEARCH, calibration=CALIB)
    return base.replace(**overrides)


def test_deliberately_sensitive_layer_ranks_first(ddim_pipe):
    make_sensitive(ddim_pipe.unet, SENSITIVE)
    before = {k: v.clone() for k, v in ddim_pipe.unet.state_dict().items()}
    report = measure_sensitivity(ddim_pipe, _config(), groups=False, progress=False)
    for metric in ("mse", "bias"):
        assert report.ranked("layer", metric)[0].name == SENSITIVE, metric
    # The UNet is left float and untouched.
    assert not is_quantized(ddim_pipe.unet)
    after = ddim_pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_per_step_numbers_equal_an_independent_computation(ddim_pipe):
    config = _config()
    data = capture_for_sensitivity(ddim_pipe, config, None, None, None, None, None, False)
    float_unet = copy.deepcopy(ddim_pipe.unet)
    report = measure_sensitivity(float_unet, config, data=data, groups=False, progress=False)

    # Independently: the real recipe's quantized UNet, with every quantizer off but the layer's own.
    unet = quantize_unet(copy.deepcopy(ddim_pipe.unet), config, data, batch_size=8, progress=False)
    set_quant_state(unet, weights=False, acts=False)
    with torch.no_grad():
        ref = torch.cat([unet(**data.unet_kwargs(slice(i, i + 8))).sample for i in range(0, len(data), 8)])
        unet.get_submodule(SENSITIVE).set_quant_state(True, True)
        out = torch.cat([unet(**data.unet_kwargs(slice(i, i + 8))).sample for i in range(0, len(data), 8)])
    err = (out - ref).double()
    unit = report.get(SENSITIVE)
    assert report.steps == sorted(set(data.step_index.tolist()))
    for j, step in enumerate(report.steps):
        rows = data.step_index == step
        mse = float(err[rows].pow(2).mean())
        bias = float(err[rows].mean(dim=0).pow(2).mean().sqrt())
        sqnr = float(10 * torch.log10(ref[rows].double().pow(2).sum() / err[rows].pow(2).sum()))
        assert unit.mse_per_step[j] == pytest.approx(mse, rel=1e-9)
        assert unit.bias_per_step[j] == pytest.approx(bias, rel=1e-9)
        assert unit.sqnr_per_step[j] == pytest.approx(sqnr, rel=1e-9)
    assert unit.mse == pytest.approx(float(err.pow(2).mean()), rel=1e-9)
    assert unit.bias == pytest.approx(sum(unit.bias_per_step) / len(report.steps), rel=1e-12)


def test_bias_from_one_row_per_step_warns_that_it_is_the_rms_error(ddim_pipe, recwarn):
    """16 rows, 4 steps (4 trajectories each, step-major): 4 even rows hold one row per step, whose bias is
    that row's RMS error; 8 rows hold two per step and measure a mean over them, without a warning."""
    config = _config()
    data = capture_for_sensitivity(ddim_pipe, config, None, None, None, None, None, False)
    assert torch.bincount(data.step_index).tolist() == [4, 4, 4, 4]
    kwargs = {"data": data, "groups": False, "metric": "bias", "progress": False}
    with pytest.warns(UserWarning, match=r"metric='bias' is measured on 4 calibration rows over 4 sampling"):
        report = measure_sensitivity(copy.deepcopy(ddim_pipe.unet), config, max_rows=4, **kwargs)
    unit = report.get(SENSITIVE)
    # One row per step: the bias is exactly the square root of the step's MSE.
    assert unit.bias_per_step == pytest.approx([m**0.5 for m in unit.mse_per_step], rel=1e-9)
    recwarn.clear()
    report = measure_sensitivity(copy.deepcopy(ddim_pipe.unet), config, max_rows=8, **kwargs)
    assert not [w for w in recwarn if "metric='bias'" in str(w.message)]
    assert report.get(SENSITIVE).bias_per_step != pytest.approx(
        [m**0.5 for m in report.get(SENSITIVE).mse_per_step], rel=1e-3
    )
    # The MSE ranking never warns, however few rows per step.
    recwarn.clear()
    measure_sensitivity(copy.deepcopy(ddim_pipe.unet), config, max_rows=4, **{**kwargs, "metric": "mse"})
    assert not [w for w in recwarn if "metric='bias'" in str(w.message)]


def test_groups_cover_special_layers_attention_time_path_and_blocks(ddim_pipe):
    report = measure_sensitivity(ddim_pipe, _config(), max_rows=4, progress=False)
    groups = {u.name: u for u in report.units if u.kind == "group"}
    expected = {"special layers", "embeddings", "attention", "time path", "mid_block", "all"}
    expected |= {f"down_blocks.{i}" for i in range(len(ddim_pipe.unet.down_blocks))}
    expected |= {f"up_blocks.{i}" for i in range(len(ddim_pipe.unet.up_blocks))}
    assert set(groups) == expected
    assert groups["special layers"].size == 4  # conv_in, conv_out, time_embedding.linear_1/2
    assert groups["all"].mse == max(u.mse for u in report.units)
    assert report.rows == 4


@pytest.mark.parametrize(
    "fixture", ["sd_pipe", pytest.param("sdxl_pipe", marks=pytest.mark.slow)]
)  # SDXL: ~6 s
def test_text_to_image_pipelines(fixture, request, prompts):
    pipe = request.getfixturevalue(fixture)
    config = _config(calibration={**CALIB, "num_samples": 4})
    report = measure_sensitivity(pipe, config, prompts=prompts, max_rows=2, progress=False)
    layers = report.ranked(("layer", "attention"))
    assert len(layers) > 10 and all(u.mse >= 0 and len(u.bias_per_step) == len(report.steps) for u in layers)
    assert any(u.kind == "attention" for u in layers)
    assert not is_quantized(pipe.unet)


def test_bad_input_errors_before_work(ddim_pipe):
    with pytest.raises(ValueError, match="metric='sqnr'"):
        measure_sensitivity(ddim_pipe, _config(), metric="sqnr")
    with pytest.raises(ValueError, match="max_rows=0"):
        measure_sensitivity(ddim_pipe, _config(), max_rows=0)
    with pytest.raises(ValueError, match="data=CalibrationSet"):
        measure_sensitivity(ddim_pipe.unet, _config())
    with pytest.raises(TypeError, match="PTQConfig"):
        measure_sensitivity(ddim_pipe, {"weights": {}})


def test_cli_inspect_sensitivity_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "sens"
    argv = ["inspect", "--sensitivity", "--model", "tiny:ddim", "--num-samples", "8"]
    argv += ["--num-inference-steps", "4", "--weight-bits", "4", "--max-rows", "4", "--no-progress"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"sensitivity.png", "sensitivity.json", "table.md"}
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["tag"] == "w4a8" and data["rows"] == 4
    scores = [u["mse"] for u in data["units"]]
    assert scores == sorted(scores, reverse=True)
    assert "1. " in capsys.readouterr().out
    assert cli.main([*argv, "--top", "0", "--output", str(tmp_path / "bad")]) == 2
    assert "--top=0" in capsys.readouterr().err


def test_img2img_pipeline_kwargs_plan_the_truncated_schedule(prompts):
    from diffusers_ptq.tiny_variants import tiny_image, tiny_sd_img2img_pipeline

    pipe = tiny_sd_img2img_pipeline()
    config = _config(calibration={**CALIB, "num_samples": 4})
    kwargs = {"image": tiny_image(seed=1), "strength": 0.5}
    report = measure_sensitivity(
        pipe, config, prompts=prompts, pipeline_kwargs=kwargs, max_rows=2, groups=False, progress=False
    )
    # strength 0.5 of 4 steps: the pipeline runs the last 2 (timesteps 501 and 1 of the tiny DDIM schedule).
    pipe.scheduler.set_timesteps(4)
    assert report.timesteps == [float(t) for t in pipe.scheduler.timesteps[2:][report.steps]]
    assert report.units and not is_quantized(pipe.unet)
    with pytest.raises(TypeError, match="takes no argument 'mask_image'"):
        measure_sensitivity(pipe, config, prompts=prompts, pipeline_kwargs={**kwargs, "mask_image": None})
    with pytest.raises(ValueError, match="use prompts= instead"):
        measure_sensitivity(pipe, config, prompts=prompts, pipeline_kwargs={**kwargs, "prompt": "x"})
    with pytest.raises(ValueError, match="with data= there is none"):
        measure_sensitivity(pipe, config, data=object(), pipeline_kwargs=kwargs)
