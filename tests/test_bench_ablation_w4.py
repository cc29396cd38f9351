"""`diffusers-ptq bench --ablation w4`: the 4-bit-weight parts as rows over one base recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusers_ptq import cli
from diffusers_ptq.benchmark.ablation.benchmark import ablation_rows
from diffusers_ptq.benchmark.ablation.settings import AblationSettings
from diffusers_ptq.benchmark.ablation.w4 import DEFAULT_LABEL, DEFAULT_VARIANTS, VARIANTS, W4_ROWS, w4_recipe
from diffusers_ptq.config import PTQConfig


def _parts(config: PTQConfig) -> dict:
    data = config.to_dict()
    weights = data["weights"]
    return {
        "rounding": weights["rounding"],
        "granularity": weights["granularity"],
        "group_size": weights["group_size"] if weights["granularity"] in ("per_group", "auto") else None,
        "bias": data["bias_correction"],
        "groups": data["activations"]["timestep_groups"],
    }


def _rest(config: PTQConfig) -> dict:
    """Everything a w4 row does not vary: it must equal the base recipe's."""
    data = config.to_dict()
    for key in ("rounding", "granularity", "group_size"):
        data["weights"].pop(key)
    data["activations"].pop("timestep_groups")
    data["activations"].pop("scale_search")
    data.pop("bias_correction")
    data.pop("layers")
    data.pop("reconstruction")
    return data


