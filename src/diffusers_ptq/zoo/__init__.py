"""Models and data shipped with the package so quality can be measured offline.

`fashion_ddpm_pipeline` loads a DDPM trained on Fashion-MNIST (32x32) by `benchmarks/train_fashion_ddpm.py`;
`FashionClassifier` is the small CNN whose penultimate features define the benchmark's Fréchet distance.
"""

from diffusers_ptq.zoo.classifier import FashionClassifier, load_fashion_classifier
from diffusers_ptq.zoo.data import DATASET_DIR, DEBIAN_PACKAGE, load_fashion_mnist
from diffusers_ptq.zoo.models import (
    FASHION_DDPM_DIR,
    SD15_UNET_CONFIG_FILE,
    fashion_ddpm_pipeline,
    fashion_ddpm_unet,
    sd15_unet_config,
)

__all__ = [
    "DATASET_DIR",
    "DEBIAN_PACKAGE",
    "FASHION_DDPM_DIR",
    "FashionClassifier",
    "SD15_UNET_CONFIG_FILE",
    "fashion_ddpm_pipeline",
    "fashion_ddpm_unet",
    "load_fashion_classifier",
    "load_fashion_mnist",
    "sd15_unet_config",
]
