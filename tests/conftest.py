"""Shared fixtures: tiny offline pipelines, a flush-denormal guard for CPU speed, Triton's interpreter."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU, the Triton conv kernel's tests run in Triton's CPU interpreter. Triton reads the switch
    # as it decorates its own functions, and importing diffusers already imports triton: set it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

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
