"""The fake-quant UNet runs under torch.compile with no recompile when the timestep changes."""

from __future__ import annotations

import pytest
import torch

from diffusers_ptq import PTQConfig, quantize_pipeline


def _quantized_unet(ddim_pipe):
    config = PTQConfig(
        weights={"num_candidates": 10}, activations={"num_candidates": 10, "timestep_groups": 4}
    )
    quantize_pipeline(ddim_pipe, config, num_samples=16, num_inference_steps=8, progress=False)
    return ddim_pipe.unet


def _run_compiled(unet, backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend=backend)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    outputs, graphs = {}, []
    with torch.no_grad():
        for t in (900, 600, 250, 20, 3):  # spans all four timestep groups
            outputs[t] = compiled(x, torch.tensor(t)).sample
            graphs.append(counters["stats"]["unique_graphs"])
        expected = {t: unet(x, torch.tensor(t)).sample for t in outputs}
    torch._dynamo.reset()
    return outputs, expected, graphs


def test_no_recompile_across_timesteps(ddim_pipe):
    unet = _quantized_unet(ddim_pipe)
    outputs, expected, graphs = _run_compiled(unet, "eager")
    assert graphs[0] > 0
    assert graphs == [graphs[0]] * len(graphs), f"graphs compiled per call: {graphs}"
    for t in outputs:
        torch.testing.assert_close(outputs[t], expected[t])


@pytest.mark.slow
def test_inductor_matches_eager(ddim_pipe):
    unet = _quantized_unet(ddim_pipe)
    outputs, expected, graphs = _run_compiled(unet, "inductor")
    assert graphs == [graphs[0]] * len(graphs)
    for t in outputs:
        # Fused kernels may flip a rounding tie; the bulk must agree.
        close = torch.isclose(outputs[t], expected[t], rtol=1e-3, atol=1e-4)
        assert close.float().mean() > 0.99
