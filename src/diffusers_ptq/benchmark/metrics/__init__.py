"""Image-quality metrics of the benchmarks.

`fidelity.py` (Fréchet distance and Inception-style score as pure tensor functions), `fashion.py` (FD/IS in
the shipped Fashion-MNIST classifier's features), `colour_fashion.py` (the same for the colour model),
`inception.py` (Inception FID/sFID/IS) and `clip_score.py` (CLIP score); the last two only when their
weights are already on disk.
"""

from diffusers_ptq.benchmark.metrics.clip_score import ClipScore, clip_fidelity
from diffusers_ptq.benchmark.metrics.colour_fashion import ColourFashionFidelity
from diffusers_ptq.benchmark.metrics.fashion import FashionFidelity
from diffusers_ptq.benchmark.metrics.fidelity import FeatureStats, frechet_distance, inception_score
from diffusers_ptq.benchmark.metrics.inception import InceptionFidelity

__all__ = [
    "ClipScore",
    "ColourFashionFidelity",
    "FashionFidelity",
    "FeatureStats",
    "InceptionFidelity",
    "clip_fidelity",
    "frechet_distance",
    "inception_score",
]
