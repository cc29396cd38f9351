"""Train the Fashion-MNIST feature classifier and precompute the real-data feature statistics.

Writes `diffusers_ptq/zoo/assets/fashion_classifier.safetensors` and `fashion_fd_stats.safetensors`
(mean and covariance of the 128-d features of the 10k test images and of the 60k training images), so the
quality benchmark runs without the dataset. Needs Debian's `dataset-fashion-mnist`. The shipped classifier
took 551 s on one core (`seconds` in benchmarks/results/train_fashion_classifier.json):

    python benchmarks/train_fashion_classifier.py --threads 1
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from training_common import classifier_parser, train_classifier

from diffusers_ptq.benchmark.metrics.fidelity import (
    FeatureStats,
    classifier_outputs,
    frechet_distance,
    save_stats,
)
from diffusers_ptq.zoo.classifier import CLASSIFIER_FILE, FashionClassifier
from diffusers_ptq.zoo.data import load_fashion_mnist
from diffusers_ptq.zoo.models import ASSETS_DIR

STATS_FILE = ASSETS_DIR / "fashion_fd_stats.safetensors"


def main(argv: list[str] | None = None) -> None:
    log = Path("benchmarks/results/train_fashion_classifier.json")
    args = classifier_parser(__doc__, threads=2, log=log).parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y = load_fashion_mnist("train", root=args.data_root)
    test_x, test_y = load_fashion_mnist("test", root=args.data_root)
    start = time.perf_counter()

    def loss_fn(model: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), train_y[idx])

    model = train_classifier(FashionClassifier(), train_x, args, loss_fn)
    test_features, test_logits = classifier_outputs(model, test_x)
    train_features, _ = classifier_outputs(model, train_x)
    accuracy = (test_logits.argmax(-1) == test_y).float().mean().item()
    stats = {"test": FeatureStats.of(test_features), "train": FeatureStats.of(train_features)}
    CLASSIFIER_FILE.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(CLASSIFIER_FILE))
    save_stats(STATS_FILE, stats)
    log = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "test_accuracy": round(accuracy, 4),
        "fd_train_vs_test": round(frechet_distance(stats["train"], stats["test"]), 3),
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
