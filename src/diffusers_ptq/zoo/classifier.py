"""The Fashion-MNIST classifier whose penultimate features define the benchmark's Fréchet distance (FD).

Inception weights cannot be downloaded offline, so FD/IS here are computed in the 128-d features and the
10-way softmax of this small CNN, trained by `benchmarks/train_fashion_classifier.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from diffusers_ptq.zoo.models import ASSETS_DIR

CLASSIFIER_FILE = ASSETS_DIR / "fashion_classifier.safetensors"
NUM_CLASSES = 10
FEATURE_DIM = 128


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionClassifier(nn.Module):
    """Three stages of two 3x3 convs on 32x32 images in [-1, 1] -> 128-d features -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_stage(1, 16), _stage(16, 32), _stage(32, 64), nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, FEATURE_DIM), nn.ReLU(inplace=True))
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128) of images (N, 1, 32, 32) in [-1, 1]."""
        return self.features(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def load_fashion_classifier(path: str | Path | None = None) -> FashionClassifier:
    """The trained classifier in eval mode, from the package's safetensors file (or `path`)."""
    path = Path(path) if path is not None else CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights not found at {path}; re-create them with "
            "`python benchmarks/train_fashion_classifier.py`"
        )
    model = FashionClassifier()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)
