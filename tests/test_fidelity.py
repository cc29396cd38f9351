"""Fréchet distance and Inception-style score (diffusers_ptq.benchmark.metrics.fidelity)."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from diffusers_ptq.benchmark.metrics.fidelity import (
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
    from diffusers_ptq.benchmark.metrics.inception import InceptionFidelity, inception_unavailable_reason

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache: nothing on disk
    reason = inception_unavailable_reason()
    assert reason is not None and ("torchmetrics" in reason or str(tmp_path) in reason)
    with pytest.raises(RuntimeError, match=r"skipped|torchmetrics"):
        InceptionFidelity(torch.zeros(2, 1, 32, 32))


class _StandInInception(nn.Module):
    """Shaped like the part of torchmetrics' Inception that sFID reads: Mixed_6d.branch1x1 at 17x17."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.Mixed_6d = nn.Module()
        self.Mixed_6d.branch1x1 = nn.Sequential(nn.Conv2d(3, 12, 1), nn.ReLU())

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(rgb.float() / 255, size=(17, 17), mode="bilinear")
        return self.Mixed_6d.branch1x1(x)


def test_spatial_features_collect_the_first_seven_channels() -> None:
    from diffusers_ptq.benchmark.metrics.inception import SpatialFeatures

    net = _StandInInception()
    spatial = SpatialFeatures(net)
    with torch.no_grad():
        outs = [net(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)) for n in (5, 4)]
    stats = spatial.take()
    assert stats.count == 9 and stats.mean.shape == (7 * 17 * 17,)
    expected = torch.cat(outs)[:, :7].flatten(1).double().mean(0)
    assert torch.allclose(stats.mean, expected)
    with pytest.raises(RuntimeError, match=r"no Mixed_6d.branch1x1 output was collected"):
        spatial.take()
    spatial.remove()
    net(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="did not run"):
        spatial.take()


def test_sfid_is_reported_with_fid_from_one_inception_pass(monkeypatch) -> None:
    """The real metric needs Inception weights (absent here): torchmetrics is replaced by stand-ins."""
    from diffusers_ptq.benchmark.metrics import inception

    class FakeFID:
        def __init__(self, feature: int, reset_real_features: bool) -> None:
            self.inception, self.calls = _StandInInception(), 0

        def update(self, rgb: torch.Tensor, real: bool) -> None:
            assert rgb.dtype == torch.uint8 and rgb.shape[1] == 3
            self.calls += 1
            self.inception(rgb)

        def reset(self) -> None:
            pass

        def compute(self) -> torch.Tensor:
            return torch.tensor(1.5)

    class FakeIS:
        def update(self, rgb: torch.Tensor) -> None:
            pass

        def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.tensor(2.0), torch.tensor(0.0)

    fid_module, is_module = types.ModuleType("fid"), types.ModuleType("inception")
    fid_module.FrechetInceptionDistance, is_module.InceptionScore = FakeFID, FakeIS
    for name, module in [
        ("torchmetrics", types.ModuleType("torchmetrics")),
        ("torchmetrics.image", types.ModuleType("torchmetrics.image")),
        ("torchmetrics.image.fid", fid_module),
        ("torchmetrics.image.inception", is_module),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(inception, "inception_unavailable_reason", lambda: None)

    gen = torch.Generator().manual_seed(0)
    real = torch.rand(64, 1, 32, 32, generator=gen) * 2 - 1
    metric = inception.InceptionFidelity(real, batch_size=32)
    same = metric.compute(real)
    assert set(same) == {"FID", "sFID", "IS (Inception)"}
    assert abs(same["sFID"]) < 1e-6 * max(1.0, metric.real_spatial.cov.trace().item())
    other = metric.compute(torch.rand(64, 1, 32, 32, generator=gen).pow(3) * 2 - 1)  # darker images
    assert other["sFID"] > 1.0 and other["FID"] == 1.5 and other["IS (Inception)"] == 2.0
    assert metric.fid.calls == 6  # real set once, each generated set once: one pass serves FID and sFID
