"""FD and IS of the second benchmark model, in the colour Fashion-MNIST classifier's features."""

from __future__ import annotations

import torch

from diffusers_ptq.benchmark.metrics.fashion import FashionFidelity, generates_shape
from diffusers_ptq.zoo.colour_classifier import ColourFashionClassifier, load_colour_classifier
from diffusers_ptq.zoo.models import ASSETS_DIR

COLOUR_STATS_FILE = ASSETS_DIR / "colour_fd_stats.safetensors"
COLOUR_IMAGE_SHAPE = (3, 16, 16)


class ColourFashionFidelity(FashionFidelity):
    """FD against the 10k colour Fashion-MNIST test images (features that see class and colours), and the
    classifier's Inception-style score over the 10 garment classes."""

    name = "colour fashion-mnist classifier (FD: 128-d features vs 10k test images)"
    image_shape = COLOUR_IMAGE_SHAPE
    stats_file = COLOUR_STATS_FILE

    def _load_classifier(self) -> ColourFashionClassifier:
        return load_colour_classifier()

    def _train_images(self) -> torch.Tensor:
        from diffusers_ptq.zoo.data import load_colour_fashion

        return load_colour_fashion("train")[0]


def matches_colour_model(pipe: object) -> bool:
    """True when the pipeline generates the colour classifier's images (3x16x16), as `colour_ddpm` does."""
    return generates_shape(pipe, COLOUR_IMAGE_SHAPE)
