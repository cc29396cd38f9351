"""A failure at any phase of `quantize_pipeline` / `quantize_unet` leaves the float UNet exactly as it was.

Each test makes one phase raise (the phase's function patched where it is called; most run first, so
the phase has changed the UNet before failing) and then checks everything a caller could see: the state
dict bit for bit, requires_grad and training flags, module classes, attention processors, hooks, the
instance attributes and config diffusers reads, and the pipeline's images.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

import diffusers_ptq.api as api
import diffusers_ptq.calibration.selectors as selectors
import diffusers_ptq.correction.layer as correction_layer
import diffusers_ptq.correction.output as correction_output
import diffusers_ptq.job as job
from diffusers_ptq import PTQConfig, quantize_pipeline, quantize_unet
from diffusers_ptq.gptq import runner as gptq_runner
from diffusers_ptq.reconstruction import runner
from diffusers_ptq.search import GroupSearch
from diffusers_ptq.tiny import tiny_ddim_pipeline
from reconstruction_helpers import calibration_set

FAST = {"num_samples": 6, "num_inference_steps": 4, "batch_size": 6, "progress": False}
RECON = {
    "enabled": True,
    "optimization": "joint",  # one pass: one train_unit call per unit
    "iterations": 2,
    "batch_size": 4,
    "cache_dtype": "float32",
    "cache_batch_size": 6,
}
SEARCH = {"enabled": True, "target": "float", "epochs": 1, "batch_size": 6}


class Injected(RuntimeError):
    """The failure the tests inject."""


def _config(
    reconstruction: bool = False,
    search: bool = False,
    gptq: bool = False,
    bias: str = "off",
    **calibration: Any,
) -> PTQConfig:
    return PTQConfig(
        bias_correction=bias,
        weight_bits=4,
        act_bits=8,
        weights={"num_candidates": 10, "symmetric": False, "rounding": "gptq" if gptq else "nearest"},
        activations={"num_candidates": 10, "timestep_groups": 2},
        reconstruction=RECON if reconstruction else {"enabled": False},
        group_search=SEARCH if search else {"enabled": False},
        calibration=calibration,
        selection={"active_round_size": 3, "active_search_epochs": 1},
    )


def _pipe():
    """The tiny DDIM pipeline with mixed flags, so a restore that resets them uniformly shows."""
    pipe = tiny_ddim_pipeline()
    unet = pipe.unet
    unet.train()
    unet.mid_block.eval()
    unet.conv_out.eval()
    unet.time_embedding.requires_grad_(False)
    unet.down_blocks[0].resnets[0].conv1.weight.requires_grad_(False)
    return pipe


def _images(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(batch_size=1, num_inference_steps=3, generator=gen, output_type="np").images


def _processors(unet) -> dict[str, Any]:
    return {n: m.processor for n, m in unet.named_modules() if isinstance(m, Attention)}


def _snapshot(pipe) -> dict[str, Any]:
    unet = pipe.unet
    return {
        "state": {k: v.clone() for k, v in unet.state_dict().items()},
        "grads": {n: p.requires_grad for n, p in unet.named_parameters()},
        "training": {n: m.training for n, m in unet.named_modules()},
        "classes": {n: type(m) for n, m in unet.named_modules()},
        "processors": _processors(unet),
        "hooks": {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in unet.named_modules()},
        "attributes": set(unet.__dict__),
        "config": dict(unet.config),
        "images": _images(pipe),
    }


def _assert_unchanged(pipe, before: dict[str, Any]) -> None:
    unet = pipe.unet
    after = unet.state_dict()
    assert after.keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == before["grads"]
    assert {n: m.training for n, m in unet.named_modules()} == before["training"]
    assert {n: type(m) for n, m in unet.named_modules()} == before["classes"]  # no quantized module left
    processors = _processors(unet)
    assert processors.keys() == before["processors"].keys()
    assert all(processors[k] is v for k, v in before["processors"].items())
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in unet.named_modules()}
    assert hooks == before["hooks"]
    assert set(unet.__dict__) == before["attributes"]
    for name in ("ptq_state", "hf_quantizer", "is_quantized", "quantization_method"):
        assert name not in unet.__dict__, name
    assert dict(unet.config) == before["config"] and "quantization_config" not in unet.config
    np.testing.assert_array_equal(_images(pipe), before["images"])


def _after(original, fail_on_call: int = 1):
    """`original`, raising Injected after its `fail_on_call`-th call has run (so it changed the UNet)."""
    calls = {"n": 0}

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            raise Injected(f"after {original.__name__}")
        return result

    return wrapper


def _raising(*args, **kwargs):
    raise Injected("instead of the phase")


def _fails_and_restores(config: PTQConfig) -> None:
    pipe = _pipe()
    before = _snapshot(pipe)
    with pytest.raises(Injected):
        quantize_pipeline(pipe, config, **FAST)
    _assert_unchanged(pipe, before)


def _unit_names() -> list[str]:
    """The units (joint pass) a reconstruction of the tiny UNet trains, from one successful run."""
    pipe = quantize_pipeline(tiny_ddim_pipeline(), _config(reconstruction=True), **FAST)
    return [u["unit"] for u in pipe.unet.ptq_state.reconstruction["units"]]


UNITS = _unit_names()


def _unit_params() -> list:
    """Every unit; by default only the first, the first attention and the last run (the path is the same,
    the UNet holds more trained units the later it fails); the rest are slow (~2.3 s each on 2 CPU cores)."""
    first_attention = next(i for i, name in enumerate(UNITS) if ".attentions." in name)
    default = {0, first_attention, len(UNITS) - 1}
    slow = pytest.mark.slow
    return [pytest.param(i, id=name, marks=() if i in default else slow) for i, name in enumerate(UNITS)]


def test_capture(monkeypatch):
    monkeypatch.setattr(selectors, "capture", _raising)
    _fails_and_restores(_config())


def test_capture_after_install(monkeypatch):
    # Active selection installs the quantizers after its first round; the second round's capture fails.
    monkeypatch.setattr(selectors, "capture", _after(selectors.capture, fail_on_call=2))
    _fails_and_restores(_config(search=True, selector="active"))


@pytest.mark.parametrize("name", ["initialise_weights", "initialise_activations"])
def test_initialisation(monkeypatch, name):
    monkeypatch.setattr(job, name, _after(getattr(job, name)))
    _fails_and_restores(_config())


@pytest.mark.parametrize("method", ["start", "fit", "finish"])
def test_group_search(monkeypatch, method):
    monkeypatch.setattr(GroupSearch, method, _after(getattr(GroupSearch, method)))
    _fails_and_restores(_config(search=True))


@pytest.mark.parametrize("index", _unit_params())
def test_reconstruction_unit(monkeypatch, index):
    monkeypatch.setattr(runner, "train_unit", _after(runner.train_unit, fail_on_call=index + 1))
    _fails_and_restores(_config(reconstruction=True))


def test_after_baking(monkeypatch):
    monkeypatch.setattr(runner, "bake_layers", _after(runner.bake_layers))
    _fails_and_restores(_config(reconstruction=True))


def _gptq_layers() -> int:
    pipe = quantize_pipeline(tiny_ddim_pipeline(), _config(gptq=True), **FAST)
    return pipe.unet.ptq_state.gptq["layers"]


GPTQ_LAYERS = _gptq_layers()


@pytest.mark.parametrize("index", [0, 1, GPTQ_LAYERS // 2, GPTQ_LAYERS - 1])
def test_gptq_layer(monkeypatch, index):
    # The layer's solve returns, then fails before its weight is set: `index` layers already hold GPTQ
    # weights (new Parameters) and later layers' inputs came from them.
    monkeypatch.setattr(gptq_runner, "solve_layer", _after(gptq_runner.solve_layer, fail_on_call=index + 1))
    _fails_and_restores(_config(gptq=True))


def test_gptq_hessian(monkeypatch):
    monkeypatch.setattr(gptq_runner, "_hessians", _after(gptq_runner._hessians, fail_on_call=3))
    _fails_and_restores(_config(gptq=True))


def test_reconstruction_after_gptq(monkeypatch):
    monkeypatch.setattr(runner, "train_unit", _after(runner.train_unit, fail_on_call=2))
    _fails_and_restores(_config(reconstruction=True, gptq=True))


def test_gptq_alone_gives_the_quantized_layers_their_weights_back(monkeypatch):
    pipe = _pipe()
    quantize_pipeline(pipe, _config(), **FAST)
    unet = pipe.unet
    data = calibration_set(unet, 6)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    weights = {n: p for n, p in unet.named_parameters()}
    monkeypatch.setattr(gptq_runner, "solve_layer", _after(gptq_runner.solve_layer, fail_on_call=3))
    with pytest.raises(Injected):
        gptq_runner.gptq_quantize(unet, data, unet.ptq_state.config.weights, acts=True, progress=False)
    assert all(p is weights[n] for n, p in unet.named_parameters())
    after = unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert not any("float_weight" in m.__dict__ for m in unet.modules())


@pytest.mark.parametrize("bias", ["layer", "output"])
def test_after_bias_correction(monkeypatch, bias):
    # After the tables / the output correction were filled (and the output hook ran in every forward).
    monkeypatch.setattr(job, "correct_bias", _after(job.correct_bias))
    _fails_and_restores(_config(reconstruction=True, bias=bias))


def test_bias_correction_float_pass(monkeypatch):
    monkeypatch.setattr(correction_layer, "float_layer_means", _after(correction_layer.float_layer_means))
    _fails_and_restores(_config(bias="layer"))


def test_bias_correction_layer_passes(monkeypatch):
    # The float sweep is call 1; call 3 ends the second layer's pass, after the first layer's table is set.
    monkeypatch.setattr(correction_layer, "_sweep", _after(correction_layer._sweep, fail_on_call=3))
    _fails_and_restores(_config(bias="layer"))


def test_output_correction_fit(monkeypatch):
    # Fails on the last quant-state switch, after k and b were written.
    calls = len(range(0, FAST["num_samples"], FAST["batch_size"])) * 2 + 1
    switch = _after(correction_output.set_quant_state, fail_on_call=calls)
    monkeypatch.setattr(correction_output, "set_quant_state", switch)
    _fails_and_restores(_config(bias="output"))


def test_report(monkeypatch):
    build = api.QuantizationReport.build
    monkeypatch.setattr(api.QuantizationReport, "build", _after(build))
    _fails_and_restores(_config(reconstruction=True, search=True))


@pytest.mark.parametrize("gptq", [False, True], ids=["nearest", "gptq"])
def test_attach(monkeypatch, gptq):
    monkeypatch.setattr(api, "attach_quantizer", _after(api.attach_quantizer))
    _fails_and_restores(_config(reconstruction=True, gptq=gptq))


def test_quantize_unet_attach(monkeypatch):
    pipe = _pipe()
    data = calibration_set(pipe.unet, 6)
    before = _snapshot(pipe)
    monkeypatch.setattr(api, "attach_quantizer", _after(api.attach_quantizer))
    with pytest.raises(Injected):
        quantize_unet(pipe.unet, _config(reconstruction=True), data, batch_size=6, progress=False)
    _assert_unchanged(pipe, before)


def test_success_keeps_training_and_requires_grad_flags():
    """Quantized layers take the mode of the layers they replace; reconstruction gives every flag back."""
    pipe = _pipe()
    before = _snapshot(pipe)
    quantize_pipeline(pipe, _config(reconstruction=True), **FAST)
    training = {n: m.training for n, m in pipe.unet.named_modules()}
    assert {n: training[n] for n in before["training"]} == before["training"]
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == before["grads"]


def test_reconstruct_alone_after_baking(monkeypatch):
    """`reconstruct` alone: a failure after the bake gives the quantized layers their float weights back."""
    pipe = _pipe()
    quantize_pipeline(pipe, _config(), **FAST)
    unet = pipe.unet
    data = calibration_set(unet, 6)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    weights = {n: p for n, p in unet.named_parameters()}
    flags = {n: m.training for n, m in unet.named_modules()}
    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    monkeypatch.setattr(runner, "bake_layers", _after(runner.bake_layers))
    with pytest.raises(Injected):
        runner.reconstruct(unet, data, _config(reconstruction=True).reconstruction, progress=False)
    assert all(p is weights[n] for n, p in unet.named_parameters())
    after = unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert {n: m.training for n, m in unet.named_modules()} == flags
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == grads
