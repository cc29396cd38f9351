"""A quantized UNet under accelerate's offload hooks, `device_map` loading and regional compilation.

The claims: with accelerate's sequential offload (weights on the meta device, streamed in per module) and
its model offload hook, both with the CPU as execution device, the fake-quant UNet gives the same output
as without, and so does a whole pipeline call; a saved checkpoint loads with `device_map="cpu"` and with a
dict and reproduces the model bit for bit; `compile_repeated_blocks(fullgraph=True)` compiles the
fake-quant and the int8 UNet's transformer blocks without a graph break and without recompiling when the
timestep changes. What needs a GPU (moving to CUDA, `enable_model_cpu_offload`, `device_map="auto"` over
GPUs) is marked `gpu`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, cpu_offload_with_hook
from diffusers import UNet2DConditionModel

from diffusers_ptq import convert, quantize_pipeline
from diffusers_ptq.offload import is_sequentially_offloaded
from diffusers_ptq.quantizers import TimestepActQuantizer
from diffusers_ptq.tiny import tiny_sd_pipeline
from recipe_helpers import plain

PROMPTS = ["a cat", "a red car"]
TIMESTEPS = (900, 300, 10)  # both timestep groups


@pytest.fixture(scope="module")
def quantized_sd():
    pipe = tiny_sd_pipeline()
    config = plain(
        weight_bits=8,
        act_bits=8,
        weights={"num_candidates": 10},
        activations={"num_candidates": 10, "timestep_groups": 2},
        calibration={"num_samples": 8, "num_inference_steps": 4},
    )
    quantize_pipeline(pipe, config, prompts=PROMPTS, progress=False)
    return pipe


def _inputs(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    return x, torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)


@torch.no_grad()
def _outputs(unet) -> dict[int, torch.Tensor]:
    x, ehs = _inputs(unet)
    return {t: unet(x, torch.tensor(t), encoder_hidden_states=ehs).sample for t in TIMESTEPS}


def _assert_same(a: dict, b: dict) -> None:
    for t in TIMESTEPS:
        assert torch.equal(a[t], b[t]), f"timestep {t}"


def test_sequential_offload_streams_weights_and_keeps_the_output(quantized_sd):
    unet = copy.deepcopy(quantized_sd.unet)
    expected = _outputs(unet)
    cpu_offload(unet, execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in unet.parameters()), "weights live in the hook's map"
    _assert_same(_outputs(unet), expected)
    # the scale tables are buffers: they stay with the module and are used as calibrated
    acts = [m for m in unet.modules() if isinstance(m, TimestepActQuantizer)]
    assert acts and all(m.scale.device.type == "cpu" for m in acts)


def test_model_offload_hook_keeps_the_output(quantized_sd):
    unet = copy.deepcopy(quantized_sd.unet)
    expected = _outputs(unet)
    unet, hook = cpu_offload_with_hook(unet, execution_device=torch.device("cpu"))
    _assert_same(_outputs(unet), expected)
    hook.offload()
    _assert_same(_outputs(unet), expected)


def test_a_pipeline_call_with_an_offloaded_quantized_unet(quantized_sd):
    pipe = copy.copy(quantized_sd)
    kwargs = {"num_inference_steps": 3, "output_type": "np"}
    expected = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.unet = copy.deepcopy(quantized_sd.unet)
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    got = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (got == expected).all()


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}], ids=["cpu", "dict"])
def test_device_map_loading_is_bit_exact(quantized_sd, tmp_path, device_map):
    quantized_sd.unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path, device_map=device_map)
    _assert_same(_outputs(loaded), _outputs(quantized_sd.unet))
    assert all(p.device.type == "cpu" for p in loaded.parameters())


@pytest.mark.parametrize("backend", ["fake", pytest.param("int8", marks=pytest.mark.slow)])  # int8: ~9 s
def test_repeated_blocks_compile_fullgraph_without_recompiles(quantized_sd, backend):
    from torch._dynamo.utils import counters

    unet = copy.deepcopy(quantized_sd.unet)
    if backend == "int8":
        convert(unet)
    expected = _outputs(unet)
    torch._dynamo.reset()
    counters.clear()
    try:
        unet.compile_repeated_blocks(fullgraph=True, backend="eager")  # fullgraph: a break is an error
        x, ehs = _inputs(unet)
        graphs = []
        with torch.no_grad():
            for t in TIMESTEPS:
                out = unet(x, torch.tensor(t), encoder_hidden_states=ehs).sample
                torch.testing.assert_close(out, expected[t], rtol=0, atol=1e-6)
                graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[0] > 0, "the transformer blocks were compiled"
        assert graphs == [graphs[0]] * len(TIMESTEPS), f"recompiled across timesteps: {graphs}"
        assert not counters["recompiles"] and not counters["graph_break"]
    finally:
        torch._dynamo.reset()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_to_cuda_carries_every_table_and_model_offload_runs(quantized_sd):
    pipe = copy.deepcopy(quantized_sd)
    expected = _outputs(pipe.unet)
    pipe.unet.to("cuda")
    tensors = [*pipe.unet.parameters(), *pipe.unet.buffers()]
    assert all(t.device.type == "cuda" for t in tensors)
    x, ehs = _inputs(pipe.unet)
    with torch.no_grad():
        out = pipe.unet(x.cuda(), torch.tensor(300, device="cuda"), encoder_hidden_states=ehs.cuda()).sample
    torch.testing.assert_close(out.cpu(), expected[300], rtol=1e-3, atol=1e-3)
    pipe.unet.to("cpu")
    pipe.enable_model_cpu_offload()
    images = pipe(PROMPTS, num_inference_steps=3, output_type="np").images
    assert images.shape[0] == 2


# -- calibrating an offloaded pipeline --------------------------------------------------------------------


def _plain_w8a8():
    return plain(
        weight_bits=8,
        act_bits=8,
        weights={"num_candidates": 10},
        activations={"num_candidates": 10, "timestep_groups": 2},
        calibration={"num_samples": 8, "num_inference_steps": 4},
    )


def test_a_sequentially_offloaded_pipeline_quantizes_like_a_plain_one():
    reference = tiny_sd_pipeline()
    quantize_pipeline(reference, _plain_w8a8(), prompts=PROMPTS, progress=False)
    pipe = tiny_sd_pipeline()
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    assert is_sequentially_offloaded(pipe.unet)
    quantize_pipeline(pipe, _plain_w8a8(), prompts=PROMPTS, progress=False)
    # offloaded again, with the quantized weights in its map
    assert is_sequentially_offloaded(pipe.unet)
    assert all(p.device.type == "meta" for p in pipe.unet.parameters())
    _assert_same(_outputs(pipe.unet), _outputs(reference.unet))


def test_a_failure_while_offloaded_restores_float_and_offloads_again(monkeypatch):
    from diffusers_ptq import job as job_module

    pipe = tiny_sd_pipeline()
    expected = _outputs(pipe.unet)
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(job_module.QuantizationJob, "finish", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        quantize_pipeline(pipe, _plain_w8a8(), prompts=PROMPTS, progress=False)
    assert is_sequentially_offloaded(pipe.unet)
    _assert_same(_outputs(pipe.unet), expected)