def test_w4_rows_vary_exactly_their_part():
    rows = {row.name: row for row in ablation_rows(AblationSettings(study="w4", calibration_samples=64))}
    assert list(rows) == ["float", *(f"W4A8 {label}" for label in W4_ROWS)]
    base = rows["W4A8 nearest"].config
    expected = {
        "nearest": ("nearest", "per_channel", None, "off", 1),
        "gptq": ("gptq", "per_channel", None, "off", 1),
        "gptq group 128": ("gptq", "per_group", 128, "off", 1),
        "gptq group 64": ("gptq", "per_group", 64, "off", 1),
        "gptq bias=layer": ("gptq", "per_channel", None, "layer", 1),
        "gptq bias=output": ("gptq", "per_channel", None, "output", 1),
        "gptq G=8": ("gptq", "per_channel", None, "off", 8),
        "gptq G=8 bias=layer": ("gptq", "per_channel", None, "layer", 8),
        "gptq per-step": ("gptq", "per_channel", None, "off", "per_step"),
        "gptq per-step bias=layer": ("gptq", "per_channel", None, "layer", "per_step"),
        "gptq G=8 bias=output": ("gptq", "per_channel", None, "output", 8),
        "gptq per-step bias=output": ("gptq", "per_channel", None, "output", "per_step"),
        "gptq bias=layer special=float": ("gptq", "per_channel", None, "layer", 1),
        "gptq bias=layer mixed=2": ("gptq", "per_channel", None, "layer", 1),
        "gptq bias=output mixed=2": ("gptq", "per_channel", None, "output", 1),
        "gptq bias=output mixed=4": ("gptq", "per_channel", None, "output", 1),
        "gptq bias=output mixed=2 recon=5min": ("gptq", "per_channel", None, "output", 1),
        "gptq group 64 bias=output mixed=2": ("gptq", "per_group", 64, "output", 1),
        "gptq group 64 bias=output mixed=4": ("gptq", "per_group", 64, "output", 1),
        "gptq auto bias=output mixed=4": ("gptq", "auto", 64, "output", 1),
        "gptq auto bias=output mixed=4 greedy": ("gptq", "auto", 64, "output", 1),
        "gptq auto bias=output mixed=5": ("gptq", "auto", 64, "output", 1),
        "gptq auto bias=output mixed=4 metric=bias": ("gptq", "auto", 64, "output", 1),
        "gptq auto bias=output mixed=4 recon=5min": ("gptq", "auto", 64, "output", 1),
        "gptq auto bias=output mixed=4 acts=minmax": ("gptq", "auto", 64, "output", 1),
    }
    kept = {
        "gptq bias=layer special=float": ("float", "off"),
        "gptq bias=layer mixed=2": ("8bit", "max_layers"),
        "gptq bias=output mixed=2": ("8bit", "max_layers"),
        "gptq bias=output mixed=4": ("8bit", "max_layers"),
        "gptq bias=output mixed=2 recon=5min": ("8bit", "max_layers"),
        "gptq group 64 bias=output mixed=2": ("8bit", "max_layers"),
        "gptq group 64 bias=output mixed=4": ("8bit", "max_layers"),
        "gptq auto bias=output mixed=4": ("8bit", "max_layers"),
        "gptq auto bias=output mixed=4 greedy": ("8bit", "max_layers"),
        "gptq auto bias=output mixed=5": ("8bit", "max_layers"),
        "gptq auto bias=output mixed=4 metric=bias": ("8bit", "max_layers"),
        "gptq auto bias=output mixed=4 recon=5min": ("8bit", "max_layers"),
        "gptq auto bias=output mixed=4 acts=minmax": ("8bit", "max_layers"),
    }
    assert set(expected) == set(VARIANTS)
    for label, parts in expected.items():
        config = rows[f"W4A8 {label}"].config
        assert tuple(_parts(config).values()) == parts, label
        layers = config.to_dict()["layers"]
        special, mode = kept.get(label, ("8bit", "off"))
        assert (layers["special_layers"], layers["mixed_precision"]["mode"]) == (special, mode), label
        selection = "greedy" if label.endswith("greedy") else "alone"
        assert layers["mixed_precision"]["selection"] == selection, label
        metric = "bias" if label.endswith("metric=bias") else "mse"
        assert layers["mixed_precision"]["metric"] == metric, label
        if label.startswith("gptq auto"):
            assert layers["mixed_precision"]["max_layers"] == (5 if label.endswith("=5") else 4), label
        assert _rest(config) == _rest(base), label
        search = "minmax" if label.endswith("acts=minmax") else "mse"
        assert config.activations.scale_search == search, label
        assert config.weights.bits == 4 and config.activations.bits == 8
        assert config.calibration.num_samples == 64
        recon = config.reconstruction
        if label.endswith("recon=5min"):
            assert recon.enabled and recon.max_minutes == 5.0 and recon.weight_rounding == "adaround"
        else:
            assert not recon.enabled, label
    default = rows[f"W4A8 {DEFAULT_LABEL}"].config
    shipped = PTQConfig(weight_bits=4, act_bits=8)
    assert default.to_dict()["weights"] == shipped.to_dict()["weights"]
    assert default.bias_correction == shipped.bias_correction
    assert default.reconstruction == shipped.reconstruction
    # The default keeps five layers float at 4-bit weights: the `mixed=5` row is the default, `mixed=4` the
    # previous one.
    assert (
        default.layers.mixed_precision.resolved(4)
        == rows["W4A8 gptq auto bias=output mixed=5"].config.layers.mixed_precision
    )
    # The staggered row is the default recipe with another calibration layout, nothing else.
    assert list(DEFAULT_VARIANTS) == [f"{DEFAULT_LABEL} staggered=10"]
    staggered = rows[f"W4A8 {DEFAULT_LABEL} staggered=10"].config.to_dict()
    assert staggered["calibration"].pop("sampler") == "staggered" and default.calibration.sampler == "uniform"
    assert staggered["calibration"].pop("step_interval") == 10
    plain = default.to_dict()
    plain["calibration"].pop("sampler"), plain["calibration"].pop("step_interval")
    assert staggered == plain


def test_w4_base_is_pinned_whatever_the_default_recipe(monkeypatch):
    """A row varies only its part: the base does not follow PTQConfig's defaults when those change."""
    from diffusers_ptq.benchmark.ablation import w4

    config = w4.w4_recipe("nearest", 4, 8, 20, None)
    assert config.weights.rounding == "nearest" and config.bias_correction == "off"
    assert config.weights.granularity == "per_channel" and config.activations.timestep_groups == 1
    assert config.layers.special_layers == "8bit" and not config.layers.mixed_precision.enabled
    mixed = w4.w4_recipe("gptq bias=layer mixed=2", 4, 8, 20, None).layers.mixed_precision
    assert (mixed.mode, mixed.max_layers, mixed.high_bits) == ("max_layers", 2, None)


def test_w4_rows_select_a_subset_in_study_order():
    settings = AblationSettings(study="w4", rows=[DEFAULT_LABEL, "gptq bias=layer mixed=2", "nearest"])
    names = [row.name for row in ablation_rows(settings)]
    assert names == ["float", "W4A8 nearest", "W4A8 gptq bias=layer mixed=2", f"W4A8 {DEFAULT_LABEL}"]
    mixed = ablation_rows(settings)[2].config.layers.mixed_precision
    assert (mixed.max_layers, mixed.high_bits) == (2, None)


