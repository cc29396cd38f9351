"""Models and data shipped with the package so quality can be measured offline.

`fashion_ddpm_pipeline` loads a DDPM trained on Fashion-MNIST (32x32) by `benchmarks/train_fashion_ddpm.py`;
`FashionClassifier` is the small CNN whose penultimate features define the benchmark's Fréchet distance.
`colour_ddpm_pipeline` loads the second benchmark model (16x16 colour Fashion-MNIST, cosine schedule,
v-prediction; `benchmarks/train_colour_ddpm.py`), `ColourFashionClassifier` its feature classifier.
"""

from diffusers_ptq.zoo.classifier import FashionClassifier, load_fashion_classifier
from diffusers_ptq.zoo.colour_classifier import ColourFashionClassifier, load_colour_classifier
from diffusers_ptq.zoo.data import DATASET_DIR, DEBIAN_PACKAGE, load_colour_fashion, load_fashion_mnist
from diffusers_ptq.zoo.models import (
    COLOUR_DDPM_DIR,
    FASHION_DDPM_DIR,
    SD15_UNET_CONFIG_FILE,
    colour_ddpm_pipeline,
    colour_ddpm_unet,
    fashion_ddpm_pipeline,
    fashion_ddpm_unet,
    sd15_unet_config,
)

__all__ = [
    "COLOUR_DDPM_DIR",
    "ColourFashionClassifier",
    "DATASET_DIR",
    "DEBIAN_PACKAGE",
    "FASHION_DDPM_DIR",
    "FashionClassifier",
    "SD15_UNET_CONFIG_FILE",
    "colour_ddpm_pipeline",
    "colour_ddpm_unet",
    "fashion_ddpm_pipeline",
    "fashion_ddpm_unet",
    "load_colour_classifier",
    "load_colour_fashion",
    "load_fashion_classifier",
    "load_fashion_mnist",
    "sd15_unet_config",
]
