"""Real Inception FID, sFID and IS (torchmetrics), computed only when the weights are already on disk.

Nothing is downloaded: the benchmark runs offline, so without torchmetrics + torch-fidelity and a cached
Inception checkpoint these rows are skipped with a note saying why.

sFID (Nash et al. 2021, as ADM's evaluator computes it) is the Fréchet distance of spatial features: the
first 7 channels of the TF Inception graph's `mixed_6/conv` (17x17), flattened to 2,023 values. In the
ported network torchmetrics runs, that tensor is the output of `Mixed_6d.branch1x1` (TF's mixed_6 is the
fourth 17x17 block, 6d; its `conv` is the 1x1 branch after its ReLU); a forward hook collects it while the
FID pass runs, so the images go through Inception once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffusers_ptq.benchmark.metrics.fidelity import FeatureStats, frechet_distance, to_uint8_rgb

SFID_MODULE = "Mixed_6d.branch1x1"
SFID_CHANNELS = 7

# torch-fidelity's FID Inception checkpoint, as torchmetrics' FrechetInceptionDistance loads it.
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def inception_unavailable_reason() -> str | None:
    """None when real FID/sFID/IS can be computed offline, else why not."""
    try:
        import torch_fidelity  # noqa: F401
        from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: F401
    except ImportError as err:
        return (
            "real FID/sFID/IS need torchmetrics and torch-fidelity (pip install torchmetrics torch-fidelity; "
            f"import failed: {err})"
        )
    path = inception_weights_path()
    if not path.is_file():
        return f"real FID/sFID/IS skipped: no Inception weights at {path} (this benchmark never downloads)"
    return None


class SpatialFeatures:
    """Collects sFID features from an Inception network's `Mixed_6d.branch1x1` while it runs."""

    def __init__(self, inception: nn.Module) -> None:
        self._batches: list[torch.Tensor] = []
        self._handle = inception.get_submodule(SFID_MODULE).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._batches.append(output[:, :SFID_CHANNELS].detach().flatten(1).double().cpu())

    def take(self) -> FeatureStats:
        """Statistics of the features collected since the last call; starts collecting anew."""
        if not self._batches:
            raise RuntimeError(f"no {SFID_MODULE} output was collected: the Inception network did not run")
        features, self._batches = torch.cat(self._batches), []
        return FeatureStats.of(features)

    def remove(self) -> None:
        self._handle.remove()


class InceptionFidelity:
    """FID and sFID against a fixed set of real images, and Inception Score, via torchmetrics."""

    name = "Inception-v3 (torchmetrics): FID and sFID vs real images, IS"

    def __init__(self, real_images: torch.Tensor, batch_size: int = 200) -> None:
        reason = inception_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.batch_size = batch_size
        self.fid = FrechetInceptionDistance(feature=2048, reset_real_features=False)
        self.spatial = SpatialFeatures(self.fid.inception)
        for chunk in real_images.split(batch_size):
            self.fid.update(to_uint8_rgb(chunk), real=True)
        self.real_spatial = self.spatial.take()

    def compute(self, images: torch.Tensor) -> dict[str, float]:
        from torchmetrics.image.inception import InceptionScore

        score = InceptionScore()
        self.fid.reset()  # keeps the real features (reset_real_features=False)
        for chunk in images.split(self.batch_size):
            rgb = to_uint8_rgb(chunk)
            self.fid.update(rgb, real=False)
            score.update(rgb)
        return {
            "FID": float(self.fid.compute()),
            "sFID": frechet_distance(self.spatial.take(), self.real_spatial),
            "IS (Inception)": float(score.compute()[0]),
        }


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
