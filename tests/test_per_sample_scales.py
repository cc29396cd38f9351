"""A batch that mixes timesteps: each sample is quantized with its own timestep group's scales.

Tested on the mechanism, not by comparing a batched call with one-sample calls: oneDNN picks its
convolution kernel by batch size, ISA and thread count, so batch 4 and batch 1 differ in the last float
bits, and an activation that lands within an ulp of a rounding step flips to the neighbouring code; a
random tiny UNet then carries the flip everywhere. Measured on one AVX-512 machine, share of outputs of
batch 4 vs four batch-1 calls differing by more than 1e-5: 9.5 % with 2 threads, 36 % with 1; with oneDNN
limited to AVX2 0 % and 25 %, to SSE4.1 50 % and 25 %. A same-shape batch was bit-exact in every case.

Here (1) every activation quantizer's applied (scale, zero-point) is recorded per sample and compared
with the group map's entry for that sample's timestep, and (2) each sample's output is compared with the
same sample in a batch of the same shape whose other samples (latents and timesteps) are different: same
kernels, same float numerics, so the outputs must be bit-identical.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from diffusers_ptq import PTQConfig, TimestepActQuantizer, quantize_pipeline
from diffusers_ptq.quantizers import activation as activation_module
from diffusers_ptq.tiny import tiny_ddim_pipeline

TIMESTEPS = [900, 600, 300, 50]  # one per group of a 4-group contiguous map over 1,000 timesteps
GROUPS = 4


@pytest.fixture(scope="module")
def quantized_pipe() -> Any:
    ddim_pipe = tiny_ddim_pipeline()
    config = PTQConfig(
        weights={"num_candidates": 20}, activations={"num_candidates": 20, "timestep_groups": GROUPS}
    )
    quantize_pipeline(ddim_pipe, config, num_samples=32, num_inference_steps=8, batch_size=8, progress=False)
    return ddim_pipe


def _quantizers(unet: torch.nn.Module) -> dict[str, TimestepActQuantizer]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, TimestepActQuantizer)}


def _latents(unet: torch.nn.Module, seed: int) -> torch.Tensor:
    cfg = unet.config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(len(TIMESTEPS), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)


def _record_applied(monkeypatch: pytest.MonkeyPatch, unet: torch.nn.Module) -> list[tuple[str, Any, Any]]:
    """(quantizer name, per-row scale, per-row zero point) of every activation fake-quant call."""
    calls: list[tuple[str, Any, Any]] = []
    current: list[str] = []
    for name, q in _quantizers(unet).items():
        q.register_forward_pre_hook(lambda module, args, name=name: current.append(name))
    real = activation_module.fake_quantize

    def spy(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append((current[-1], scale.reshape(-1).clone(), zero_point.reshape(-1).clone()))
        return real(x, scale, zero_point, *args)

    monkeypatch.setattr(activation_module, "fake_quantize", spy)
    return calls


def test_each_quantizer_applies_each_samples_group(
    quantized_pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = copy.deepcopy(quantized_pipe.unet)  # the spy's hooks stay on the copy
    quantizers = _quantizers(unet)
    calls = _record_applied(monkeypatch, unet)
    t = torch.tensor(TIMESTEPS)
    with torch.no_grad():
        unet(_latents(unet, 0), t)

    assert {name for name, _, _ in calls} == set(quantizers), "every activation quantizer runs once or more"
    assert {q.num_groups for q in quantizers.values()} == {GROUPS}
    groups_seen = set()
    for name, scale, zero_point in calls:
        q = quantizers[name]
        # Rows are samples, or samples x heads for attention (sample-major, as the quantizer expects).
        per_sample = len(scale) // len(TIMESTEPS)
        assert per_sample * len(TIMESTEPS) == len(scale), name
        expected_groups = q.group_map[t].repeat_interleave(per_sample)
        groups_seen.update(expected_groups.tolist())
        assert torch.equal(scale, q.scale[expected_groups]), name
        assert torch.equal(zero_point, q.zero_point[expected_groups]), name
    assert groups_seen == set(range(GROUPS)), "the timesteps span every group"
    # The test has teeth only if the groups' scales differ.
    assert any(len(set(q.scale.tolist())) == GROUPS for q in quantizers.values())


def test_each_sample_is_independent_of_the_others_at_equal_numerics(quantized_pipe: Any) -> None:
    unet = quantized_pipe.unet
    x, t = _latents(unet, 0), torch.tensor(TIMESTEPS)
    with torch.no_grad():
        together = unet(x, t).sample
        for i in range(len(TIMESTEPS)):
            # Same batch shape (same kernels); every other sample gets other latents and another timestep.
            others = _latents(unet, 1 + i)
            others[i] = x[i]
            t_others = torch.roll(t, 1)
            t_others[i] = t[i]
            alone = unet(others, t_others).sample
            assert torch.equal(alone[i], together[i]), f"sample {i} (t={TIMESTEPS[i]}) depends on the others"
