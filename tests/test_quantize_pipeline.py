"""End-to-end behaviour of quantize_pipeline on tiny offline pipelines."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from diffusers_ptq import (
    PTQConfig,
    QuantAttnProcessor,
    QuantConv2d,
    QuantLinear,
    TimestepActQuantizer,
    quantize_pipeline,
    set_quant_state,
)
from diffusers_ptq.prepare import shortcut_splits
from diffusers_ptq.primitives import sqnr_db
from recipe_helpers import plain

FAST = {"num_samples": 16, "num_inference_steps": 8, "batch_size": 8, "progress": False}


def _config(**overrides) -> PTQConfig:
    # The fast search keeps the tests quick; the search itself is tested in test_primitives. These tests
    # check the pipeline's mechanics, so the default recipe's GPTQ / correction / float layers are off.
    base = plain(weights={"num_candidates": 20}, activations={"num_candidates": 20})
    return base.replace(**overrides)


def _unet_inputs(pipe, seed=0, batch=4):
    gen = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    t = torch.tensor([900, 600, 300, 50][:batch])
    return x, t


def test_modules_replaced_exactly_as_configured(ddim_pipe):
    unet = ddim_pipe.unet
    convs_and_linears = {n for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    attentions = {n for n, m in unet.named_modules() if isinstance(m, Attention)}
    config = _config(layers={"exclude": ["up_blocks.1.*"], "special_layers": "float"})
    quantize_pipeline(ddim_pipe, config, **FAST)

    quantized = {n for n, m in unet.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}
    expected = {
        n
        for n in convs_and_linears
        if not n.startswith("up_blocks.1.")
        and n not in ("conv_in", "conv_out")
        and not n.startswith("time_embedding.")
    }
    assert quantized == expected
    kept = {n for n, _ in unet.ptq_state.plan.kept_float}
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= kept
    # Attention matmuls follow the same selection: the excluded up block keeps its processor.
    for name in attentions:
        processor = unet.get_submodule(name).processor
        assert isinstance(processor, QuantAttnProcessor) == (not name.startswith("up_blocks.1."))


def test_special_layers_policy_sets_8_bits(ddim_pipe):
    quantize_pipeline(ddim_pipe, _config(weight_bits=4, act_bits=6), **FAST)
    unet = ddim_pipe.unet
    assert unet.conv_in.weight_bits == 8 and unet.conv_in.act_bits == 8
    assert unet.time_embedding.linear_1.weight_bits == 8
    assert unet.down_blocks[0].resnets[0].conv1.weight_bits == 4
    assert unet.down_blocks[0].resnets[0].conv1.act_bits == 6


def test_shortcut_split_at_concat_boundary(ddim_pipe):
    unet = ddim_pipe.unet
    splits = shortcut_splits(unet)
    assert splits, "the tiny UNet has up-block skip concatenations"
    quantize_pipeline(ddim_pipe, _config(), **FAST)
    for name, split in splits.items():
        conv = unet.get_submodule(name)
        assert conv.split == split
        assert len(conv.act_quantizers) == 2 and len(conv.weight_quantizers) == 2
        # The split is where the upsampled features end and the skip features begin.
        block, resnet = int(name.split(".")[1]), int(name.split(".")[3])
        res_skip = conv.in_channels - split
        assert 0 < res_skip < conv.in_channels
        assert unet.up_blocks[block].resnets[resnet].in_channels == conv.in_channels


def test_shortcut_split_off(ddim_pipe):
    quantize_pipeline(ddim_pipe, _config(layers={"shortcut_split": False}), **FAST)
    assert all(m.split is None for m in ddim_pipe.unet.modules() if isinstance(m, QuantConv2d))


def _sqnr_after(pipe, config):
    x, t = _unet_inputs(pipe)
    with torch.no_grad():
        ref = pipe.unet(x, t).sample
    quantize_pipeline(pipe, config, **FAST)
    with torch.no_grad():
        out = pipe.unet(x, t).sample
    return sqnr_db(ref, out)


def test_w8a8_close_to_float_and_w4_worse(ddim_pipe):
    from diffusers_ptq.tiny import tiny_ddim_pipeline

    w8 = _sqnr_after(ddim_pipe, _config(weight_bits=8, act_bits=8))
    w4 = _sqnr_after(tiny_ddim_pipeline(), _config(weight_bits=4, act_bits=8))
    print(f"noise-prediction SQNR: W8A8 {w8:.1f} dB, W4A8 {w4:.1f} dB")
    assert w8 > 25.0
    assert w4 < w8 - 6.0


def test_quant_state_switch_restores_float_output(ddim_pipe):
    x, t = _unet_inputs(ddim_pipe)
    with torch.no_grad():
        ref = ddim_pipe.unet(x, t).sample
    quantize_pipeline(ddim_pipe, _config(), **FAST)
    set_quant_state(ddim_pipe.unet, weights=False, acts=False)
    with torch.no_grad():
        torch.testing.assert_close(ddim_pipe.unet(x, t).sample, ref)
    set_quant_state(ddim_pipe.unet, weights=True, acts=True)
    with torch.no_grad():
        assert not torch.allclose(ddim_pipe.unet(x, t).sample, ref)


def test_group_scales_follow_timestep_dependent_activations(ddim_pipe):
    quantize_pipeline(
        ddim_pipe,
        _config(activations={"timestep_groups": 4, "num_candidates": 20}),
        **{**FAST, "num_samples": 32},
    )
    quantizers = [m for m in ddim_pipe.unet.modules() if isinstance(m, TimestepActQuantizer)]
    assert all(q.num_groups == 4 for q in quantizers)
    ratios = [float(q.scale.max() / q.scale.min()) for q in quantizers]
    # The input x_t itself changes range with t, so at least conv_in's scales must differ across groups.
    assert max(ratios) > 1.2
    assert ddim_pipe.unet.ptq_state.report.samples_per_group == [8, 8, 8, 8]


def test_stable_diffusion_with_guidance(sd_pipe, prompts):
    gen = torch.Generator().manual_seed(0)
    ref = sd_pipe(prompts[:2], num_inference_steps=4, generator=gen, output_type="latent").images
    quantize_pipeline(
        sd_pipe,
        PTQConfig.preset(
            "q-diffusion", activations={"num_candidates": 20}, reconstruction={"enabled": False}
        ),
        prompts=prompts,
        **FAST,
    )
    report = sd_pipe.unet.ptq_state.report
    assert report.calibration_rows == 2 * report.calibration_samples  # both guidance halves are kept
    assert report.shortcut_splits > 0 and report.attention_blocks > 0
    gen = torch.Generator().manual_seed(0)
    out = sd_pipe(prompts[:2], num_inference_steps=4, generator=gen, output_type="latent").images
    assert torch.isfinite(out).all()
    assert sqnr_db(ref, out) > 15.0  # measured 19.7 dB


def test_sdxl_added_conditioning(sdxl_pipe, prompts):
    config = _config(activations={"timestep_groups": "per_step", "softmax_bits": 8, "num_candidates": 20})
    quantize_pipeline(sdxl_pipe, config, prompts=prompts, **{**FAST, "num_inference_steps": 4})
    softmax = [m.softmax_quantizer for m in sdxl_pipe.unet.modules() if isinstance(m, QuantAttnProcessor)]
    assert softmax and all(q is not None and q.unsigned and q.bits == 8 for q in softmax)
    assert all(float(q.zero_point.abs().max()) == 0.0 for q in softmax)
    out = sdxl_pipe(prompts[0], num_inference_steps=4, output_type="latent").images
    assert torch.isfinite(out).all()
    assert sdxl_pipe.unet.ptq_state.group_map.max() == 3  # one group per sampling step


def test_timestep_read_from_keyword_and_python_number(ddim_pipe):
    quantize_pipeline(ddim_pipe, _config(activations={"timestep_groups": 4, "num_candidates": 20}), **FAST)
    x, _ = _unet_inputs(ddim_pipe, batch=2)
    with torch.no_grad():
        positional = ddim_pipe.unet(x, torch.tensor(30)).sample
        keyword = ddim_pipe.unet(sample=x, timestep=torch.tensor([30, 30])).sample
        number = ddim_pipe.unet(x, 30).sample
    for out in (keyword, number):
        torch.testing.assert_close(out, positional)
    context = ddim_pipe.unet.ptq_state.context
    with torch.no_grad():
        ddim_pipe.unet(x, 29.6)  # sigma-based schedulers pass floats: nearest training timestep
    assert torch.equal(context.timesteps, torch.tensor([30, 30]))
    with torch.no_grad():
        ddim_pipe.unet(x, torch.tensor([1500.0, -3.0]))  # out of range: clamped
    assert torch.equal(context.timesteps, torch.tensor([999, 0]))


def test_groups_without_samples_borrow_and_warn(ddim_pipe):
    config = _config(
        activations={"timestep_groups": "per_step", "num_candidates": 20}, calibration={"step_interval": 2}
    )
    with pytest.warns(UserWarning, match=r"timestep group\(s\) \[1, 3, 5, 7\] had no calibration samples"):
        quantize_pipeline(ddim_pipe, config, **FAST)
    unet = ddim_pipe.unet
    assert unet.ptq_state.borrowed_groups == [1, 3, 5, 7]
    q = unet.conv_in.act_quantizers[0]
    assert q.num_groups == 8
    # Group 1 has no samples; its nearest observed neighbour is group 0.
    assert q.scale[1] == q.scale[0] and q.zero_point[1] == q.zero_point[0]
