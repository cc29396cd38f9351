"""`layers.mixed_precision`: the most sensitive layers are promoted within the budget, reported and saved."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from diffusers_ptq import PTQConfig, PTQQuantizationConfig, quantize_pipeline
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.prepare import is_quantized
from diffusers_ptq.sensitivity import measure_sensitivity
from diffusers_ptq.serialization.model_card import build_model_card

SEARCH = {"num_candidates": 20}
CALIB = {"num_samples": 16, "num_inference_steps": 4, "batch_size": 8}
FAST = {"progress": False}


def _config(**mixed) -> PTQConfig:
    return PTQConfig(
        weight_bits=4,
        act_bits=6,
        weights=SEARCH,
        activations=SEARCH,
        calibration=CALIB,
        layers={"mixed_precision": {"num_samples": 8, **mixed}},
    )


def _ranking(pipe, config: PTQConfig, prompts=None) -> list[str]:
    """The layer ranking measured independently, by the public sensitivity function on the same rows."""
    plain = config.replace(layers={"mixed_precision": {"mode": "off"}})
    report = measure_sensitivity(
        copy.deepcopy(pipe),
        plain,
        prompts=prompts,
        max_rows=config.layers.mixed_precision.num_samples,
        groups=False,
        metric=config.layers.mixed_precision.metric,
        progress=False,
    )
    return [u.name for u in report.ranked("layer")]


def _bits(unet: nn.Module) -> dict[str, int | None]:
    """Weight bits of every Conv2d/Linear: None for a float layer."""
    return {
        name: (m.weight_bits if isinstance(m, QuantLayerMixin) else None)
        for name, m in unet.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }


@pytest.mark.parametrize("metric", ["mse", "bias"])
def test_max_layers_promotes_exactly_the_top_ranked(ddim_pipe, metric):
    config = _config(mode="max_layers", max_layers=3, metric=metric)
    eligible = [n for n in _ranking(ddim_pipe, config) if not n.startswith(("conv_", "time_embedding."))]
    quantize_pipeline(ddim_pipe, config, **FAST)
    unet = ddim_pipe.unet
    promoted = [name for name, bits in unet.ptq_state.report.mixed_precision["promoted"]]
    assert promoted == eligible[:3]
    for name in promoted:
        layer = unet.get_submodule(name)
        assert (layer.weight_bits, layer.act_bits) == (8, 8)
    others = eligible[3:]
    assert {unet.get_submodule(n).weight_bits for n in others} == {4}
    assert {unet.get_submodule(n).act_bits for n in others} == {6}
    assert unet.conv_in.weight_bits == 8  # special layers keep their own policy and are never counted
    # The report counts the promoted layers at their new bits (4 special layers are W8A8 already).
    assert unet.ptq_state.report.layers_by_bits["W8A8"] == 4 + 3


def test_bias_ranking_on_one_row_per_step_warns_before_promoting(ddim_pipe):
    # 16 calibration rows over 4 steps; 4 evenly spaced rows hold one row per step.
    config = _config(mode="max_layers", max_layers=1, metric="bias", num_samples=4)
    with pytest.warns(UserWarning, match=r"layers.mixed_precision.metric='bias' .* raise layers\.mixed_prec"):
        quantize_pipeline(ddim_pipe, config, **FAST)
    assert len(ddim_pipe.unet.ptq_state.report.mixed_precision["promoted"]) == 1


def test_average_bits_budget_is_respected_and_a_prefix_of_the_ranking(ddim_pipe):
    config = _config(mode="avg_weight_bits", avg_weight_bits=4.6)
    ranking = [n for n in _ranking(ddim_pipe, config) if not n.startswith(("conv_", "time_embedding."))]
    float_sizes = {n: m.weight.numel() for n, m in ddim_pipe.unet.named_modules() if hasattr(m, "weight")}
    quantize_pipeline(ddim_pipe, config, **FAST)
    unet = ddim_pipe.unet
    bits = {n: b for n, b in _bits(unet).items() if b is not None}

    def average(bits: dict[str, int]) -> float:
        return sum(b * float_sizes[n] for n, b in bits.items()) / sum(float_sizes[n] for n in bits)

    promoted = [n for n in ranking if bits[n] == 8]
    assert promoted, "the budget leaves room for at least one layer"
    assert promoted == ranking[: len(promoted)]
    assert average(bits) <= 4.6
    # The next layer of the ranking would not have fitted.
    assert average({**bits, ranking[len(promoted)]: 8}) > 4.6
    summary = unet.ptq_state.report.mixed_precision
    assert summary["average_weight_bits"][1] == pytest.approx(average(bits), abs=1e-4)
    assert "mixed precision (avg_weight_bits=4.6, by mse)" in str(unet.ptq_state.report)


def test_promoted_float_layers_save_and_reload_bit_exact(ddim_pipe, tmp_path):
    config = _config(mode="max_layers", max_layers=2, high_bits=None)
    quantize_pipeline(ddim_pipe, config, **FAST)
    unet = ddim_pipe.unet
    promoted = [name for name, bits in unet.ptq_state.report.mixed_precision["promoted"]]
    assert len(promoted) == 2
    for name in promoted:
        assert type(unet.get_submodule(name)) in (nn.Conv2d, nn.Linear)
    kept = dict(unet.ptq_state.plan.kept_float)
    assert all("among the most sensitive layers" in kept[name] for name in promoted)
    assert "kept float: 2 - among the most sensitive layers" in str(unet.ptq_state.report)

    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DModel.from_pretrained(tmp_path / "unet")
    assert _bits(loaded) == _bits(unet)
    assert loaded.ptq_state.report.mixed_precision == unet.ptq_state.report.mixed_precision
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    t = torch.tensor([900, 20])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, unet(x, t).sample)
    card = str(build_model_card(loaded, "user/tiny-mixed"))
    assert "| mixed precision | (max_layers=2, by mse): 2 layer(s) promoted: " in card


@pytest.mark.slow  # ~13 s on 2 CPU cores
def test_sdxl_mixed_bits_save_and_reload_bit_exact(sdxl_pipe, prompts, tmp_path):
    config = _config(mode="max_layers", max_layers=2, num_samples=2).replace(calibration={"num_samples": 4})
    quantize_pipeline(sdxl_pipe, config, prompts=prompts, **FAST)
    unet = sdxl_pipe.unet
    bits = _bits(unet)
    promoted = [name for name, b in unet.ptq_state.report.mixed_precision["promoted"]]
    assert len(promoted) == 2 and all(bits[n] == 8 for n in promoted)
    assert sorted(set(bits.values()) - {None}) == [4, 8]
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert _bits(loaded) == bits
    for name in promoted:
        assert torch.equal(loaded.get_submodule(name).weight, unet.get_submodule(name).quantized_weight())


def test_sd_pipeline_max_layers(sd_pipe, prompts):
    config = _config(mode="max_layers", max_layers=1, num_samples=2).replace(calibration={"num_samples": 4})
    quantize_pipeline(sd_pipe, config, prompts=prompts, **FAST)
    promoted = sd_pipe.unet.ptq_state.report.mixed_precision["promoted"]
    assert len(promoted) == 1 and sd_pipe.unet.get_submodule(promoted[0][0]).weight_bits == 8


def test_budget_below_the_plan_errors_before_calibration(ddim_pipe):
    calls = []
    ddim_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"layers\.mixed_precision\.avg_weight_bits=4\.0 .*a number >= 4\.1"):
        quantize_pipeline(ddim_pipe, _config(mode="avg_weight_bits", avg_weight_bits=4.0), **FAST)
    assert calls == [] and not is_quantized(ddim_pipe.unet)


@pytest.mark.parametrize(
    ("mixed", "match"),
    [
        ({"mode": "some"}, r"layers\.mixed_precision\.mode='some' .*'off', 'avg_weight_bits', 'max_layers'"),
        ({"mode": "max_layers"}, r"layers\.mixed_precision\.max_layers=None .*integer >= 1"),
        ({"mode": "max_layers", "max_layers": 0}, r"max_layers=0 .*integer >= 1"),
        ({"mode": "avg_weight_bits"}, r"avg_weight_bits=None .*a number in \[2\.0, 32\.0\]"),
        ({"mode": "avg_weight_bits", "avg_weight_bits": 40}, r"avg_weight_bits=40 "),
        ({"mode": "max_layers", "max_layers": 1, "high_bits": 4}, r"high_bits=4 .*\[5, 8\].*or None"),
        ({"metric": "sqnr"}, r"metric='sqnr' .*'mse', 'bias'"),
        ({"num_samples": 0}, r"num_samples=0"),
        ({"budget": 3}, r"unknown key\(s\) \['layers\.mixed_precision\.budget'\]"),
    ],
)
def test_bad_budgets_name_field_value_and_choices(mixed, match):
    with pytest.raises(ValueError, match=match):
        PTQConfig(weight_bits=4, layers={"mixed_precision": mixed})


def test_weight_only_quantization_while_loading_drops_mixed_precision_and_says_so(tmp_path, ddim_pipe):
    ddim_pipe.unet.save_pretrained(tmp_path / "float")
    config = PTQConfig(
        weight_bits=4, act_bits=None, layers={"mixed_precision": {"mode": "max_layers", "max_layers": 1}}
    )
    with pytest.warns(UserWarning, match=r"layers\.mixed_precision\.mode='max_layers' -> 'off'"):
        unet = UNet2DModel.from_pretrained(
            tmp_path / "float", quantization_config=PTQQuantizationConfig(config)
        )
    assert not unet.ptq_state.config.layers.mixed_precision.enabled
    eight = {n for n, m in unet.named_modules() if isinstance(m, QuantLayerMixin) and m.weight_bits == 8}
    assert eight and all(n in ("conv_in", "conv_out") or n.startswith("time_embedding.") for n in eight)


def test_config_round_trips_with_mixed_precision():
    config = _config(mode="avg_weight_bits", avg_weight_bits=5.5, high_bits=None, metric="bias")
    assert PTQConfig.from_json(config.to_json()) == config
    assert config.to_dict()["layers"]["mixed_precision"]["avg_weight_bits"] == 5.5


def test_failure_in_the_sensitivity_pass_restores_the_float_unet(ddim_pipe, monkeypatch):
    import diffusers_ptq.sensitivity.mixed as mixed

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    before = {k: v.clone() for k, v in ddim_pipe.unet.state_dict().items()}
    monkeypatch.setattr(mixed, "measure_units", fail)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_pipeline(ddim_pipe, _config(mode="max_layers", max_layers=1), **FAST)
    unet = ddim_pipe.unet
    assert not is_quantized(unet) and not hasattr(unet, "ptq_state")
    assert not unet._forward_pre_hooks  # the probe's timestep hook is gone
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("weight_bits", "count"), [(4, 5), (6, 4)])
def test_auto_max_layers_keeps_five_float_at_4_bit_weights_and_four_above(ddim_pipe, weight_bits, count):
    config = _config(mode="max_layers", max_layers="auto", high_bits=None).replace(weight_bits=weight_bits)
    eligible = [n for n in _ranking(ddim_pipe, config) if not n.startswith(("conv_", "time_embedding."))]
    quantize_pipeline(ddim_pipe, config, **FAST)
    report = ddim_pipe.unet.ptq_state.report.mixed_precision
    assert [name for name, _ in report["promoted"]] == eligible[:count]
    assert report["max_layers"] == count  # the report records the resolved count
    assert ddim_pipe.unet.ptq_state.config.layers.mixed_precision.max_layers == "auto"  # the config, as given


@pytest.mark.parametrize("value", ["five", "AUTO"])
def test_max_layers_rejects_strings_other_than_auto(value):
    with pytest.raises(
        ValueError, match=rf"layers.mixed_precision.max_layers={value!r}.*an integer >= 1 or 'auto'"
    ):
        _config(mode="max_layers", max_layers=value)
