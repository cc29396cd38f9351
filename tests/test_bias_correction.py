"""Timestep-aware bias correction: 'layer' tables and PTQD's 'output' correction.

The claims: after 'layer' correction every quantized layer's mean output error (against the float UNet),
per output channel and timestep group over the calibration rows, is float rounding; 'output' correction
makes the noise prediction's mean error per group and channel float rounding and lowers the bias metric;
both survive save / from_pretrained bit-exactly; `convert` applies the tables per sample.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from diffusers_ptq import (
    PTQConfig,
    available_presets,
    convert,
    quantize_pipeline,
    quantize_unet,
    set_quant_state,
)
from diffusers_ptq.benchmark.quality.sampling import (
    ddim_pipeline,
    noise_errors_per_step,
    record_trajectory,
)
from diffusers_ptq.config import WeightQuantConfig
from diffusers_ptq.initialise import QuantSwitches, float_mode, quant_layers
from diffusers_ptq.integer import Int8Conv2d, Int8Linear
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.primitives import mean_error_rms
from diffusers_ptq.quantizers import OutputCorrection, TimestepBiasTable
from diffusers_ptq.tiny import tiny_ddim_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_unet2d
from integer_helpers import (
    FAST,
    KERNELS,
    LAYERS,
    MIXED_T,
    SEARCH,
    act_factory,
    assert_agrees,
    assert_unet_agrees,
    context_and_map,
    float_output,
    unet_inputs,
)
from recipe_helpers import plain
from reconstruction_helpers import calibration_set

UNETS = {
    "unet2d": lambda: tiny_unet2d(),
    "sd": lambda: tiny_sd_pipeline().unet,
    "sdxl": lambda: tiny_sdxl_pipeline().unet,
}


def _config(mode: str, act_bits: int | None = 8, groups: int | str = 2) -> PTQConfig:
    return plain(
        weight_bits=4,
        act_bits=act_bits,
        weights={**SEARCH, "symmetric": False},
        activations={**SEARCH, "timestep_groups": groups},
        bias_correction=mode,
    )


def _quantized(kind: str, mode: str, act_bits: int | None = 8, rows: int = 10):
    unet = UNETS[kind]()
    data = calibration_set(unet, rows=rows)
    quantize_unet(unet, _config(mode, act_bits), data, batch_size=5, progress=False)
    return unet, data


# -- config -------------------------------------------------------------------------------------------------


def test_field_default_is_output_presets_are_off_and_it_round_trips():
    assert PTQConfig().bias_correction == "output"  # the default recipe's
    published = [name for name in available_presets() if name != "default"]
    assert all(PTQConfig.preset(name).bias_correction == "off" for name in published)
    with pytest.raises(ValueError, match=r"bias_correction='bias'.*'off', 'layer', 'output'"):
        PTQConfig(bias_correction="bias")
    config = PTQConfig(bias_correction="output")
    assert PTQConfig.from_json(config.to_json()) == config
    assert PTQConfig().replace(bias_correction="layer").bias_correction == "layer"


# -- 'layer' ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _layer_means(unet: nn.Module, data, quantized: bool, tables: bool = True) -> dict[str, torch.Tensor]:
    """Per layer: (G, C) mean output over the calibration rows of each timestep group (independent code)."""
    group_of_row = unet.ptq_state.group_map[data.train_timesteps]
    num_groups = int(unet.ptq_state.group_map.max()) + 1
    outputs: dict[str, list[torch.Tensor]] = {}
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, QuantLayerMixin)}

    def hook(name):
        def record(module, args, out):
            y = out.double()
            y = y.movedim(1, -1) if isinstance(module, nn.Conv2d) else y  # channels last
            outputs.setdefault(name, []).append(y.reshape(y.shape[0], -1, y.shape[-1]))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    set_quant_state(unet, weights=quantized, acts=quantized and unet.ptq_state.config.activations.enabled)
    for layer in layers.values():
        layer.bias_table.enabled = layer.bias_table.enabled and tables
    try:
        for start in range(0, len(data), 5):
            unet(**data.unet_kwargs(torch.arange(start, min(start + 5, len(data))), "cpu", torch.float32))
    finally:
        for h in handles:
            h.remove()
        set_quant_state(unet, weights=True, acts=unet.ptq_state.config.activations.enabled)
    means = {}
    for name, chunks in outputs.items():
        y = torch.cat(chunks)  # (rows, positions, C)
        means[name] = torch.stack([y[group_of_row == g].mean(dim=(0, 1)) for g in range(num_groups)])
    return means


@pytest.mark.parametrize(
    ("kind", "act_bits"),
    [
        ("unet2d", 8),
        ("unet2d", None),
        ("sd", 8),
        pytest.param("sdxl", 8, marks=pytest.mark.slow),
    ],  # SDXL: ~8 s
)
def test_layer_correction_zeroes_each_layers_mean_error_per_group(kind, act_bits):
    """W4A8 and weight-only: with the tables, E[y_float - y_quant] per group and channel is float rounding."""
    unet, data = _quantized(kind, "layer", act_bits)
    float_means = _layer_means(unet, data, quantized=False)
    corrected = _layer_means(unet, data, quantized=True)
    tables = [m.bias_table for m in unet.modules() if isinstance(m, QuantLayerMixin)]
    assert tables and all(isinstance(t, TimestepBiasTable) for t in tables)
    uncorrected = _layer_means(unet, data, quantized=True, tables=False)
    worst_before = max(float((float_means[n] - uncorrected[n]).abs().max()) for n in float_means)
    assert worst_before > 1e-3  # the test has something to remove
    for name, ref in float_means.items():
        scale = max(1.0, float(ref.abs().max()))
        err = float((ref - corrected[name]).abs().max())
        assert err <= 2e-6 * scale, f"{name}: mean error {err:.3g} left after correction"
    summary = unet.ptq_state.bias_correction
    assert summary["mode"] == "layer" and summary["layers"] == len(tables)


def test_tables_are_per_sample_and_switch_off_with_quantization():
    unet, _ = _quantized("unet2d", "layer")
    layer = next(m for m in unet.modules() if isinstance(m, QuantLayerMixin) and isinstance(m, nn.Conv2d))
    table = layer.bias_table
    assert table.table.shape == (2, layer.out_channels) and table.table.abs().sum() > 0
    x = torch.randn(4, layer.in_channels, 6, 6)
    with unet.ptq_state.context.use(MIXED_T):
        with_table = layer(x)
        table.enabled = False
        without = layer(x)
        table.enabled = True
    expected = table.table[table.group_map[MIXED_T]][:, :, None, None]
    torch.testing.assert_close(with_table - without, expected.expand_as(without), rtol=0, atol=1e-6)
    set_quant_state(unet, weights=False, acts=False)
    assert not table.enabled  # float runs (observers, reconstruction targets) see the float layer


@pytest.mark.parametrize("mode", ["layer", "output"])
def test_float_mode_puts_back_every_switch_the_corrections_included(mode):
    """The float passes of reconstruction, the group search and the sampling check run inside
    `float_mode`: afterwards every quantizer, bias table and the output correction is switched as before,
    one that was off included (reconstruction on a corrected UNet must not lose its correction)."""
    unet, _ = _quantized("unet2d", mode)
    kinds = TimestepBiasTable if mode == "layer" else OutputCorrection
    corrections = [m for m in unet.modules() if isinstance(m, kinds)]
    assert corrections and all(m.enabled for m in corrections)
    switches = QuantSwitches(unet).saved
    switches[0][0].enabled = False  # an activation quantizer switched off by the user stays off
    before = [(m, m.enabled) for m, _ in switches]
    with float_mode(unet):
        assert not any(m.enabled for m, _ in switches)
    assert [(m, m.enabled) for m, _ in switches] == before
    with pytest.raises(RuntimeError, match="inside"), float_mode(unet):
        raise RuntimeError("inside")
    assert [(m, m.enabled) for m, _ in switches] == before


# -- convert ------------------------------------------------------------------------------------------------


def _tabled_layer(name: str, seed: int = 0):
    torch.manual_seed(seed)
    context, group_map = context_and_map()
    build, shape = LAYERS[name]
    # Per-channel scales: these layers' K (13 x 9) would get near group sizes, which the Triton conv leaves
    # to its im2col path; group scales with tables: test_group_scales.py.
    weights = WeightQuantConfig(bits=4, symmetric=False, scale_search="minmax", granularity="per_channel")
    layer = build(weights, act_factory(context, group_map, 8, False, seed))
    layer.calibrate_weights()
    layer.bias_table = TimestepBiasTable(context, group_map, layer.weight.shape[0])
    layer.bias_table.table.copy_(torch.randn(layer.bias_table.table.shape) * 3)  # groups far apart
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return layer, x, context


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", ["linear_2d", "linear_3d", "conv1x1", "conv3x3", "conv3x3_split"])
@torch.no_grad()
def test_integer_layers_apply_the_table_per_sample(name, kernel):
    """A batch mixing three timestep groups: integer output equals fake quant to float rounding."""
    layer, x, context = _tabled_layer(name)
    with context.use(MIXED_T):
        new = (Int8Conv2d if isinstance(layer, nn.Conv2d) else Int8Linear)(layer, kernel)
        assert_agrees(new(x), layer(x))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("name", ["conv3x3", "conv3x3_split", "conv3x3_dilated_nobias"])
@torch.no_grad()
def test_triton_epilogue_applies_the_table_per_sample(name):
    """The implicit-GEMM kernel adds each row's table row in its epilogue (CUDA, or Triton's interpreter)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer, x, context = _tabled_layer(name)
    layer, x, t = layer.to(device), x.to(device), MIXED_T.to(device)
    with context.use(t):
        new = Int8Conv2d(layer, "triton")
        assert new.implicit_gemm
        assert_agrees(new(x), layer(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_converted_unet_with_tables_on_cuda_triton():
    pipe = tiny_ddim_pipeline()
    quantize_pipeline(pipe, _config("layer", groups=3), **FAST)
    unet = pipe.unet.to("cuda")
    inputs = {k: v.to("cuda") for k, v in unet_inputs(unet).items()}
    ref, float_ref = unet(**inputs).sample, float_output(unet, inputs)
    converted = copy.deepcopy(unet)
    assert convert(converted, kernel="triton").integer
    assert_unet_agrees(converted(**inputs).sample, ref, float_ref)


@torch.no_grad()
def test_converted_unet_matches_fake_quant_with_tables():
    pipe = tiny_ddim_pipeline()
    quantize_pipeline(pipe, _config("layer", groups=3), **FAST)
    unet = pipe.unet
    inputs = unet_inputs(unet)
    ref, float_ref = unet(**inputs).sample, float_output(unet, inputs)
    converted = copy.deepcopy(unet)
    report = convert(converted, kernel="int_mm")
    assert report.integer
    assert_unet_agrees(converted(**inputs).sample, ref, float_ref)


# -- 'output' -----------------------------------------------------------------------------------------------


@torch.no_grad()
def _noise_errors(unet: nn.Module, data, corrected: bool) -> torch.Tensor:
    """(rows, C, H, W) eps_q - eps of the UNet on the calibration rows, with or without the correction.

    In the fit's own batches (5 rows, as `_quantized` calibrates): oneDNN picks its convolution algorithm
    by batch shape, and a last-ulp difference would show up against the 1e-6 bound below.
    """
    errors = []
    for kwargs in data.batches(5, "cpu", torch.float32):
        set_quant_state(unet, weights=False, acts=False)
        eps = unet(**kwargs).sample
        set_quant_state(unet, weights=True, acts=unet.ptq_state.config.activations.enabled)
        unet.ptq_output_correction.enabled = corrected
        try:
            errors.append(unet(**kwargs).sample - eps)
        finally:
            unet.ptq_output_correction.enabled = True
    return torch.cat(errors)


@pytest.mark.parametrize("kind", ["unet2d", "sd", "sdxl"])
def test_output_correction_removes_the_mean_noise_error_per_group(kind):
    unet, data = _quantized(kind, "output")
    correction = unet.ptq_output_correction
    assert isinstance(correction, OutputCorrection)
    corrected = _noise_errors(unet, data, corrected=True)
    raw = _noise_errors(unet, data, corrected=False)
    groups = unet.ptq_state.group_map[data.train_timesteps]
    for g in groups.unique().tolist():
        rows = groups == g
        before = raw[rows].double().mean(dim=(0, 2, 3))  # per channel, over samples and positions
        after = corrected[rows].double().mean(dim=(0, 2, 3))
        assert float(after.abs().max()) <= 1e-6 * max(1.0, float(raw.abs().max()))
        assert float(after.abs().max()) < 0.01 * float(before.abs().max())
        # The bias metric (RMS over C, H, W of the mean over samples) is lower as well.
        metric = lambda e: float(e.double().mean(0).pow(2).mean().sqrt())  # noqa: E731
        assert metric(corrected[rows]) < metric(raw[rows])
    assert unet.ptq_state.bias_correction["mode"] == "output"


def test_output_correction_formula_and_batch_mixing():
    unet, _ = _quantized("unet2d", "output")
    correction = unet.ptq_output_correction
    correction.k.copy_(torch.tensor([0.5, -0.25]))
    eps_q = torch.randn(4, correction.b.shape[1], 3, 3)
    with unet.ptq_state.context.use(MIXED_T):
        out = correction(eps_q)
    g = correction.group_map[MIXED_T]
    expected = (eps_q - correction.b[g][:, :, None, None]) / (1 + correction.k[g])[:, None, None, None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# -- save / load --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["layer", "output"])
@torch.no_grad()
def test_checkpoint_reloads_bit_exact(mode, tmp_path):
    unet, _ = _quantized("unet2d", mode)
    unet.save_pretrained(tmp_path)
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert loaded.ptq_state.config.bias_correction == mode
    buffers = dict(unet.named_buffers())
    for name, value in loaded.named_buffers():
        assert value.dtype == buffers[name].dtype and torch.equal(value, buffers[name]), name
    inputs = unet_inputs(unet)
    assert torch.equal(loaded(**inputs).sample, unet(**inputs).sample)
    # A lower torch_dtype casts the model, never the calibrated tables (like the quantizer scales).
    low = UNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert low.conv_in.weight.dtype == torch.bfloat16
    for name, value in low.named_buffers():
        if "bias_table" in name or "ptq_output_correction" in name:
            assert value.dtype == buffers[name].dtype and torch.equal(value, buffers[name]), name


@torch.no_grad()
def test_sd_checkpoint_with_tables_reloads_bit_exact(tmp_path):
    unet, _ = _quantized("sd", "layer", rows=5)
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    inputs = unet_inputs(unet)
    assert torch.equal(loaded(**inputs).sample, unet(**inputs).sample)


def test_weight_only_quantization_on_load_drops_bias_correction_and_says_so(tmp_path):
    from diffusers_ptq import PTQQuantizationConfig

    tiny_unet2d().save_pretrained(tmp_path)
    config = PTQQuantizationConfig(PTQConfig(weight_bits=8, act_bits=None, bias_correction="layer"))
    with pytest.warns(UserWarning, match=r"not applied: .*bias_correction='layer' -> 'off'"):
        unet = UNet2DModel.from_pretrained(tmp_path, quantization_config=config)
    assert unet.ptq_state.config.bias_correction == "off"
    assert unet.config.quantization_config.ptq.bias_correction == "off"  # the checkpoint says what ran


# -- the bias metric ----------------------------------------------------------------------------------------


def test_mean_error_rms_is_the_norm_of_the_mean_error():
    ref = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert mean_error_rms(ref, ref + 0.25) == pytest.approx(0.25, rel=1e-12)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])[:, None, None, None]
    assert mean_error_rms(ref, ref + signs * torch.rand(1, 3, 4, 4).double()) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        mean_error_rms(ref, ref[:3])


@torch.no_grad()
def test_bench_bias_per_step_equals_an_independent_computation():
    pipe = tiny_ddim_pipeline()
    trajectory = record_trajectory(ddim_pipeline(pipe), 3, seed=0, num_inference_steps=3)
    quantize_pipeline(pipe, _config("off"), **FAST)
    errors = noise_errors_per_step(pipe.unet, trajectory)
    assert len(errors.bias) == 3 and len(errors.sqnr) == 3
    for step, value in enumerate(errors.bias):
        x, t = trajectory.samples[step], trajectory.timesteps[step]
        pred = pipe.unet(x, t).sample.numpy().astype("float64")
        err = pred - trajectory.noise_pred[step].numpy().astype("float64")
        per_element = err.sum(axis=0) / err.shape[0]
        expected = float((per_element**2).sum() / per_element.size) ** 0.5
        assert value == pytest.approx(expected, rel=1e-12) and value > 0


def test_cli_rejects_a_bad_bias_correction_before_any_work(tmp_path):
    from diffusers_ptq import cli

    out = tmp_path / "q"
    argv = ["quantize", "--model", "tiny:ddim", "--bias-correction", "nope", "--output", str(out)]
    assert cli.main(argv) == 2
    assert not out.exists()


def test_model_card_names_the_bias_correction():
    from diffusers_ptq.serialization import build_model_card

    unet, _ = _quantized("unet2d", "output", rows=5)
    assert "| bias correction | `output` (per timestep group) |" in str(build_model_card(unet, "a/b"))


@pytest.mark.parametrize(
    ("build", "mode"),
    [(tiny_sd_pipeline, "layer"), (tiny_sd_pipeline, "output"), (tiny_sdxl_pipeline, "output")],
    ids=["sd-layer", "sd-output", "sdxl-output"],  # SDXL's tables: the per-layer test above
)
@torch.no_grad()
def test_text_to_image_pipelines_quantize_with_bias_correction(build, mode):
    """Through quantize_pipeline (CFG batches, SDXL's added conditions); the pipeline stays stock."""
    pipe = build()
    prompts = ["a photo of a cat", "a red car"]
    quantize_pipeline(pipe, _config(mode), prompts=prompts, **FAST)
    assert pipe.unet.ptq_state.bias_correction["mode"] == mode
    gen = torch.Generator().manual_seed(0)
    kwargs = {"num_inference_steps": 2, "output_type": "np", "generator": gen}
    corrected = pipe(prompts, **kwargs).images
    modules = [m for m in pipe.unet.modules() if isinstance(m, TimestepBiasTable | OutputCorrection)]
    assert modules
    for m in modules:
        m.enabled = False
    plain = pipe(prompts, **{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    assert np.isfinite(corrected).all() and not np.array_equal(corrected, plain)


@pytest.mark.slow  # ~32 s on 2 CPU cores
def test_no_recompile_across_timesteps_with_the_output_hook():
    """The UNet forward hook and the per-sample table lookups compile into one graph for all timesteps."""
    from test_compile import _run_compiled

    pipe = tiny_ddim_pipeline()
    config = _config("output", groups=4)
    quantize_pipeline(pipe, config, num_samples=16, num_inference_steps=8, batch_size=8, progress=False)
    outputs, expected, graphs = _run_compiled(pipe.unet, "eager")
    assert graphs[0] > 0 and graphs == [graphs[0]] * len(graphs), f"graphs compiled per call: {graphs}"
    for t in outputs:
        torch.testing.assert_close(outputs[t], expected[t])


def test_a_layer_that_runs_twice_per_forward_is_refused(monkeypatch):
    import diffusers_ptq.job as job
    from diffusers_ptq.correction import correct_layers

    monkeypatch.setattr(job, "correct_bias", lambda *args, **kwargs: {})  # tables installed, not filled
    unet = tiny_unet2d()
    data = calibration_set(unet, rows=5)
    quantize_unet(unet, _config("layer"), data, batch_size=5, progress=False)
    first, second = unet.mid_block.resnets  # same widths: one quantized conv called from both places
    second.conv1 = first.conv1
    with pytest.raises(ValueError, match=r"mid_block\.resnets\.0\.conv1 runs more than once"):
        correct_layers(unet, data, batch_size=5, acts=True, progress=False)
    assert all(float(m.bias_table.table.abs().max()) == 0 for _, m in quant_layers(unet))
