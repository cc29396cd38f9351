"""Quantized checkpoints through save_pretrained / from_pretrained: exactness, layout, registration, size."""

from __future__ import annotations

import copy
import json

import diffusers.quantizers.auto as diffusers_auto
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    ModelMixin,
    PipelineQuantizationConfig,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

import diffusers_ptq
from diffusers_ptq import (
    PTQConfig,
    PTQQuantizationConfig,
    PTQQuantizer,
    QuantConv2d,
    quantize_unet,
)
from diffusers_ptq.serialization import FORMAT_VERSION, PTQQuantizationMethod
from diffusers_ptq.serialization.loading import data_free_recipe
from diffusers_ptq.tiny import tiny_ddim_pipeline, tiny_sd_pipeline
from diffusers_ptq.zoo import sd15_unet_config
from recipe_helpers import plain
from serialization_helpers import (
    FAST,
    PROMPTS,
    SEARCH,
    WEIGHTS,
    calibration_set,
    images,
    mixed_inputs,
    read_checkpoint,
    save_quantized_ddim,
    save_quantized_sd,
    save_quantized_sdxl,
)


@pytest.fixture(scope="module")
def saved_ddim(tmp_path_factory):
    return save_quantized_ddim(tmp_path_factory)


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory):
    return save_quantized_sd(tmp_path_factory)


@pytest.fixture(scope="module")
def saved_sdxl(tmp_path_factory):
    return save_quantized_sdxl(tmp_path_factory)


# -- exactness ----------------------------------------------------------------------------------------------


def test_unet2d_model_and_ddim_pipeline_load_bit_exact(saved_ddim):
    pipe, directory = saved_ddim
    loaded_unet = UNet2DModel.from_pretrained(directory / "unet")
    x, t = mixed_inputs(pipe.unet)
    with torch.no_grad():
        assert torch.equal(loaded_unet(x, t).sample, pipe.unet(x, t).sample)
    loaded = DDIMPipeline.from_pretrained(directory)
    assert np.array_equal(images(loaded), images(pipe))


def test_stable_diffusion_pipeline_loads_bit_exact(saved_sd):
    pipe, directory = saved_sd
    loaded = StableDiffusionPipeline.from_pretrained(directory)
    assert np.array_equal(images(loaded, PROMPTS[0]), images(pipe, PROMPTS[0]))


def test_sdxl_pipeline_loads_bit_exact(saved_sdxl):
    pipe, directory = saved_sdxl
    loaded = StableDiffusionXLPipeline.from_pretrained(directory)
    assert np.array_equal(images(loaded, PROMPTS[1]), images(pipe, PROMPTS[1]))


def test_loaded_unet_is_rebuilt_with_the_same_modules_and_state(saved_sd):
    pipe, directory = saved_sd
    loaded = UNet2DConditionModel.from_pretrained(directory / "unet")
    original = pipe.unet
    assert isinstance(loaded.hf_quantizer, PTQQuantizer) and loaded.is_quantized
    assert [type(m) for m in loaded.modules()] == [type(m) for m in original.modules()]
    # Every buffer and every effective (fake-quantized) weight is identical.
    assert list(loaded.state_dict()) == list(original.state_dict())
    for (name, a), b in zip(loaded.named_buffers(), original.buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for name, module in loaded.named_modules():
        if isinstance(module, QuantConv2d):
            assert torch.equal(module.quantized_weight(), original.get_submodule(name).quantized_weight())
    assert loaded.ptq_state.report == original.ptq_state.report
    assert loaded.ptq_state.config == original.ptq_state.config
    assert loaded.ptq_state.plan == original.ptq_state.plan
    assert loaded.ptq_state.num_prompts == len(PROMPTS)


def test_resaving_a_loaded_checkpoint_reproduces_it(saved_ddim, tmp_path):
    _, directory = saved_ddim
    loaded = UNet2DModel.from_pretrained(directory / "unet")
    loaded.save_pretrained(tmp_path / "again")
    first, first_meta = read_checkpoint(directory / "unet" / WEIGHTS)
    second, second_meta = read_checkpoint(tmp_path / "again" / WEIGHTS)
    assert first.keys() == second.keys() and first_meta == second_meta
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_sharded_checkpoint_loads_bit_exact(saved_ddim, tmp_path):
    pipe, _ = saved_ddim
    pipe.unet.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = UNet2DModel.from_pretrained(tmp_path)
    x, t = mixed_inputs(pipe.unet)
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, pipe.unet(x, t).sample)


