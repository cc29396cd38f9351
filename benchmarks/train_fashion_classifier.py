"""Train the Fashion-MNIST feature classifier and precompute the real-data feature statistics.

Writes `diffusers_ptq/zoo/assets/fashion_classifier.safetensors` and `fashion_fd_stats.safetensors`
(mean and covariance of the 128-d features of the 10k test images and of the 60k training images), so the
quality benchmark runs without the dataset. Needs Debian's `dataset-fashion-mnist`. The shipped classifier
took 551 s on one core (`seconds` in benchmarks/results/train_fashion_classifier.json):

    python benchmarks/train_fashion_classifier.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=Path("benchmarks/results/train_fashion_classifier.json"))
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y = load_fashion_mnist("train", root=args.data_root)
    test_x, test_y = load_fashion_mnist("test", root=args.data_root)

    model = FashionClassifier()
    steps = args.epochs * (len(train_x) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="classifier", mininterval=5.0)
    for _ in range(args.epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(len(train_x) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = train_x[idx]
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
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
