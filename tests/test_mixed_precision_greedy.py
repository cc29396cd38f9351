"""`layers.mixed_precision.selection="greedy"`: layers promoted round by round on the quantized UNet."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusers_ptq import PTQConfig, quantize_pipeline, quantize_unet, set_quant_state
from diffusers_ptq.sensitivity.measure import even_rows
from diffusers_ptq.sensitivity.mixed import greedy_selection
from diffusers_ptq.sensitivity.run import capture_for_sensitivity
from recipe_helpers import plain

SEARCH = {"num_candidates": 20}
CALIB = {"num_samples": 16, "num_inference_steps": 4, "batch_size": 8}
ROWS = 8


def _config(**mixed) -> PTQConfig:
    """Nearest rounding, no bias correction: the sensitivity pass runs before either, so only time differs."""
    layers = {"mixed_precision": {"num_samples": ROWS, "selection": "greedy", **mixed}}
    return plain(
        weight_bits=4, act_bits=6, weights=SEARCH, activations=SEARCH, calibration=CALIB, layers=layers
    )


# Errors of a toy UNet by the set of layers kept float: "a" and "b" fix the same error (either one removes
# 4 points, both 4.5), "c" removes 3 on its own. Alone, a and b rank first; greedy takes a, then c.
def _toy_error(kept: set[str]) -> float:
    redundant = 4.5 if {"a", "b"} <= kept else 4.0 if "a" in kept else 3.9 if "b" in kept else 0.0
    return 10.0 - redundant - (3.0 if "c" in kept else 0.0) - (0.6 if "d" in kept else 0.0)


def test_greedy_selection_sees_that_two_layers_fix_the_same_error():
    rounds = []

    def measure(names, picked):
        rounds.append((list(names), list(picked)))
        return {n: _toy_error({n, *picked}) for n in names}

    picks, last = greedy_selection(["a", "b", "c", "d"], measure, lambda names: True, limit=2)
    assert picks == [("a", 6.0), ("c", 3.0)]
    assert len(rounds) == 2 and rounds[1] == (["b", "c", "d"], ["a"])  # no round after the limit
    assert last == {"b": 5.5, "c": 3.0, "d": pytest.approx(5.4)}

    # A budget that refuses a third layer stops after the round that found it; no limit: runs out.
    picks, _ = greedy_selection(["a", "b", "c", "d"], measure, lambda names: len(names) <= 2)
    assert [n for n, _ in picks] == ["a", "c"]
    picks, _ = greedy_selection(["a", "b", "c", "d"], measure, lambda names: True)
    assert [n for n, _ in picks] == ["a", "c", "d", "b"]


def test_greedy_picks_equal_an_independent_search_on_the_quantized_unet(ddim_pipe):
    config = _config(mode="max_layers", max_layers=2, high_bits=None)
    probe = _config(mode="off")
    data = capture_for_sensitivity(ddim_pipe, config, None, None, None, None, None, False)

    # Independently: the recipe's calibrated UNet before GPTQ, every quantizer on but the candidate's and
    # the earlier picks'; the lowest error on the ranking rows wins each round.
    unet = quantize_unet(copy.deepcopy(ddim_pipe.unet), probe, data, batch_size=8, progress=False)
    rows = even_rows(len(data), ROWS)

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [unet(**data.unet_kwargs(rows[i : i + 8])).sample for i in range(0, len(rows), 8)]
            )

    set_quant_state(unet, weights=False, acts=False)
    ref = predict().double()
    candidates = [layer.name for layer in unet.ptq_state.plan.layers]
    expected: list[tuple[str, float]] = []
    for _ in range(2):
        errors = {}
        for name in candidates:
            set_quant_state(unet, weights=True, acts=True)
            for off in [name, *(n for n, _ in expected)]:
                unet.get_submodule(off).set_quant_state(False, False)
            errors[name] = float((predict().double() - ref).pow(2).mean())
        best = min(candidates, key=lambda n: (errors[n], n))
        expected.append((best, errors[best]))
        candidates.remove(best)

    quantize_pipeline(ddim_pipe, config, progress=False)
    summary = ddim_pipe.unet.ptq_state.report.mixed_precision
    assert [name for name, _ in summary["promoted"]] == [name for name, _ in expected]
    for (name, score), (ref_name, ref_score) in zip(summary["ranking"], expected):
        assert name == ref_name and score == pytest.approx(ref_score, rel=1e-5)
    for name, _ in expected:
        assert type(ddim_pipe.unet.get_submodule(name)) in (torch.nn.Conv2d, torch.nn.Linear)
    assert "by mse" in str(ddim_pipe.unet.ptq_state.report)
    assert config.layers.mixed_precision.describe() == "2 layers float (mse, greedy)"


def test_greedy_average_bits_budget_is_respected(ddim_pipe):
    config = _config(mode="avg_weight_bits", avg_weight_bits=4.3)
    quantize_pipeline(ddim_pipe, config, progress=False)
    summary = ddim_pipe.unet.ptq_state.report.mixed_precision
    promoted = [name for name, bits in summary["promoted"]]
    assert promoted and all(bits == 8 for _, bits in summary["promoted"])
    assert promoted == [name for name, _ in summary["ranking"][: len(promoted)]]
    assert summary["average_weight_bits"][1] <= 4.6
    for name in promoted:
        assert ddim_pipe.unet.get_submodule(name).weight_bits == 8


def test_bad_selection_names_field_value_and_choices():
    with pytest.raises(ValueError, match=r"layers\.mixed_precision\.selection='best' .*'alone', 'greedy'"):
        PTQConfig(weight_bits=4, layers={"mixed_precision": {"selection": "best"}})
