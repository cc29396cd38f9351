"""The shipped Fashion-MNIST DDPM and classifier, and the IDX reader (diffusers_ptq.zoo)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, UNet2DModel
from diffusers.models.attention_processor import Attention

from diffusers_ptq.benchmark.metrics.fashion import FashionFidelity, matches_fashion_model
from diffusers_ptq.benchmark.metrics.fidelity import frechet_distance
from diffusers_ptq.zoo import (
    FASHION_DDPM_DIR,
    fashion_ddpm_pipeline,
    load_fashion_classifier,
    load_fashion_mnist,
)
from diffusers_ptq.zoo.classifier import CLASSIFIER_FILE
from diffusers_ptq.zoo.data import read_idx
from diffusers_ptq.zoo.models import FASHION_UNET_CONFIG


def _write_idx(path: Path, array: np.ndarray, magic_type: int = 0x08) -> None:
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


def test_load_fashion_mnist_reads_idx_files(fake_dataset: Path) -> None:
    images, labels = load_fashion_mnist("train", root=fake_dataset)
    assert images.shape == (12, 1, 32, 32) and labels.shape == (12,) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    raw, _ = load_fashion_mnist("test", size=28, root=fake_dataset)
    expected = torch.from_numpy(read_idx(fake_dataset / "t10k-images-idx3-ubyte.gz").astype(np.float32))
    assert torch.allclose(raw[:, 0], expected / 127.5 - 1)


def test_missing_dataset_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="choose one of"):
        load_fashion_mnist("validation", root=tmp_path)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as handle:
        handle.write(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as handle:
        handle.write(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="holds 3 values"):
        read_idx(short)


def test_shipped_ddpm_loads_offline_as_ddim_and_ddpm() -> None:
    weights = FASHION_DDPM_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    ddim = fashion_ddpm_pipeline()
    ddpm = fashion_ddpm_pipeline("ddpm")
    assert isinstance(ddim, DDIMPipeline) and isinstance(ddpm, DDPMPipeline)
    unet = ddim.unet
    assert isinstance(unet, UNet2DModel)
    assert 2e6 <= sum(p.numel() for p in unet.parameters()) <= 8e6
    assert any(isinstance(m, Attention) for m in unet.modules())
    assert tuple(unet.config.block_out_channels) == FASHION_UNET_CONFIG["block_out_channels"]
    scheduler = ddpm.scheduler.config
    assert (scheduler.num_train_timesteps, scheduler.prediction_type) == (1000, "epsilon")
    assert matches_fashion_model(ddim)
    with pytest.raises(ValueError, match="choose one of"):
        fashion_ddpm_pipeline("euler")


def test_shipped_ddpm_denoises() -> None:
    # A trained epsilon-predictor recovers the noise it is given far better than chance (MSE 1).
    ddpm = fashion_ddpm_pipeline("ddpm")
    unet = ddpm.unet
    g = torch.Generator().manual_seed(0)
    x0 = torch.where(torch.rand(8, 1, 32, 32, generator=g) > 0.5, 0.8, -1.0)  # crude garment-like masks
    noise = torch.randn(8, 1, 32, 32, generator=g)
    alpha = ddpm.scheduler.alphas_cumprod[500]
    with torch.no_grad():
        pred = unet(alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise, 500).sample
    assert torch.mean((pred - noise) ** 2) < 0.5


def test_shipped_classifier_and_statistics_discriminate() -> None:
    assert CLASSIFIER_FILE.is_file()
    fidelity = FashionFidelity(load_fashion_classifier())
    assert frechet_distance(fidelity.stats["train"], fidelity.stats["test"]) < 5.0
    noise = fidelity.compute(
        torch.randn(256, 1, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    )
    assert noise["FD"] > 100.0 and noise["IS"] >= 1.0
    with pytest.raises(ValueError, match="takes images of shape"):
        fidelity.compute(torch.zeros(4, 3, 32, 32))


def test_missing_classifier_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train_fashion_classifier\.py"):
        load_fashion_classifier(tmp_path / "nope.safetensors")
