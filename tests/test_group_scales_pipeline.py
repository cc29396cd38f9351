"""Group-wise weight scales end to end: quantize_pipeline on the tiny SD and SDXL pipelines, a W4 checkpoint
through save_pretrained / stock `from_pretrained` (bit-exact), and `convert` of the whole UNet."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_ptq import PTQConfig, PTQQuantizationConfig, QuantConv2d, convert, quantize_pipeline
from diffusers_ptq.integer import Int8Conv2d, Int8Linear
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
from integer_helpers import assert_unet_agrees, float_output, unet_inputs
from recipe_helpers import QUICK_LAYERS, plain
from serialization_helpers import FAST, PROMPTS, SEARCH, WEIGHTS, mixed_inputs, read_checkpoint

GROUPED = {**SEARCH, "granularity": "per_group", "group_size": 32}


def _quantize(pipe, **weights):
    config = PTQConfig(
        weight_bits=4, act_bits=8, weights={**GROUPED, **weights}, activations=SEARCH, layers=QUICK_LAYERS
    )
    with pytest.warns(UserWarning, match=r"group_size=32 .*conv_in: K=36"):
        quantize_pipeline(pipe, config, prompts=PROMPTS, **FAST)
    return pipe


@pytest.fixture(scope="module")
def grouped_sd():
    return _quantize(tiny_sd_pipeline())


def _grouped_layers(unet) -> dict[str, QuantLayerMixin]:
    return {
        name: m
        for name, m in unet.named_modules()
        if isinstance(m, QuantLayerMixin) and m.weight_quantizers[0].group_size == 32
    }


def test_quantize_pipeline_installs_group_scales_on_sd(grouped_sd):
    unet = grouped_sd.unet
    grouped = _grouped_layers(unet)
    assert len(grouped) > 10
    for m in grouped.values():
        for q, part in zip(m.weight_quantizers, m._weight_parts(m.weight)):
            if q.group_size is not None:
                assert q.scale.shape == (part.shape[0], part[0].numel() // 32)
    assert unet.get_submodule("conv_in").weight_quantizers[0].granularity == "per_channel"
    out = grouped_sd(PROMPTS[0], num_inference_steps=3, output_type="latent").images
    assert torch.isfinite(out).all()


@pytest.mark.slow  # ~24 s on 2 CPU cores
def test_quantize_pipeline_with_group_scales_on_sdxl():
    pipe = _quantize(tiny_sdxl_pipeline(), symmetric=False)
    grouped = _grouped_layers(pipe.unet)
    assert len(grouped) > 10
    assert any(float(m.weight_quantizers[0].zero_point.abs().max()) > 0 for m in grouped.values())
    out = pipe(PROMPTS[0], num_inference_steps=3, output_type="latent").images
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_group_wise_w4_checkpoint_reloads_bit_exact(grouped_sd, tmp_path):
    unet = grouped_sd.unet
    unet.save_pretrained(tmp_path / "unet")
    tensors, _ = read_checkpoint(tmp_path / "unet" / WEIGHTS)
    name, layer = next((n, m) for n, m in _grouped_layers(unet).items() if isinstance(m, QuantConv2d))
    k = layer.weight[0].numel()
    # Packed nibbles (two codes per byte) and one scale / zero point per group.
    assert tensors[f"{name}.weight_packed"].dtype == torch.uint8
    assert tensors[f"{name}.weight_packed"].shape == (layer.weight.shape[0], k // 2)
    assert tensors[f"{name}.weight_quantizers.0.scale"].shape == (layer.weight.shape[0], k // 32)
    assert tensors["conv_in.weight_quantizers.0.scale"].shape == (layer_out(unet, "conv_in"),)

    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    for key, value in unet.state_dict().items():
        if ".weight_quantizers." in key:
            assert torch.equal(loaded.state_dict()[key], value), key
    x, t = mixed_inputs(unet)
    context = torch.randn(4, 6, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context).sample, unet(x, t, context).sample)


def layer_out(unet, name: str) -> int:
    return unet.get_submodule(name).weight.shape[0]


@torch.no_grad()
def test_convert_agrees_with_fake_quant_for_group_wise_weights(grouped_sd):
    unet = copy.deepcopy(grouped_sd.unet)
    inputs = unet_inputs(unet)
    ref, float_ref = unet(**inputs).sample, float_output(unet, inputs)
    report = convert(unet, kernel="int_mm")
    assert not report.fallback
    integer = [m for m in unet.modules() if isinstance(m, Int8Conv2d | Int8Linear)]
    assert sum(w.group_size == 32 for m in integer for w in m.weights) > 10
    assert_unet_agrees(unet(**inputs).sample, ref, float_ref)


@pytest.mark.slow  # ~12 s on 2 CPU cores
def test_reconstruction_learns_rounding_on_the_group_grid(tmp_path):
    """AdaRound + step sizes through quantize_pipeline: baked codes on the per-group grid, saved bit-exact."""
    pipe = tiny_sd_pipeline()
    # 24 + 8 iterations: with fewer, the whole-run held-out check (3 rows) can undo the run on one thread
    # count and not on another (4 + 2: 0.002682 -> 0.002688 on 2 threads); at 24 + 8 both fall by 3-4 %.
    recon = {"enabled": True, "iterations": 24, "act_iterations": 8, "batch_size": 4}
    recon["cache_dtype"] = "float32"
    config = plain(weight_bits=4, act_bits=8, weights=GROUPED, activations=SEARCH, reconstruction=recon)
    with pytest.warns(UserWarning, match=r"group_size=32"):
        quantize_pipeline(pipe, config, prompts=PROMPTS, **FAST)
    unet = pipe.unet
    report = unet.ptq_state.reconstruction
    assert report is not None and not report["model_reverted"]
    # Units whose held-out loss did not fall revert to their float weights; the trained ones are baked.
    trained = [u["unit"] for u in report["units"] if u["phase"] == "weights" and u["status"] == "trained"]
    layers = _grouped_layers(unet).items()
    grouped = {name: m for name, m in layers if any(f"{name}.".startswith(f"{u}.") for u in trained)}
    assert len(grouped) >= 5
    for m in grouped.values():  # the float weight was replaced by one on the group grid
        for q, part in zip(m.weight_quantizers, m._weight_parts(m.weight.detach())):
            assert torch.equal(q(part), part)
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    x, t = mixed_inputs(unet)
    context = torch.randn(4, 6, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context).sample, unet(x, t, context).sample)


def test_weight_only_group_scales_while_loading_a_float_unet(tmp_path):
    """PTQQuantizationConfig on `from_pretrained`: weight-only per-group quantization, no calibration."""
    tiny_sd_pipeline().unet.save_pretrained(tmp_path / "float")
    recipe = PTQConfig(weight_bits=4, act_bits=None, weights=GROUPED)
    # The default recipe's GPTQ, output correction and mixed precision need calibration data: on load they
    # are dropped with a warning of their own.
    with (
        pytest.warns(UserWarning, match="no calibration data"),
        pytest.warns(UserWarning, match=r"conv_in: K=36"),
    ):
        unet = UNet2DConditionModel.from_pretrained(
            tmp_path / "float", quantization_config=PTQQuantizationConfig(recipe)
        )
    assert len(_grouped_layers(unet)) > 10
    unet.save_pretrained(tmp_path / "w4g32")
    x, t = mixed_inputs(unet)
    context = torch.randn(4, 6, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = unet(x, t, context).sample
        assert torch.equal(
            UNet2DConditionModel.from_pretrained(tmp_path / "w4g32")(x, t, context).sample, expected
        )
