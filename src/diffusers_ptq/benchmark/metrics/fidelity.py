"""Fréchet distance and Inception-style score in the features of a classifier (pure tensor functions)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance (float64) of N feature vectors: one side of a Fréchet distance."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStats:
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need a (N >= 2, D) feature matrix, got shape {tuple(features.shape)}")
        x = features.double()
        return cls(x.mean(0), torch.cov(x.T), len(x))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||² + Tr(C_a + C_b - 2 (C_a C_b)^½), with the trace of the root taken exactly.

    Tr((C_a C_b)^½) equals the sum of square roots of the eigenvalues of the symmetric PSD matrix
    C_a^½ C_b C_a^½, which avoids the complex round-off of a general matrix square root.
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)}")
    evals, evecs = torch.linalg.eigh(a.cov)
    root_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = root_a @ b.cov @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = a.mean - b.mean
    return float(diff @ diff + a.cov.trace() + b.cov.trace() - 2 * trace_root)


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, C, H, W) -> uint8 RGB in [0, 255], as Inception and CLIP preprocessors expect."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def inception_score(logits: torch.Tensor, splits: int = 1) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over `splits` equal chunks (1 = the whole set)."""
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need (N >= splits, classes) logits, got shape {tuple(logits.shape)}")
    scores = []
    for chunk in logits.double().chunk(splits):
        log_p = chunk.log_softmax(-1)
        p = log_p.exp()
        log_marginal = p.mean(0).log()
        # 0 * log(0 / 0) terms are 0 (a class no image predicts), not NaN.
        kl = torch.where(p > 0, p * (log_p - log_marginal), torch.zeros_like(p)).sum(-1)
        scores.append(kl.mean().exp())
    return float(torch.stack(scores).mean())


@torch.no_grad()
def classifier_outputs(
    model: nn.Module, images: torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of images in [-1, 1] for a model with `embed` and `head` (see FashionClassifier)."""
    features = torch.cat([model.embed(chunk) for chunk in images.split(batch_size)])
    return features, model.head(features)


def save_stats(path: str | Path, stats: dict[str, FeatureStats]) -> None:
    tensors = {}
    for name, s in stats.items():
        tensors.update({f"{name}.mean": s.mean, f"{name}.cov": s.cov, f"{name}.count": torch.tensor(s.count)})
    save_file(tensors, str(path))


def load_stats(path: str | Path) -> dict[str, FeatureStats]:
    tensors = load_file(str(path))
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {
        n: FeatureStats(tensors[f"{n}.mean"], tensors[f"{n}.cov"], int(tensors[f"{n}.count"])) for n in names
    }
