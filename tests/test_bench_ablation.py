"""`diffusers-ptq bench --ablation` (diffusers_ptq.benchmark.ablation) and the bench's reconstruction cap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusers_ptq import cli
from diffusers_ptq.benchmark.ablation.benchmark import (
    SEARCH_LABEL,
    UNIFORM_STEP_INTERVAL,
    ablation_rows,
    run_ablation,
)
from diffusers_ptq.benchmark.ablation.report import ablation_table, write_ablation_outputs
from diffusers_ptq.benchmark.ablation.settings import AblationSettings, parse_groups
from diffusers_ptq.benchmark.quality.benchmark import row_configs
from diffusers_ptq.benchmark.quality.settings import QUICK_RECONSTRUCTION_MINUTES, BenchSettings
from diffusers_ptq.config import PTQConfig
from diffusers_ptq.methods import available_presets


class MeanBrightness:
    """A stand-in fidelity metric, deterministic in the images."""

    name = "mean brightness"

    def compute(self, images: torch.Tensor) -> dict[str, float]:
        return {"FD": float(images.mean() + 2.0), "IS": float(images.std())}


def _quantizers(config: PTQConfig) -> dict:
    """The quantizer recipe without what a study varies (groups) or what calibration chooses."""
    data = config.to_dict()
    data["activations"].pop("timestep_groups")
    return {k: data[k] for k in ("weights", "activations", "layers", "reconstruction")}


def test_groups_rows_vary_only_g_and_the_search() -> None:
    settings = AblationSettings(
        study="groups",
        calibration_samples=96,
        search_epochs=2,
        search_images=5,
        search_lambda=40.0,
        search_init_logit=4.0,
    )
    rows = ablation_rows(settings)
    assert rows[0].name == "float" and rows[0].config is None
    assert [r.name for r in rows[1:6]] == ["W6A6 G=1", "W6A6 G=4", "W6A6 G=8", "W6A6 G=16", "W6A6 per-step"]
    assert [r.name for r in rows[6:]] == [n.replace("W6A6", "W8A8") for n in (r.name for r in rows[1:6])]
    base = _quantizers(rows[1].config)
    for row in rows[1:]:
        c = row.config
        assert (c.weights.bits, c.activations.bits) == (row.weight_bits, row.act_bits)
        assert c.activations.timestep_groups == row.groups
        assert c.group_search.enabled is row.search is (row.groups in (4, 8, 16))
        assert (c.group_search.epochs, c.group_search.num_images) == (2, 5)
        assert (c.group_search.entropy_weight, c.group_search.init_logit) == (40.0, 4.0)
        assert (c.calibration.selector, c.calibration.sampler, c.calibration.step_interval) == (
            "random",
            "uniform",
            1,
        )
        assert c.calibration.num_samples == 96 and c.calibration.num_inference_steps == 100
        assert not c.reconstruction.enabled
        if row.weight_bits == 6:
            assert _quantizers(c) == base  # same quantizers in every row of a bit setting
    apq = PTQConfig.preset("apq-dm")
    assert rows[1].config.weights == PTQConfig.preset("apq-dm", weight_bits=6).weights
    # Defaults: the preset's epochs, images and calibration size.
    default = ablation_rows(AblationSettings(study="groups", bits=["W8A8"], groups=[8]))[1].config
    assert default.group_search.epochs == apq.group_search.epochs
    assert default.group_search.num_images == apq.group_search.num_images
    assert default.calibration.num_samples == apq.calibration.num_samples


def test_selector_rows_differ_only_in_calibration() -> None:
    settings = AblationSettings(study="selectors", sizes=[128, 256], feature_samples=7)
    rows = ablation_rows(settings)[1:]
    labels = ["random", "normal", "uniform", "density_diversity", "active", SEARCH_LABEL]
    assert [r.name for r in rows] == [f"W6A6 {s} N={n}" for n in (128, 256) for s in labels]
    ptq4dm, eda = PTQConfig.preset("ptq4dm").calibration, PTQConfig.preset("eda-dm").selection
    apq = PTQConfig.preset("apq-dm")
    base = _quantizers(rows[0].config)
    for row in rows:
        c = row.config
        calib = c.calibration
        assert calib.num_samples == row.size and _quantizers(c) == base and not c.reconstruction.enabled
        searched = row.selector in ("active", SEARCH_LABEL)
        assert c.group_search.enabled is row.search is searched
        assert (
            c.activations.timestep_groups
            == row.groups
            == (apq.activations.timestep_groups if searched else 1)
        )
        expected = {
            "random": ("random", "uniform", 1),
            "normal": ("random", "normal", 1),
            "uniform": ("random", "uniform", UNIFORM_STEP_INTERVAL),
            "density_diversity": ("density_diversity", "uniform", 1),
            "active": ("active", "uniform", 1),
            SEARCH_LABEL: ("random", "uniform", 1),
        }[row.selector]
        assert (calib.selector, calib.sampler, calib.step_interval) == expected
        if row.selector == "normal":
            assert (calib.mean, calib.std) == (ptq4dm.mean, ptq4dm.std)
        if row.selector == "density_diversity":
            assert c.selection.feature_samples == 7
            assert (c.selection.density_radius, c.selection.diversity_weight) == (
                eda.density_radius,
                eda.diversity_weight,
            )
        if row.selector == "active":
            assert c.selection == apq.selection
    # 'random+search' only comes with 'active'.
    plain = ablation_rows(AblationSettings(study="selectors", selectors=["random", "normal"], sizes=[64]))
    assert [r.selector for r in plain[1:]] == ["random", "normal"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"study": "bits"}, "study='bits' is invalid; expected one of groups, selectors"),
        ({"groups": [0]}, "groups: 0 is not valid; expected an integer in [1, 1000] or 'per_step'"),
        ({"groups": [4, 4]}, "groups: 4 listed more than once"),
        ({"groups": ["step"]}, "groups: 'step' is not valid"),
        (
            {"study": "selectors", "selectors": ["gptq"]},
            "'gptq' is not a selector; choose from random, normal",
        ),
        ({"study": "selectors", "sizes": [128, 0]}, "sizes: 0 is not a valid calibration size"),
        ({"study": "selectors", "sizes": []}, "sizes=[] is invalid"),
        ({"search_epochs": -1}, "search_epochs=-1 is invalid"),
        ({"search_images": 0}, "search_images=0 is invalid"),
        ({"search_lambda": -0.5}, "search_lambda=-0.5 is invalid; expected None or a finite number >= 0"),
        ({"search_lambda": float("nan")}, "search_lambda=nan is invalid"),
        ({"search_lambda": "0.8"}, "search_lambda='0.8' is invalid"),
        ({"search_init_logit": -1.0}, "search_init_logit=-1.0 is invalid"),
        ({"bits": ["W6"]}, "W<weight bits>A<act bits>"),
        ({"num_samples": 1}, "FD needs at least 2"),
        ({"calibration_seeds": []}, "calibration_seeds=[] is invalid; expected at least one seed"),
        ({"calibration_seeds": [0, True]}, "calibration_seeds: True is not a valid seed"),
    ],
)
def test_bad_ablation_settings_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        ablation_rows(AblationSettings(**overrides))


def test_parse_groups() -> None:
    assert [parse_groups(t) for t in ("1", " 16", "per_step", "Per-Step")] == [1, 16, "per_step", "per_step"]
    with pytest.raises(ValueError, match="'eight' is not valid; expected an integer"):
        parse_groups("eight")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ablation", "bits"], "--ablation 'bits' is invalid; expected one of groups, selectors"),
        (
            ["--ablation", "groups", "--groups", "1,0"],
            "groups: 0 is not valid; expected an integer in [1, 1000]",
        ),
        (["--ablation", "groups", "--groups", "1,many"], "groups: 'many' is not valid"),
        (["--ablation", "selectors", "--selectors", "random,gptq"], "'gptq' is not a selector; choose from"),
        (["--ablation", "selectors", "--sizes", "128,0"], "sizes: 0 is not a valid calibration size"),
        (["--ablation", "selectors", "--sizes", "1k"], "--sizes: '1k' is not a calibration size"),
        (["--ablation", "selectors", "--groups", "4"], "--groups applies to --ablation groups"),
        (["--ablation", "groups", "--sizes", "4"], "--sizes applies to --ablation selectors"),
        (["--ablation", "groups", "--presets", "ptq4dm"], "--presets does not apply to --ablation"),
        (["--ablation", "selectors", "--calibration-samples", "8"], "use --sizes"),
        (
            ["--ablation", "groups", "--reconstruction-minutes", "1"],
            "--reconstruction-minutes does not apply",
        ),
        (["--ablation", "groups", "--search-epochs", "-2"], "search_epochs=-2 is invalid"),
        (["--groups", "4"], "--groups applies to --ablation runs only"),
        (["--calibration-seeds", "0,1"], "--calibration-seeds applies to --ablation runs only"),
        (["--reconstruction-minutes", "0"], "reconstruction_minutes=0.0 is invalid"),
    ],
)
def test_bench_command_rejects_bad_ablation_input(
    extra: list[str], message: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "b"
    assert cli.main(["bench", "--model", "tiny:ddim", *extra, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_quick_ablation_on_a_tiny_model_writes_table_json_and_plot(tmp_path: Path, capsys) -> None:
    out = tmp_path / "groups"
    argv = ["bench", "--model", "tiny:ddim", "--ablation", "groups", "--quick", "--bits", "W8A8"]
    argv += [
        "--groups",
        "1,2,per-step",
        "--num-inference-steps",
        "3",
        "--num-samples",
        "2",
        "--sqnr-samples",
        "2",
    ]
    argv += ["--search-images", "2", "--search-lambda", "3", "--search-init-logit", "2"]
    argv += ["--output", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert "W8A8 G=2" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"table.md", "results.json", "fd_vs_groups.png", "grids"}
    assert (out / "fd_vs_groups.png").stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    assert data["study"] == "groups" and data["settings"]["search_epochs"] == 1  # --quick caps the search
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["float", "W8A8 G=1", "W8A8 G=2", "W8A8 per-step"]
    assert rows["W8A8 G=2"]["search"] and rows["W8A8 G=2"]["search_s"] > 0
    assert rows["W8A8 G=2"]["search_s"] <= rows["W8A8 G=2"]["calibration_s"]
    assert rows["W8A8 G=1"]["search_s"] is None and rows["W8A8 per-step"]["search_s"] is None
    assert rows["W8A8 G=2"]["calibration_info"]["group_search"]["lr"] > 0
    assert rows["W8A8 per-step"]["config"]["activations"]["timestep_groups"] == "per_step"
    assert rows["W8A8 G=2"]["config"]["group_search"]["entropy_weight"] == 3.0
    assert rows["W8A8 G=2"]["config"]["group_search"]["init_logit"] == 2.0
    table = (out / "table.md").read_text()
    assert "lambda 3.0, initial logit 2.0" in table
    assert table.startswith("Command: `diffusers-ptq bench --model tiny:ddim --ablation groups --quick")
    assert "| W8A8 per-step | per-step | no |" in table and "FD and IS are skipped" in table


def test_selectors_study_end_to_end_with_a_fidelity_metric(ddim_pipe, tmp_path: Path) -> None:
    settings = AblationSettings.quick(
        "selectors",
        selectors=["random", "active"],
        sizes=[4],
        num_inference_steps=3,
        num_samples=2,
        sqnr_samples=2,
        search_images=2,
    )
    before = {k: v.clone() for k, v in ddim_pipe.unet.state_dict().items()}
    result = run_ablation(ddim_pipe, settings, MeanBrightness(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in ddim_pipe.unet.state_dict().items())
    assert [r.name for r in result.results] == ["float"] + [
        f"W6A6 {s} N=4" for s in ("random", "active", SEARCH_LABEL)
    ]
    active = result.results[2]
    assert active.search_s is not None and active.calibration_info["selection"]["samples_per_step"]
    # Same noise in every row: a quantized row's images stay near the float ones.
    assert (result.grids["W6A6 random N=4"] - result.grids["float"]).abs().mean() < 0.3
    write_ablation_outputs(result, tmp_path, header="header\n\n")
    table = ablation_table(result)
    assert table.count("\n") == 5 and "%" in table and "random+search" in table
    assert "fair baseline" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "fd_vs_calibration_size.png").stat().st_size > 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["selector"], r["size"]) for r in rows[1:4]] == [
        ("random", 4),
        ("active", 4),
        (SEARCH_LABEL, 4),
    ]


def test_quick_caps_reconstruction_only_on_reconstruction_rows() -> None:
    presets = available_presets()
    quick = BenchSettings.quick(presets=presets)
    assert quick.reconstruction_minutes == QUICK_RECONSTRUCTION_MINUTES
    assert quick.rows() == BenchSettings(presets=presets).rows()  # quick keeps every row
    configs = row_configs(quick)
    assert any(c.reconstruction.enabled for c in configs.values())  # q-diffusion reconstructs
    for name, config in configs.items():
        own = PTQConfig.preset(name.split()[0]).reconstruction
        assert config.reconstruction.enabled == own.enabled
        expected = QUICK_RECONSTRUCTION_MINUTES if own.enabled else own.max_minutes
        assert config.reconstruction.max_minutes == expected, name
    # Without a cap every row keeps its preset's own budget.
    for name, config in row_configs(BenchSettings(presets=presets, bits=["W4A8"])).items():
        assert (
            config.reconstruction.max_minutes == PTQConfig.preset(name.split()[0]).reconstruction.max_minutes
        )
    assert (
        row_configs(BenchSettings(presets=["q-diffusion"], bits=["W8A8"], reconstruction_minutes=2.5))[
            "q-diffusion W8A8"
        ].reconstruction.max_minutes
        == 2.5
    )
