"""Shared fixtures: tiny offline pipelines and a flush-denormal guard for CPU speed."""

from __future__ import annotations

import pytest
import torch

from diffusers_ptq.tiny import tiny_ddim_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a photo of a cat", "a red car", "a watercolor of a tree", "a city at night"]


@pytest.fixture(autouse=True, scope="session")
def _flush_denormal():
    # Denormals stall CPU math several-fold; tests set it, the library never does.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def ddim_pipe():
    return tiny_ddim_pipeline()


@pytest.fixture
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.fixture
def sdxl_pipe():
    return tiny_sdxl_pipeline()


@pytest.fixture
def prompts():
    return list(PROMPTS)
