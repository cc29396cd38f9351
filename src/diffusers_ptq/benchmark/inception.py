"""Real Inception FID and IS (torchmetrics), computed only when the weights are already on disk.

Nothing is downloaded: the benchmark runs offline, so without torchmetrics + torch-fidelity and a cached
Inception checkpoint these rows are skipped with a note saying why.
"""

from __future__ import annotations

from pathlib import Path

import torch

# torch-fidelity's FID Inception checkpoint, as torchmetrics' FrechetInceptionDistance loads it.
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def inception_unavailable_reason() -> str | None:
    """None when real FID/IS can be computed offline, else why not."""
    try:
        import torch_fidelity  # noqa: F401
        from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: F401
    except ImportError:
        return "real FID/IS need torchmetrics and torch-fidelity (pip install torchmetrics torch-fidelity)"
    path = inception_weights_path()
    if not path.is_file():
        return f"real FID/IS skipped: no Inception weights at {path} (this benchmark never downloads)"
    return None


def _uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, C, H, W) -> uint8 RGB, as torchmetrics' Inception expects."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


class InceptionFidelity:
    """FID against a fixed set of real images, and Inception Score, via torchmetrics."""

    name = "Inception-v3 (torchmetrics): FID vs real images, IS"

    def __init__(self, real_images: torch.Tensor, batch_size: int = 200) -> None:
        reason = inception_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.batch_size = batch_size
        self.fid = FrechetInceptionDistance(feature=2048, reset_real_features=False)
        for chunk in real_images.split(batch_size):
            self.fid.update(_uint8_rgb(chunk), real=True)

    def compute(self, images: torch.Tensor) -> dict[str, float]:
        from torchmetrics.image.inception import InceptionScore

        score = InceptionScore()
        self.fid.reset()  # keeps the real features (reset_real_features=False)
        for chunk in images.split(self.batch_size):
            rgb = _uint8_rgb(chunk)
            self.fid.update(rgb, real=False)
            score.update(rgb)
        return {"FID": float(self.fid.compute()), "IS (Inception)": float(score.compute()[0])}


class CombinedFidelity:
    """Several fidelity metrics reported side by side (e.g. classifier FD plus real FID)."""

    def __init__(self, *metrics: object) -> None:
        self.metrics = metrics
        self.name = " + ".join(m.name for m in metrics)

    def compute(self, images: torch.Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in self.metrics:
            out.update(metric.compute(images))
        return out
