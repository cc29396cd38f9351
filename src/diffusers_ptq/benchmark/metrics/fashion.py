"""FD and IS in the shipped Fashion-MNIST classifier's features, against shipped real-data statistics."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusers_ptq.benchmark.metrics.fidelity import (
    FeatureStats,
    classifier_outputs,
    frechet_distance,
    inception_score,
    load_stats,
)
from diffusers_ptq.zoo.classifier import FashionClassifier, load_fashion_classifier
from diffusers_ptq.zoo.models import ASSETS_DIR

STATS_FILE = ASSETS_DIR / "fashion_fd_stats.safetensors"
IMAGE_SHAPE = (1, 32, 32)


class FashionFidelity:
    """FD against the 10k Fashion-MNIST test images, and the classifier's Inception-style score."""

    name = "fashion-mnist classifier (FD: 128-d features vs 10k test images)"
    image_shape = IMAGE_SHAPE
    stats_file = STATS_FILE

    def __init__(self, classifier: torch.nn.Module | None = None, stats_file: str | Path | None = None):
        self.classifier = classifier if classifier is not None else self._load_classifier()
        path = Path(stats_file) if stats_file is not None else self.stats_file
        if not path.is_file():
            raise FileNotFoundError(f"feature statistics not found at {path}")
        self.stats = load_stats(path)

    def _load_classifier(self) -> FashionClassifier:
        return load_fashion_classifier()

    def _train_images(self) -> torch.Tensor:
        """The real training images (FileNotFoundError when the dataset is not installed)."""
        from diffusers_ptq.zoo.data import load_fashion_mnist

        return load_fashion_mnist("train")[0]

    def _check(self, images: torch.Tensor) -> None:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"the {type(self).__name__} classifier takes images of shape {self.image_shape}, "
                f"got {tuple(images.shape[1:])}"
            )

    def compute(self, images: torch.Tensor) -> dict[str, float]:
        self._check(images)
        features, logits = classifier_outputs(self.classifier, images.float())
        return {
            "FD": frechet_distance(FeatureStats.of(features), self.stats["test"]),
            "IS": inception_score(logits),
        }

    def reference_rows(self, num_images: int, seed: int = 0) -> dict[str, dict[str, float]]:
        """What the metric says of known inputs, to show it discriminates (real ≈ 0 ≪ model ≪ noise)."""
        generator = torch.Generator().manual_seed(seed)
        out = {
            "real train (all 60k) vs test": {"FD": frechet_distance(self.stats["train"], self.stats["test"])},
            f"Gaussian noise ({num_images})": self.compute(
                torch.randn((num_images, *self.image_shape), generator=generator).clamp(-1, 1)
            ),
        }
        try:
            train = self._train_images()
        except FileNotFoundError:
            return out
        idx = torch.randperm(len(train), generator=generator)[:num_images]
        out[f"real train ({num_images})"] = self.compute(train[idx])
        return out


def generates_shape(pipe: object, shape: tuple[int, int, int]) -> bool:
    """True when the pipeline's UNet generates images of `shape` (C, H, W)."""
    config = getattr(getattr(pipe, "unet", None), "config", None)
    if config is None:
        return False
    size = config.sample_size
    size = size if isinstance(size, int) else size[0]
    return (config.out_channels, size) == (shape[0], shape[1])


def matches_fashion_model(pipe: object) -> bool:
    """True when the pipeline generates the classifier's images (1x32x32), as the shipped DDPM does."""
    return generates_shape(pipe, IMAGE_SHAPE)
