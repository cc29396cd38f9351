"""The colour Fashion-MNIST classifier whose penultimate features define the second model's Fréchet distance.

Besides the 10 garment classes it regresses the foreground and background colour each image was painted with,
so its 128-d features see colour and brightness shifts, not only shape. Trained by
`benchmarks/train_colour_classifier.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from diffusers_ptq.zoo.classifier import FEATURE_DIM, NUM_CLASSES, _stage
from diffusers_ptq.zoo.models import ASSETS_DIR

COLOUR_CLASSIFIER_FILE = ASSETS_DIR / "colour_classifier.safetensors"
COLOUR_OUTPUTS = 6  # foreground RGB, background RGB


class ColourFashionClassifier(nn.Module):
    """Three stages of two 3x3 convs on 16x16 RGB images in [-1, 1] -> 128-d features -> 10 logits
    (`head`) and 6 colours in [0, 1] (`colour_head`)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_stage(3, 16), _stage(16, 32), _stage(32, 64), nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, FEATURE_DIM), nn.ReLU(inplace=True))
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.colour_head = nn.Linear(FEATURE_DIM, COLOUR_OUTPUTS)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128) of images (N, 3, 16, 16) in [-1, 1]."""
        return self.features(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def colours(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted (N, 6) foreground and background RGB in [0, 1]."""
        return self.colour_head(self.embed(images))


def load_colour_classifier(path: str | Path | None = None) -> ColourFashionClassifier:
    """The trained classifier in eval mode, from the package's safetensors file (or `path`)."""
    path = Path(path) if path is not None else COLOUR_CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights not found at {path}; re-create them with "
            "`python benchmarks/train_colour_classifier.py`"
        )
    model = ColourFashionClassifier()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)
