"""benchmarks/layer_sample_shift.py: each layer quantized alone, judged on sampled images; FD explained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusers_ptq import PTQConfig
from diffusers_ptq.prepare import is_quantized, plan_quantization
from diffusers_ptq.sensitivity.mixed import eligible
from script_helpers import load_script
from sensitivity_helpers import SENSITIVE, make_sensitive


def test_measure_covers_every_eligible_layer_and_finds_a_biased_one(ddim_pipe):
    script = load_script("benchmarks", "layer_sample_shift")
    make_sensitive(ddim_pipe.unet, SENSITIVE)
    before = {k: v.clone() for k, v in ddim_pipe.unet.state_dict().items()}
    config = PTQConfig(
        weight_bits=4,
        act_bits=8,
        weights={"num_candidates": 20, "granularity": "per_channel"},
        activations={"num_candidates": 20},
        calibration={"num_samples": 16, "num_inference_steps": 4, "batch_size": 8},
        layers={"mixed_precision": {"num_samples": 8}},
    )
    effects = script.layer_effects(ddim_pipe, config, trajectories=3, seed=0, progress=False)

    plan = plan_quantization(ddim_pipe.unet, config)
    assert list(effects) == [n for n in eligible(plan, config.layers.mixed_precision) if n in effects]
    assert set(effects) == set(eligible(plan, config.layers.mixed_precision))
    for name, e in effects.items():
        # Mean of the error squared <= mean square of its per-position mean <= mean squared error.
        assert e["shift"] ** 2 <= e["sample_drift"] * (1 + 1e-9) <= e["sample_mse"] * (1 + 1e-9), name
        assert len(e["shift_per_channel"]) == 3
        assert sum(e["shift_per_channel"]) / 3 == pytest.approx(e["shift"], rel=1e-9, abs=1e-15)
    assert max(effects, key=lambda n: effects[n]["sample_mse"]) == SENSITIVE
    # The UNet is float and unchanged afterwards.
    assert not is_quantized(ddim_pipe.unet)
    after = ddim_pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _results(path: Path, rows: list[tuple[str, float, list[str]]]) -> Path:
    """A stand-in bench results.json: a float row (FD 10) and quantized rows with their float layers."""
    data = {"rows": [{"name": "float", "metrics": {"FD": [10.0]}}]}
    for name, fd, kept in rows:
        info = {"mixed_precision": {"promoted": [[k, None] for k in kept]}} if kept else {}
        data["rows"].append({"name": name, "metrics": {"FD": [fd]}, "calibration_info": info})
    path.write_text(json.dumps(data))
    return path


def test_explain_adds_up_the_quantized_layers_shifts(tmp_path):
    script = load_script("benchmarks", "layer_sample_shift")
    layers = {
        "a": {"shift": 0.10, "sample_mse": 0.3, "step_noise_mse": 1.0},
        "b": {"shift": -0.05, "sample_mse": 0.2, "step_noise_mse": 3.0},
        "c": {"shift": 0.02, "sample_mse": 0.1, "step_noise_mse": 2.0},
    }
    run = _results(
        tmp_path / "results.json",
        [("keeps a", 10.5, ["a"]), ("keeps b", 12.0, ["b"]), ("keeps c", 11.0, ["c"]), ("none", 13.0, [])],
    )
    out = script.explain(layers, [run])
    got = {r["row"]: (r["fd_change_percent"], r["net_shift"], r["sample_mse_sum"]) for r in out["rows"]}
    assert set(got) == {"keeps a", "keeps b", "keeps c"}  # a row that keeps nothing float is not explained
    assert got["keeps a"] == pytest.approx((5.0, -0.03, 0.3))
    assert got["keeps b"] == pytest.approx((20.0, 0.12, 0.4))
    assert got["keeps c"] == pytest.approx((10.0, 0.05, 0.5))
    assert out["spearman_fd_abs_net_shift"] == pytest.approx(1.0)  # |net|: 0.03 < 0.05 < 0.12
    assert out["spearman_fd_sample_mse_sum"] == pytest.approx(0.5)
    ranks = {n: (r["step_noise_mse"], r["sample_mse"]) for n, r in out["layer_ranks"].items()}
    assert ranks == {"a": (3, 1), "b": (1, 2), "c": (2, 3)}

    with pytest.raises(ValueError, match=r"kept \['d'\] float, not in the layer file"):
        script.explain(layers, [_results(tmp_path / "other.json", [("keeps d", 11.0, ["d"])])])


def test_explain_rows_filter_picks_rows_by_name_and_rejects_unknown_names(tmp_path):
    script = load_script("benchmarks", "layer_sample_shift")
    shifts = [("a", 0.1, 0.1), ("b", -0.2, 0.2), ("c", 0.4, 0.3), ("d", 0.0, 0.4)]
    layers = {n: {"shift": v, "sample_mse": e, "step_noise_mse": 1.0} for n, v, e in shifts}
    kept = [
        ("keeps a", 10.5, ["a"]),
        ("keeps b", 12.0, ["b"]),
        ("keeps c", 11.0, ["c"]),
        ("keeps d", 9.0, ["d"]),
    ]
    run = _results(tmp_path / "results.json", kept)
    out = script.explain(layers, [run], only=["keeps d", "keeps c", "keeps b"])
    assert [r["row"] for r in out["rows"]] == ["keeps b", "keeps c", "keeps d"]
    assert [r["net_shift"] for r in out["rows"]] == pytest.approx([0.5, -0.1, 0.3])
    assert out["spearman_fd_abs_net_shift"] == pytest.approx(0.5)  # FD 20 / 10 / -10 %, |net| .5 / .1 / .3
    with pytest.raises(ValueError, match=r"--rows: \['keeps e'\] in none of the results"):
        script.explain(layers, [run], only=["keeps b", "keeps e"])
