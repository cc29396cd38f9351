"""The second shipped benchmark model: colour Fashion-MNIST data, the v-prediction DDPM and its classifier."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel
from diffusers.models.attention_processor import Attention

from diffusers_ptq import cli
from diffusers_ptq.benchmark.metrics.colour_fashion import ColourFashionFidelity, matches_colour_model
from diffusers_ptq.benchmark.metrics.fashion import matches_fashion_model
from diffusers_ptq.benchmark.metrics.fidelity import FeatureStats, classifier_outputs, frechet_distance
from diffusers_ptq.benchmark.quality.sampling import ddim_pipeline
from diffusers_ptq.cli import bench as bench_cli
from diffusers_ptq.cli.bench_text import model_text_conditioned
from diffusers_ptq.cli.common import COLOUR_MODEL, load_pipeline
from diffusers_ptq.zoo import (
    COLOUR_DDPM_DIR,
    colour_ddpm_pipeline,
    load_colour_classifier,
    load_colour_fashion,
    load_fashion_mnist,
)
from diffusers_ptq.zoo.colour_classifier import COLOUR_CLASSIFIER_FILE
from diffusers_ptq.zoo.data import DATASET_DIR, item_colours
from diffusers_ptq.zoo.models import COLOUR_UNET_CONFIG

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"
TRAINING_LOG = RESULTS / "train_colour_ddpm.json"
CLASSIFIER_LOG = RESULTS / "train_colour_classifier.json"
needs_dataset = pytest.mark.skipif(
    not (DATASET_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture
def fake_dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            array = rng.integers(0, 256 if kind.startswith("images") else 10, shape).astype(np.uint8)
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            with gzip.open(tmp_path / f"{prefix}-{kind}-ubyte.gz", "wb") as handle:
                handle.write(header + array.tobytes())
    return tmp_path


def test_colour_fashion_paints_each_item_with_its_own_colours(fake_dataset: Path) -> None:
    images, labels, colours = load_colour_fashion("train", size=28, root=fake_dataset)
    assert images.shape == (12, 3, 28, 28) and labels.shape == (12,) and colours.shape == (12, 6)
    gray, gray_labels = load_fashion_mnist("train", size=28, root=fake_dataset)
    assert torch.equal(labels, gray_labels)
    fg, bg = colours[:, :3, None, None], colours[:, 3:, None, None]
    expected = (bg + (fg - bg) * (gray + 1) / 2) * 2 - 1
    assert torch.allclose(images, expected, atol=1e-5)
    assert bool(((fg - bg).flatten(1).norm(dim=1) >= 0.5).all())
    small, _, same = load_colour_fashion("train", root=fake_dataset)
    assert small.shape == (12, 3, 16, 16) and torch.equal(same, colours)  # deterministic
    assert small.min() >= -1 and small.max() <= 1
    _, _, test_colours = load_colour_fashion("test", root=fake_dataset)
    assert not torch.allclose(test_colours, colours[:5])  # the splits are painted with other seeds
    with pytest.raises(ValueError, match="choose one of"):
        load_colour_fashion("validation", root=fake_dataset)


def test_item_colours_meet_the_contrast_floor_for_many_items() -> None:
    fg, bg = item_colours(20_000, seed=3)
    assert float((fg - bg).norm(dim=1).min()) >= 0.5
    assert float(fg.min()) >= 0.0 and float(fg.max()) <= 1.0


def test_shipped_colour_ddpm_differs_from_the_first_where_quantization_cares() -> None:
    files = [COLOUR_DDPM_DIR / "unet" / "diffusion_pytorch_model.safetensors", COLOUR_CLASSIFIER_FILE]
    files.append(ColourFashionFidelity.stats_file)
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    ddim, ddpm = colour_ddpm_pipeline(), colour_ddpm_pipeline("ddpm")
    assert isinstance(ddim, DDIMPipeline) and isinstance(ddpm, DDPMPipeline)
    unet = ddim.unet
    assert isinstance(unet, UNet2DModel) and 0.5e6 <= sum(p.numel() for p in unet.parameters()) <= 3e6
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (3, 3, 16)
    assert tuple(unet.config.block_out_channels) == COLOUR_UNET_CONFIG["block_out_channels"]
    # Attention only at the lowest resolution (the last down block, the first up block, the mid block).
    attention = [name for name, m in unet.named_modules() if isinstance(m, Attention)]
    assert attention and all(
        n.startswith(("down_blocks.2.", "up_blocks.0.", "mid_block.")) for n in attention
    )
    for scheduler in (ddim.scheduler, ddpm.scheduler):
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert isinstance(ddim.scheduler, DDIMScheduler)
    assert matches_colour_model(ddim) and not matches_fashion_model(ddim)
    with pytest.raises(ValueError, match="choose one of"):
        colour_ddpm_pipeline("euler")


def test_cli_loads_the_colour_model_and_its_metric() -> None:
    pipe = load_pipeline(COLOUR_MODEL, torch.device("cpu"), torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert model_text_conditioned(COLOUR_MODEL) is False
    _, metric, _ = bench_cli._fidelity(COLOUR_MODEL, pipe)
    assert isinstance(metric, ColourFashionFidelity)
    # The first model's metric never scores the colour model's images.
    assert bench_cli._fidelity("fashion", pipe)[1] is None


@needs_dataset
def test_shipped_colour_ddpm_predicts_v_as_well_as_it_trained() -> None:
    # The training objective (v-MSE) on real test images at uniform timesteps, against the mean loss of the
    # last 50 training steps (benchmarks/results/train_colour_ddpm.json). A broken model (wrong weights,
    # epsilon target, wrong betas) scores several times higher.
    final_loss = json.loads(TRAINING_LOG.read_text())["loss_per_50_steps"][-1]
    ddpm = colour_ddpm_pipeline("ddpm")
    images, _, _ = load_colour_fashion("test")
    g = torch.Generator().manual_seed(0)
    x0 = images[:512]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    alpha = ddpm.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    target = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    with torch.no_grad():
        pred = torch.cat([ddpm.unet(noisy[i : i + 128], t[i : i + 128]).sample for i in range(0, 512, 128)])
    mse = float(torch.mean((pred - target) ** 2))
    assert abs(mse - final_loss) < 0.15 * final_loss, (mse, final_loss)


@needs_dataset
def test_shipped_colour_classifier_scores_as_logged() -> None:
    log = json.loads(CLASSIFIER_LOG.read_text())
    images, labels, colours = load_colour_fashion("test")
    classifier = load_colour_classifier()
    features, logits = classifier_outputs(classifier, images)
    accuracy = float((logits.argmax(1) == labels).float().mean())
    mae = float((classifier.colour_head(features) - colours).abs().mean())
    assert accuracy == pytest.approx(log["test_accuracy"], abs=0.002), (accuracy, log)
    assert mae == pytest.approx(log["test_colour_mae"], abs=0.002), (mae, log)
    fidelity = ColourFashionFidelity(classifier)
    assert frechet_distance(FeatureStats.of(features), fidelity.stats["test"]) < 1e-6


def test_shipped_colour_statistics_discriminate() -> None:
    fidelity = ColourFashionFidelity(load_colour_classifier())
    logged = json.loads(CLASSIFIER_LOG.read_text())["fd_train_vs_test"]
    fd = frechet_distance(fidelity.stats["train"], fidelity.stats["test"])
    assert fd == pytest.approx(logged, abs=0.003)
    noise = fidelity.compute(
        torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    )
    assert noise["FD"] > 100 * max(fd, 0.1)
    with pytest.raises(ValueError, match="takes images of shape"):
        fidelity.compute(torch.zeros(4, 1, 32, 32))


def test_bench_runs_on_the_colour_model_with_its_fd(tmp_path: Path) -> None:
    out = tmp_path / "colour"
    argv = ["bench", "--model", COLOUR_MODEL, "--presets", "ptq4dm", "--bits", "W8A8", "--seeds", "0"]
    argv += ["--num-samples", "8", "--batch-size", "8", "--num-inference-steps", "3"]
    argv += ["--calibration-samples", "8", "--sqnr-samples", "2", "--no-progress", "--output", str(out)]
    assert cli.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["fidelity"] == ColourFashionFidelity.name
    assert [len(r["metrics"]["FD"]) for r in result["rows"]] == [1, 1]
    assert "real train (all 60k) vs test" in (out / "reference.md").read_text()


@needs_dataset
def test_bench_ddim_sampler_reads_the_output_as_v() -> None:
    # The bench's sampler (`ddim_pipeline`: DDIM from the model's own scheduler config) must convert the
    # UNet's v output: its x0 estimate from noised real test images is then close to the image at every step
    # of a 10-step schedule (measured: mean MSE 0.026); read as epsilon, the same outputs miss by 6x (0.167).
    pipe = ddim_pipeline(colour_ddpm_pipeline("ddpm"))
    x0 = load_colour_fashion("test")[0][:64]
    wrong = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    errors = []
    for scheduler in (pipe.scheduler, wrong):
        g = torch.Generator().manual_seed(0)
        scheduler.set_timesteps(10)
        total = 0.0
        for t in scheduler.timesteps:
            a = scheduler.alphas_cumprod[t]
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
            with torch.no_grad():
                out = pipe.unet(noisy, t).sample
            total += float((scheduler.step(out, t, noisy).pred_original_sample - x0).pow(2).mean())
        errors.append(total / len(scheduler.timesteps))
    assert errors[0] < 0.05 and errors[1] > 3 * errors[0], errors