def test_per_quantizer_group_maps_survive(saved_ddim, tmp_path):
    unet = copy.deepcopy(saved_ddim[0].unet)
    # The first and last quantized layers (the default recipe may keep conv_in / conv_out float).
    names = [n for n, m in unet.named_modules() if hasattr(m, "act_quantizers") and len(m.act_quantizers)]
    first, last = names[0], names[-1]
    searched = unet.get_submodule(first).act_quantizers[0]
    searched.group_map.copy_(torch.flip(searched.group_map, dims=[0]))  # e.g. an APQ-DM searched assignment
    unet.save_pretrained(tmp_path)
    tensors, _ = read_checkpoint(tmp_path / WEIGHTS)
    assert tensors["_ptq.group_map"].dtype == torch.int16
    assert f"{first}.act_quantizers.0.group_map" in tensors
    assert f"{last}.act_quantizers.0.group_map" not in tensors  # shared, stored once
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.get_submodule(first).act_quantizers[0].group_map, searched.group_map)
    x, t = mixed_inputs(unet)
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, unet(x, t).sample)


def test_torch_dtype_keeps_calibrated_scales_exact(saved_ddim):
    pipe, directory = saved_ddim
    loaded = UNet2DModel.from_pretrained(directory / "unet", torch_dtype=torch.bfloat16)
    assert loaded.conv_in.weight.dtype == torch.bfloat16
    for (name, a), b in zip(loaded.named_buffers(), pipe.unet.buffers()):
        if "quantizer" in name:
            assert a.dtype == b.dtype and torch.equal(a, b), name


# -- layout -------------------------------------------------------------------------------------------------


