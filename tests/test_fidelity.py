"""Fréchet distance and Inception-style score (diffusers_ptq.benchmark.fidelity)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffusers_ptq.benchmark.fidelity import (
    FeatureStats,
    frechet_distance,
    inception_score,
    load_stats,
    save_stats,
)


def _stats(mean: list[float], cov: torch.Tensor) -> FeatureStats:
    return FeatureStats(torch.tensor(mean, dtype=torch.float64), cov.double(), 100)


def test_frechet_distance_of_identical_statistics_is_zero() -> None:
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0))
    s = FeatureStats.of(x)
    assert abs(frechet_distance(s, s)) < 1e-9


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    # For commuting (diagonal) covariances: |mu_a - mu_b|² + sum (sigma_a - sigma_b)².
    a = _stats([0.0, 1.0, 2.0], torch.diag(torch.tensor([1.0, 4.0, 9.0])))
    b = _stats([1.0, 1.0, 0.0], torch.diag(torch.tensor([4.0, 1.0, 9.0])))
    expected = (1 + 0 + 4) + ((1 - 2) ** 2 + (2 - 1) ** 2 + 0)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_matches_scipy_for_general_covariances() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    a = FeatureStats.of(torch.randn(400, 5, generator=g) @ torch.randn(5, 5, generator=g))
    b = FeatureStats.of(torch.randn(400, 5, generator=g) @ torch.randn(5, 5, generator=g) + 0.5)
    root = linalg.sqrtm(a.cov.numpy() @ b.cov.numpy()).real
    diff = (a.mean - b.mean).numpy()
    expected = diff @ diff + float(a.cov.trace() + b.cov.trace()) - 2 * root.trace()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rejects_mismatched_features() -> None:
    a = FeatureStats.of(torch.randn(10, 3))
    b = FeatureStats.of(torch.randn(10, 4))
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(a, b)


@pytest.mark.parametrize("shape", [(5,), (1, 4)])
def test_feature_stats_need_a_matrix_of_at_least_two_rows(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="feature matrix"):
        FeatureStats.of(torch.zeros(shape))


def test_inception_score_extremes() -> None:
    assert inception_score(torch.zeros(50, 10)) == pytest.approx(1.0)  # every image: uniform prediction
    confident = torch.full((40, 10), -1e4)
    confident[torch.arange(40), torch.arange(40) % 10] = 0.0  # sure of one class each, classes balanced
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    one_class = torch.full((40, 10), -1e4)
    one_class[:, 3] = 0.0  # confident but never diverse
    assert inception_score(one_class) == pytest.approx(1.0)
    assert math.isfinite(inception_score(torch.randn(64, 10), splits=4))


def test_stats_round_trip_through_safetensors(tmp_path: Path) -> None:
    stats = {"test": FeatureStats.of(torch.randn(20, 3)), "train": FeatureStats.of(torch.randn(30, 3))}
    save_stats(tmp_path / "s.safetensors", stats)
    loaded = load_stats(tmp_path / "s.safetensors")
    assert set(loaded) == {"test", "train"}
    for name, s in stats.items():
        assert torch.equal(loaded[name].mean, s.mean) and torch.equal(loaded[name].cov, s.cov)
        assert loaded[name].count == s.count


def test_real_inception_metrics_are_skipped_without_local_weights(tmp_path: Path, monkeypatch) -> None:
    from diffusers_ptq.benchmark.inception import InceptionFidelity, inception_unavailable_reason

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache: nothing on disk
    reason = inception_unavailable_reason()
    assert reason is not None and ("torchmetrics" in reason or str(tmp_path) in reason)
    with pytest.raises(RuntimeError, match=r"skipped|torchmetrics"):
        InceptionFidelity(torch.zeros(2, 1, 32, 32))
