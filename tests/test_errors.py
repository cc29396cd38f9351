"""Bad input fails early and clearly; a failure half-way leaves the pipeline untouched."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMPipeline
from diffusers.models.attention_processor import Attention

from diffusers_ptq import PTQConfig, quantize_pipeline, quantize_unet
from diffusers_ptq.calibration import CalibrationSet

FAST = {"num_samples": 8, "num_inference_steps": 4, "batch_size": 8, "progress": False}


def _snapshot(unet):
    return (
        [(n, type(m), id(m)) for n, m in unet.named_modules()],
        {n: type(m.processor) for n, m in unet.named_modules() if isinstance(m, Attention)},
        {k: v.clone() for k, v in unet.state_dict().items()},
        len(unet._forward_pre_hooks),
        len(unet._forward_pre_hooks_with_kwargs),
    )


def _assert_untouched(unet, snap):
    modules, processors, state, hooks, kwarg_hooks = _snapshot(unet)
    assert modules == snap[0]
    assert processors == snap[1]
    assert state.keys() == snap[2].keys()
    for k in state:
        torch.testing.assert_close(state[k], snap[2][k], rtol=0, atol=0, equal_nan=True)
    assert hooks == snap[3] and kwarg_hooks == snap[4]
    assert not hasattr(unet, "ptq_state")


def test_unsupported_pipeline_type():
    with pytest.raises(
        TypeError, match="object has no unet; supported denoisers: UNet2DModel, UNet2DConditionModel"
    ):
        quantize_pipeline(object(), PTQConfig())


def test_unsupported_denoiser(ddim_pipe):
    pipe = DDIMPipeline(unet=torch.nn.Linear(2, 2), scheduler=ddim_pipe.scheduler)
    with pytest.raises(TypeError, match="supported denoisers: UNet2DModel, UNet2DConditionModel"):
        quantize_pipeline(pipe, PTQConfig())


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"weight_bits": 1}, "weights.bits"), ({"act_bits": 17}, "activations.bits")]
)
def test_bits_out_of_range(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        PTQConfig(**kwargs)


def test_config_must_be_a_ptqconfig(ddim_pipe):
    with pytest.raises(TypeError, match="PTQConfig"):
        quantize_pipeline(ddim_pipe, {"weights": {"bits": 8}})


def test_text_pipeline_without_prompts(sd_pipe):
    snap = _snapshot(sd_pipe.unet)
    with pytest.raises(ValueError, match="text-conditioned: pass calibration prompts"):
        quantize_pipeline(sd_pipe, PTQConfig(), **FAST)
    with pytest.raises(ValueError, match="text-conditioned"):
        quantize_pipeline(sd_pipe, PTQConfig(), prompts=[], **FAST)
    _assert_untouched(sd_pipe.unet, snap)


def test_too_many_timestep_groups(ddim_pipe):
    with pytest.raises(ValueError, match=r"timestep_groups=1001 is invalid.*\[1, 1000\]"):
        PTQConfig(activations={"timestep_groups": 1001})
    ddim_pipe.scheduler.register_to_config(num_train_timesteps=100)
    with pytest.raises(ValueError, match="exceeds the scheduler's 100 training timesteps"):
        quantize_pipeline(ddim_pipe, PTQConfig(activations={"timestep_groups": 200}), **FAST)


def test_already_quantized(ddim_pipe):
    quantize_pipeline(
        ddim_pipe, PTQConfig(weights={"num_candidates": 5}, activations={"num_candidates": 5}), **FAST
    )
    with pytest.raises(ValueError, match="already quantized"):
        quantize_pipeline(ddim_pipe, PTQConfig(), **FAST)


def test_nonfinite_pipeline_output_is_named(ddim_pipe):
    with torch.no_grad():
        ddim_pipe.unet.conv_out.bias.fill_(float("nan"))
    snap = _snapshot(ddim_pipe.unet)
    with pytest.raises(FloatingPointError, match=r"non-finite.*'sample' at timestep\(s\)"):
        quantize_pipeline(ddim_pipe, PTQConfig(), **FAST)
    _assert_untouched(ddim_pipe.unet, snap)


def test_nonfinite_activation_names_layer_and_timestep(ddim_pipe):
    unet = ddim_pipe.unet
    data = CalibrationSet(
        inputs={"sample": torch.randn(2, 3, 16, 16)},
        timesteps=torch.tensor([700, 20]),
        train_timesteps=torch.tensor([700, 20]),
        step_index=torch.tensor([0, 1]),
        trajectory=torch.tensor([0, 0]),
        step_timesteps=torch.tensor([700, 20]),
        num_train_timesteps=1000,
    )
    with torch.no_grad():
        unet.down_blocks[0].resnets[0].conv1.weight[0, 0, 0, 0] = float("inf")
    snap = _snapshot(unet)
    with pytest.raises(
        FloatingPointError, match=r"down_blocks\.0\.resnets\.0\.\w+\.input.*timestep\(s\) \[20, 700\]"
    ):
        quantize_unet(unet, PTQConfig(), data, progress=False)
    _assert_untouched(unet, snap)


def test_failure_half_way_restores_the_unet(ddim_pipe, monkeypatch):
    import diffusers_ptq.job as job

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(job, "initialise_activations", boom)
    snap = _snapshot(ddim_pipe.unet)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    with torch.no_grad():
        before = ddim_pipe.unet(x, t).sample
    with pytest.raises(RuntimeError, match="interrupted"):
        quantize_pipeline(ddim_pipe, PTQConfig(weights={"num_candidates": 5}), **FAST)
    _assert_untouched(ddim_pipe.unet, snap)
    with torch.no_grad():
        torch.testing.assert_close(ddim_pipe.unet(x, t).sample, before)