def test_w4_weights_are_packed_nibbles_and_float_layers_stay_float(saved_sd):
    pipe, directory = saved_sd
    tensors, metadata = read_checkpoint(directory / "unet" / WEIGHTS)
    assert metadata["diffusers_ptq.format_version"] == str(FORMAT_VERSION)
    plan = pipe.unet.ptq_state.plan
    assert plan.layers and plan.kept_float
    for layer in plan.layers:
        weight = pipe.unet.get_submodule(layer.name).weight
        packed = tensors[f"{layer.name}.weight_packed"]
        assert f"{layer.name}.weight" not in tensors
        assert packed.dtype == torch.uint8
        assert tuple(packed.shape) == (weight.shape[0], (weight[0].numel() + 1) // 2)
        module = pipe.unet.get_submodule(layer.name)
        group_size = module.weight_quantizers[0].group_size  # 'auto' groups at W4; split parts on their own
        per_row = 1 if group_size is None else module._weight_parts(weight)[0][0].numel() // group_size
        expected = (weight.shape[0],) if group_size is None else (weight.shape[0], per_row)
        assert tensors[f"{layer.name}.weight_quantizers.0.scale"].shape == expected
        if layer.split is not None:
            assert f"{layer.name}.weight_quantizers.1.scale" in tensors
            assert f"{layer.name}.act_quantizers.1.scale" in tensors
    for name, _ in plan.kept_float:  # conv_in, conv_out, time embedding: float as in the model
        assert tensors[f"{name}.weight"].dtype == torch.float32
    softmax = [k for k in tensors if k.endswith("processor.softmax_quantizer.scale")]
    assert softmax and all(tensors[k].shape == (2,) for k in softmax)  # one scale per timestep group


@pytest.mark.parametrize(("fixture", "dtype"), [("saved_ddim", torch.int8), ("saved_sdxl", torch.uint8)])
def test_w8_weights_are_one_integer_byte_each(fixture, dtype, request):
    pipe, directory = request.getfixturevalue(fixture)
    tensors, _ = read_checkpoint(directory / "unet" / WEIGHTS)
    for layer in pipe.unet.ptq_state.plan.layers:
        packed = tensors[f"{layer.name}.weight_packed"]
        assert packed.dtype == dtype and packed.shape == pipe.unet.get_submodule(layer.name).weight.shape
    maps = [k for k in tensors if k.endswith("group_map")]
    assert maps == ["_ptq.group_map"]  # every activation quantizer shares one map, stored once


def test_quantize_pipeline_attaches_diffusers_quantization_attributes(saved_sd):
    pipe, directory = saved_sd
    unet = pipe.unet
    assert isinstance(unet.hf_quantizer, PTQQuantizer)
    assert unet.is_quantized and unet.quantization_method is PTQQuantizationMethod.DIFFUSERS_PTQ
    qconfig = unet.config.quantization_config
    assert isinstance(qconfig, PTQQuantizationConfig)
    stored = json.loads((directory / "unet" / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "diffusers_ptq" and stored["format_version"] == FORMAT_VERSION
    assert PTQConfig.from_dict(stored["ptq_config"]) == unet.ptq_state.config
    # The stored recipe is the one that ran (keyword overrides applied).
    assert stored["ptq_config"]["calibration"]["num_samples"] == FAST["num_samples"]
    assert stored["calibration_prompts"] == len(PROMPTS)
    assert stored["report"]["samples_per_group"] == unet.ptq_state.report.samples_per_group
    assert stored["num_train_timesteps"] == 1000 and stored["num_timestep_groups"] == 2


def test_registration_is_idempotent_and_uses_an_enum_member():
    diffusers_ptq.register()
    diffusers_ptq.register()
    assert diffusers_auto.AUTO_QUANTIZER_MAPPING["diffusers_ptq"] is PTQQuantizer
    assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["diffusers_ptq"] is PTQQuantizationConfig
    method = PTQQuantizationConfig().quant_method
    assert method.value == "diffusers_ptq" and method in diffusers_auto.AUTO_QUANTIZER_MAPPING
    # The save wrapper is installed once, around diffusers' own method.
    wrapper = ModelMixin.save_pretrained
    assert not getattr(wrapper.__wrapped__, "_diffusers_ptq_atomic_save", False)


# -- PipelineQuantizationConfig: weight-only quantization on load --------------------------------------------


@pytest.fixture(scope="module")
def float_sd_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("float_sd") / "pipe"
    tiny_sd_pipeline().save_pretrained(directory)
    return directory


def test_quant_mapping_quantizes_weights_while_loading(float_sd_dir, tmp_path):
    # The default recipe's data-dependent parts (GPTQ, correction, mixed precision) cannot run while
    # loading: they are dropped with a warning, and the result equals the data-free recipe quantized.
    recipe = PTQConfig(weight_bits=8, act_bits=None, weights=SEARCH)
    mapping = PipelineQuantizationConfig(quant_mapping={"unet": PTQQuantizationConfig(recipe)})
    with pytest.warns(UserWarning, match="quantizing while loading has no calibration data"):
        pipe = StableDiffusionPipeline.from_pretrained(float_sd_dir, quantization_config=mapping)
    assert isinstance(pipe.unet.hf_quantizer, PTQQuantizer)
    assert any(isinstance(m, QuantConv2d) for m in pipe.unet.modules())
    reference = UNet2DConditionModel.from_pretrained(float_sd_dir / "unet")
    applied, _ = data_free_recipe(recipe)
    assert pipe.unet.ptq_state.config == applied
    quantize_unet(reference, applied, calibration_set(reference), progress=False)
    data = calibration_set(reference).unet_kwargs(slice(None))
    with torch.no_grad():
        expected = reference(**data).sample
        assert torch.equal(pipe.unet(**data).sample, expected)
    pipe.unet.save_pretrained(tmp_path)  # and it saves like any diffusers-ptq UNet
    with torch.no_grad():
        assert torch.equal(UNet2DConditionModel.from_pretrained(tmp_path)(**data).sample, expected)


def test_quant_mapping_with_activations_needs_a_calibrated_checkpoint(float_sd_dir, saved_sd):
    mapping = PipelineQuantizationConfig(quant_mapping={"unet": PTQQuantizationConfig(PTQConfig())})
    with pytest.raises(ValueError, match="cannot quantize activations while loading"):
        StableDiffusionPipeline.from_pretrained(float_sd_dir, quantization_config=mapping)
    # A calibrated checkpoint loads with it (its own quantization_config wins, as diffusers documents).
    with pytest.warns(UserWarning, match="quantization_config` from the model will be used"):
        pipe = StableDiffusionPipeline.from_pretrained(saved_sd[1], quantization_config=mapping)
    assert pipe.unet.ptq_state.config == saved_sd[0].unet.ptq_state.config


# -- checkpoint size ----------------------------------------------------------------------------------------


def test_checkpoint_size_of_an_sd_shaped_unet(tmp_path):
    config = sd15_unet_config()  # shipped in the package
    # Stable Diffusion 1.5's layout at a fifth of its width (34 M parameters).
    config.update(block_out_channels=[64, 128, 256, 256], cross_attention_dim=64, sample_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        float_unet = UNet2DConditionModel(**config).eval()
    float_unet.to(torch.float16).save_pretrained(tmp_path / "fp16")
    float_unet.to(torch.float32)
    fp16_size = (tmp_path / "fp16" / WEIGHTS).stat().st_size
    fast = {"scale_search": "minmax"}
    for bits, limit in ((8, 0.55), (4, 0.33)):
        unet = copy.deepcopy(float_unet)
        # The storage format is measured: no GPTQ (same bytes, slow on SD shapes), no extra float layers.
        recipe = plain(weight_bits=bits, act_bits=8, weights=fast, activations=fast)
        quantize_unet(unet, recipe, calibration_set(unet), progress=False)
        unet.save_pretrained(tmp_path / f"w{bits}")
        ratio = (tmp_path / f"w{bits}" / WEIGHTS).stat().st_size / fp16_size
        print(f"W{bits}A8 checkpoint / float16 checkpoint: {ratio:.3f}")
        assert ratio <= limit


def test_float_models_save_and_load_as_stock_diffusers(tmp_path):
    # The registration changes nothing for models without a diffusers-ptq UNet.
    unet = tiny_ddim_pipeline().unet
    unet.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert getattr(loaded, "hf_quantizer", None) is None
    x, t = mixed_inputs(unet)
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, unet(x, t).sample)


def test_plain_modules_are_left_alone():
    # quantize_unet also accepts plain nn.Modules; only diffusers models get the diffusers attributes.
    from diffusers_ptq.serialization import attach_quantizer

    module = nn.Linear(2, 2)
    attach_quantizer(module)
    assert not hasattr(module, "hf_quantizer")