def test_reconstruction_cap_reaches_only_the_rows_that_reconstruct():
    label = "gptq bias=output mixed=2 recon=5min"
    settings = AblationSettings(study="w4", rows=["gptq", label], reconstruction_minutes=0.5)
    rows = ablation_rows(settings)
    assert not rows[1].config.reconstruction.enabled
    assert rows[2].config.reconstruction.enabled and rows[2].config.reconstruction.max_minutes == 0.5
    assert AblationSettings.quick("w4").reconstruction_minutes == 0.05
    with pytest.raises(
        ValueError, match=r"reconstruction_minutes=0 is invalid; expected None or a number > 0"
    ):
        ablation_rows(AblationSettings(study="w4", reconstruction_minutes=0))
    with pytest.raises(ValueError, match="reconstruction_minutes applies to the 'w4' study only"):
        ablation_rows(AblationSettings(study="groups", reconstruction_minutes=1.0))


def test_calibration_seed_reaches_every_row_of_every_study():
    for study in ("w4", "groups", "selectors"):
        assert {r.config.calibration.seed for r in ablation_rows(AblationSettings(study)) if r.config} == {0}
        seeded = ablation_rows(AblationSettings(study, calibration_seeds=[7]))
        assert {r.config.calibration.seed for r in seeded if r.config} == {7}, study
    assert w4_recipe(DEFAULT_LABEL, 4, 8, 20, None, calibration_seed=2).calibration.seed == 2


def test_unknown_w4_row_names_the_valid_ones():
    with pytest.raises(ValueError, match="w4 row 'gptq G=4' is not valid; expected one of nearest, gptq"):
        w4_recipe("gptq G=4", 4, 8, 20, None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--search-epochs", "2"], "--search-epochs does not apply to --ablation w4"),
        (["--groups", "1,8"], "--groups applies to --ablation groups, not --ablation w4"),
        (["--bits", "W9A8"], "weights.bits=9 is invalid"),
        (["--rows", "gptq,gptq G=4"], "rows: 'gptq G=4' is not a w4 row; choose from nearest, gptq"),
        (["--rows", "gptq,gptq"], "rows: gptq listed more than once"),
        (["--calibration-seed", "-1"], "calibration_seed=-1 is invalid; expected an integer >= 0"),
        (["--calibration-seeds", "0,x"], "--calibration-seeds: 'x' is not a seed; expected integers >= 0"),
        (["--calibration-seeds", "0,-1"], "calibration_seeds: -1 is not a valid seed"),
        (["--calibration-seeds", "1,2,1"], "calibration_seeds: 1 listed more than once"),
        (["--calibration-seeds", "1,2", "--calibration-seed", "1"], "both given; use one of them"),
    ],
)
def test_bad_w4_input_is_rejected_before_any_work(extra, message, tmp_path: Path, capsys) -> None:
    out = tmp_path / "w4"
    argv = ["bench", "--model", "tiny:ddim", "--ablation", "w4", *extra, "--output", str(out)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # ~94 s on 2 CPU cores
def test_quick_w4_ablation_on_a_tiny_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "w4"
    argv = ["bench", "--model", "tiny:ddim", "--ablation", "w4", "--quick", "--num-inference-steps", "3"]
    argv += ["--num-samples", "2", "--sqnr-samples", "2", "--calibration-samples", "12"]
    argv += ["--output", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert "W4A8 gptq group 64" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"table.md", "results.json", "w4_parts.png", "grids"}
    assert (out / "w4_parts.png").stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["float", *(f"W4A8 {label}" for label in W4_ROWS)]
    assert rows["W4A8 gptq"]["calibration_info"]["gptq"]["layers"] > 0
    assert rows["W4A8 nearest"]["calibration_info"].get("gptq") is None
    assert rows["W4A8 gptq bias=layer"]["calibration_info"]["bias_correction"] is not None
    assert all(r["calibration_s"] > 0 for name, r in rows.items() if name != "float")
    table = (out / "table.md").read_text()
    assert (
        "| rounding | weight scales | bias correction | G | layers off the grid |" in table
        and "noise bias ↓" in table
    )
    assert "| W4A8 gptq group 64 | gptq | group 64 | off | 1 | special 8bit |" in table
    assert (
        "| W4A8 gptq bias=layer mixed=2 | gptq | per_channel | layer | 1 | special 8bit; 2 layers float"
        in table
    )
    assert "| W4A8 gptq per-step bias=layer | gptq | per_channel | layer | per-step | special 8bit |" in table
